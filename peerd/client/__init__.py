"""peerd client SDK: join a swarm, plan routes through peers, generate, run forward passes, and train.

Imports protocols/ and shared model code only, never server code.
"""

from __future__ import annotations

from peerd.client.adapters import ClientAdapter
from peerd.client.autograd import RemoteBlocks, RemotePipeline
from peerd.client.routing import Span
from peerd.client.sampling import SamplingParams
from peerd.client.session import InferenceSession
from peerd.client.swarm import BanList, GenerationResult, SwarmClient
from peerd.client.verify import Incident
from peerd.rpc.errors import NoRouteError, PeerdClientError, PeerError, PeerUnavailable, SwarmConnectError

__all__ = [
    "BanList",
    "ClientAdapter",
    "GenerationResult",
    "Incident",
    "InferenceSession",
    "NoRouteError",
    "PeerError",
    "PeerUnavailable",
    "PeerdClientError",
    "RemoteBlocks",
    "RemotePipeline",
    "SamplingParams",
    "Span",
    "SwarmClient",
    "SwarmConnectError",
]

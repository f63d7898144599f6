"""peerd client SDK: join a swarm, plan routes through peers, generate, run forward passes, and train.

Imports protocols/, the rpc transport and shared model code only, never server code (import-linter
checks it). The error tree lives in ``peerd.rpc.errors`` (peers use the transport too) and is
re-exported here.
"""

from __future__ import annotations

from peerd.client.adapters import ClientAdapter
from peerd.client.autograd import RemoteBlocks
from peerd.client.bans import BanList
from peerd.client.generation import GenerationResult
from peerd.client.pipeline import RemotePipeline
from peerd.client.routing import Span
from peerd.client.sampling import SamplingParams
from peerd.client.session import InferenceSession
from peerd.client.swarm import SwarmClient
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

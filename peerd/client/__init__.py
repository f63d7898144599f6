"""peerd client SDK: join a swarm, plan routes through peers, generate, run forward passes, and train.

Imports protocols/, the rpc transport and shared model code only, never server code (import-linter
checks it). The error tree lives in ``peerd.rpc.errors`` (peers use the transport too) and is
re-exported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peerd.lazy import lazy_attributes

if TYPE_CHECKING:
    from peerd.client.adapters import ClientAdapter
    from peerd.client.autograd import RemoteBlocks
    from peerd.client.bans import BanList
    from peerd.client.generation import GenerationResult
    from peerd.client.pipeline import RemotePipeline
    from peerd.client.routing import Span
    from peerd.client.sampling import SamplingParams
    from peerd.client.session import InferenceSession
    from peerd.client.speculative import Speculation
    from peerd.client.swarm import SwarmClient
    from peerd.client.verify import Incident
    from peerd.rpc.errors import NoRouteError, PeerdClientError, PeerError, PeerUnavailable, SwarmConnectError

# Names load on first use (PEP 562), so importing one pure module of the package, such as
# ``peerd.client.routing`` in the swarm simulator, does not pull in torch and hivemind.
_HOMES = {
    "BanList": "peerd.client.bans",
    "ClientAdapter": "peerd.client.adapters",
    "GenerationResult": "peerd.client.generation",
    "Incident": "peerd.client.verify",
    "InferenceSession": "peerd.client.session",
    "NoRouteError": "peerd.rpc.errors",
    "PeerError": "peerd.rpc.errors",
    "PeerUnavailable": "peerd.rpc.errors",
    "PeerdClientError": "peerd.rpc.errors",
    "RemoteBlocks": "peerd.client.autograd",
    "RemotePipeline": "peerd.client.pipeline",
    "SamplingParams": "peerd.client.sampling",
    "Span": "peerd.client.routing",
    "Speculation": "peerd.client.speculative",
    "SwarmClient": "peerd.client.swarm",
    "SwarmConnectError": "peerd.rpc.errors",
}


__getattr__ = lazy_attributes(__name__, _HOMES)


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
    "Speculation",
    "SwarmClient",
    "SwarmConnectError",
]

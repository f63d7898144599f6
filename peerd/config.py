"""Configuration of a peer daemon as a frozen dataclass (parsing lives in peerd/cli/parser.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ALL_INTERFACES", "DEFAULT_SPOT_CHECK_RATE", "DEFAULT_SWARM", "MAX_ANNOUNCE_PERIOD_S", "PeerConfig"]

DEFAULT_SWARM = "public"
# records live two announce periods; DHT nodes refuse longer-lived ones (swarm/validation.py), so a
# captured record cannot be replayed for long, and the period is capped to fit
MAX_ANNOUNCE_PERIOD_S = 300.0
# Clients check the first answer of each peer in a session, then this share of later steps
# (peerd.client.verify; cost and catch rate measured in docs/security.md). 0 turns checks off.
DEFAULT_SPOT_CHECK_RATE = 0.02
ALL_INTERFACES = "0.0.0.0"  # the default listen host: every IPv4 interface, and every IPv6 one if any


@dataclass(frozen=True)
class PeerConfig:
    """Everything ``peerd run`` can be told. Defaults suit a home machine joining a swarm."""

    model_path: Path  # HF-format folder (config.json + safetensors) resolved from the model id
    model_id: str  # name the swarm knows this model by (part of every DHT key)
    blocks: tuple[int, int] | None = None  # hosted block range [start, end); None = placement decides
    swarm: str = DEFAULT_SWARM  # swarm name: peers of different swarms never see each other's records
    host: str = ALL_INTERFACES  # libp2p listen address; 0.0.0.0 = every interface, IPv6 included
    port: int = 0  # listen port for libp2p (0 = any free port)
    announce_maddrs: tuple[str, ...] = ()  # public multiaddrs to advertise (behind NAT/port forward)
    reachability: str = "auto"  # auto: ask initial peers to dial back; direct / relayed: decided by the operator
    initial_peers: tuple[str, ...] = ()  # multiaddrs to join; empty = start a new swarm
    identity_path: Path = Path("~/.config/peerd/identity.key")  # created on first run, mode 0600
    public_name: str = ""  # shown on status pages; not authenticated
    device: str = "cpu"  # torch device for the hosted blocks
    dtype: str | None = None  # weights dtype; None = float32 on CPU, bfloat16 on CUDA
    quant: str = "none"  # hosted blocks' linear weights: "none" (the dtype), "int8", "nf4" or "int4" (model/quant.py)
    torch_threads: int | None = None  # intra-op threads for torch; None = torch's default
    max_blocks: int | None = None  # placement: host at most this many blocks (None = as many as fit)
    memory_budget_bytes: int | None = None  # placement: weights + KV cache budget; None = 80% of free memory
    placement_jitter_s: float = 3.0  # random delay before choosing blocks, so simultaneous starts spread
    placement_settle_s: float = 1.0  # wait between announcing JOINING and re-checking for collisions
    rebalance_period_s: float = 120.0  # how often an auto-placed peer considers moving (0 = never)
    rebalance_threshold: float = 0.2  # move only if the swarm bottleneck rises by more than this fraction
    cache_tokens: int = 8192  # KV cache budget in tokens (batch 1) across all sessions
    max_session_length: int = 2048  # longest inference session (prompt + generated) a client may open
    max_batch_tokens: int = 8192  # cap on batch x tokens of one request
    max_sessions: int = 64  # concurrent inference sessions in total
    max_sessions_per_peer: int = 16  # concurrent inference sessions of one remote peer id
    max_inflight_per_peer: int = 8  # concurrent info/forward/backward requests of one remote peer id
    max_streams: int = 1024  # open client streams in total (lowered at start to fit the open-files limit)
    max_streams_per_peer: int = 64  # open client streams of one remote peer id
    allowed_peers: frozenset[str] | None = None  # private peer: serve only these peer ids (None = anyone)
    session_idle_timeout_s: float = 60.0  # idle sessions are closed and their cache freed
    evict_idle_s: float = 2.0  # a session idle this long may lose its cache to one that needs it
    request_timeout_s: float = 30.0  # every read from a client stream has this deadline
    drain_timeout_s: float = 10.0  # on SIGTERM, how long open sessions may finish before being handed back
    announce_period_s: float = 30.0  # how often records are refreshed (expiry = 2x this)
    http_port: int | None = None  # /metrics and the health page; None = no HTTP server
    http_host: str = "127.0.0.1"
    measure_throughput: bool = True  # False = skip the start-up benchmark (tests); rough estimate used
    step_delay_s: float = 0.0  # test/ops knob: added latency per inference step (simulates a slow peer)

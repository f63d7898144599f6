"""What a peer announces about itself in the DHT, as a typed record with a tolerant wire form.

One record per hosted block: key = the block's uid, subkey = the owner's signed public-key marker,
value = :meth:`ServerRecord.to_wire`. Readers ignore fields they do not know (forward compatibility)
and drop records whose known fields are malformed (see ``validation.py``, which enforces the same
rules on every DHT node before a record is even stored).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

RECORD_SCHEMA_VERSION = 1
# Upper bounds that make a record absurd rather than merely optimistic.
MAX_THROUGHPUT_TOKENS_PER_S = 1e9
MAX_BLOCKS = 100_000
MAX_NAME_CHARS = 64
MAX_RTT_ENTRIES = 64
MAX_ADDRS = 8  # multiaddrs a record may list for dialling its peer
MAX_UPLINK_BYTES_PER_S = 1e12  # 8 Tbit/s: more is a lie, not a fast link
REACH_VALUES = ("direct", "relayed", "unknown")
# the fields of this schema version (``to_wire``); validators bound the size of any others
WIRE_FIELDS = frozenset(
    [
        "v",
        "peer_id",
        "state",
        "start",
        "end",
        "decode_tps",
        "prefill_tps",
        "device",
        "mem_total",
        "mem_free",
        "dtype",
        "cache_free",
        "proto",
        "version",
        "name",
        "rtts",
        "at",
        "addrs",
        "reach",
        "uplink",
        "quant",
    ]
)
MAX_QUANT_CHARS = 16  # quantization names ("none", "int8", "nf4"; newer peers may announce others)


class PeerState(enum.Enum):
    """Lifecycle of a serving peer as others see it (Petals has the same three states)."""

    OFFLINE = "offline"  # gone or leaving: route around it
    JOINING = "joining"  # loading weights / measuring: not ready for traffic yet
    ONLINE = "online"  # serving


def block_uid(prefix: str, block_index: int) -> str:
    """DHT key of one block: ``<prefix>_block_<i>`` where prefix names the swarm and the model."""
    return f"{prefix}_block_{block_index}"


def swarm_prefix(swarm: str, model_id: str) -> str:
    """Key prefix that isolates one model in one swarm, so private swarms never mix records."""
    return f"peerd:{swarm}:{model_id}"


@dataclass(frozen=True)
class ServerRecord:
    """One peer's announcement for the blocks it hosts; the same value is stored under each block key."""

    peer_id: str  # base58 libp2p peer id; validators check it matches the signing key
    state: PeerState
    start: int  # first hosted block (inclusive)
    end: int  # last hosted block (exclusive)
    decode_tokens_per_s: float  # one-token steps through ONE block, batch 1 (higher is faster)
    prefill_tokens_per_s: float  # tokens/s through ONE block for a long prefill
    device: str  # e.g. "cpu", "NVIDIA GeForce RTX 4090"
    memory_total_bytes: int
    memory_free_bytes: int
    dtype: str  # torch dtype name of the hosted weights, e.g. "float32"
    cache_tokens_free: int  # KV cache tokens (for batch 1) still available for new sessions
    protocol_version: tuple[int, int]
    package_version: str
    public_name: str = ""
    # RTT in ms to peers serving the blocks right after ours (peer id -> ms); used by routing.
    next_rtts_ms: Mapping[str, float] = field(default_factory=dict)
    announced_at: float = 0.0  # DHT time of the announcement
    # how to dial this peer (without the trailing /p2p/<peer id>), best first: its public addresses
    # or, behind NAT, `<relay addr>/p2p/<relay id>/p2p-circuit`; and how it is reached ("direct",
    # "relayed" through a circuit relay, or "unknown" for peers that do not say)
    addrs: tuple[str, ...] = ()
    reach: str = "unknown"
    # bytes/s this peer could upload to other peers, as it timed it (0: not measured yet); a
    # client sending large batches here expects the answers to come back no faster
    uplink_bytes_per_s: float = 0.0
    # how the hosted blocks' linear weights are stored: "none" (in dtype), "int8" or "nf4"; records
    # of peers older than quantization say nothing, which means "none"
    quant: str = "none"

    def to_wire(self) -> dict[str, Any]:
        """Plain msgpack-able dict; ints stay ints and floats stay floats (the schema is strict)."""
        return {
            "v": RECORD_SCHEMA_VERSION,
            "peer_id": self.peer_id,
            "state": self.state.value,
            "start": int(self.start),
            "end": int(self.end),
            "decode_tps": float(self.decode_tokens_per_s),
            "prefill_tps": float(self.prefill_tokens_per_s),
            "device": self.device,
            "mem_total": int(self.memory_total_bytes),
            "mem_free": int(self.memory_free_bytes),
            "dtype": self.dtype,
            "cache_free": int(self.cache_tokens_free),
            "proto": [int(self.protocol_version[0]), int(self.protocol_version[1])],
            "version": self.package_version,
            "name": self.public_name,
            "rtts": {str(k): float(v) for k, v in list(self.next_rtts_ms.items())[:MAX_RTT_ENTRIES]},
            "at": float(self.announced_at),
            "addrs": list(self.addrs[:MAX_ADDRS]),
            "reach": self.reach,
            "uplink": float(self.uplink_bytes_per_s),
            "quant": self.quant,
        }

    def to_status(self) -> dict[str, Any]:
        """The record as ``peerd status --json`` and the health page's ``/api/v1/swarm`` show it."""
        return {
            "peer_id": self.peer_id,
            "name": self.public_name,
            "state": self.state.value,
            "start": self.start,
            "end": self.end,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "device": self.device,
            "dtype": self.dtype,
            "cache_tokens_free": self.cache_tokens_free,
            "version": self.package_version,
            "rtts_ms": dict(self.next_rtts_ms),
            "announced_at": self.announced_at,
            "reach": self.reach,
            "addrs": list(self.addrs),
            "uplink_bytes_per_s": self.uplink_bytes_per_s,
            "quant": self.quant,
        }

    @classmethod
    def from_wire(cls, value: Any) -> ServerRecord:
        """Parse a record value; raises ValueError on anything malformed. Unknown keys are ignored."""
        if not isinstance(value, Mapping):
            raise ValueError(f"record must be a map, got {type(value).__name__}")

        def get(name: str, kind: type | tuple[type, ...]) -> Any:
            if name not in value:
                raise ValueError(f"record is missing {name!r}")
            item = value[name]
            # bool is an int subclass: never accept it where a number is expected
            if isinstance(item, bool) or not isinstance(item, kind):
                raise ValueError(f"record field {name!r} has type {type(item).__name__}")
            return item

        version = get("v", int)
        if version < 1:
            raise ValueError(f"bad record version {version}")
        start, end = get("start", int), get("end", int)
        if not 0 <= start < end <= MAX_BLOCKS:
            raise ValueError(f"bad block range {start}:{end}")
        decode_tps = float(get("decode_tps", (int, float)))
        prefill_tps = float(get("prefill_tps", (int, float)))
        for name, tps in (("decode_tps", decode_tps), ("prefill_tps", prefill_tps)):
            if not (math.isfinite(tps) and 0.0 <= tps <= MAX_THROUGHPUT_TOKENS_PER_S):
                raise ValueError(f"absurd throughput {name}={tps}")
        proto = get("proto", (list, tuple))
        if len(proto) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in proto):
            raise ValueError("bad protocol version")
        rtts_raw = value.get("rtts", {})
        if not isinstance(rtts_raw, Mapping) or len(rtts_raw) > MAX_RTT_ENTRIES:
            raise ValueError("bad rtts")
        rtts: dict[str, float] = {}
        for peer, rtt in rtts_raw.items():
            if not isinstance(peer, str) or isinstance(rtt, bool) or not isinstance(rtt, (int, float)):
                raise ValueError("bad rtt entry")
            if not (math.isfinite(rtt) and 0 <= rtt < 1e6):
                raise ValueError("absurd rtt")
            rtts[peer] = float(rtt)
        mem_total, mem_free, cache_free = get("mem_total", int), get("mem_free", int), get("cache_free", int)
        if min(mem_total, mem_free, cache_free) < 0:
            raise ValueError("negative memory or cache")
        strings = {n: get(n, str) for n in ("peer_id", "state", "device", "dtype", "version", "name")}
        if any(len(s) > 256 for s in strings.values()) or len(strings["name"]) > MAX_NAME_CHARS:
            raise ValueError("string field too long")
        try:
            state = PeerState(strings["state"])
        except ValueError:
            raise ValueError(f"unknown state {strings['state']!r}") from None
        at = float(get("at", (int, float))) if "at" in value else 0.0
        addrs = value.get("addrs", [])
        if not isinstance(addrs, (list, tuple)) or len(addrs) > MAX_ADDRS:
            raise ValueError("bad addrs")
        if not all(isinstance(a, str) and a.startswith("/") and len(a) <= 256 for a in addrs):
            raise ValueError("bad addr entry")
        reach = value.get("reach", "unknown")
        if reach not in REACH_VALUES:
            raise ValueError(f"unknown reach {reach!r:.20}")
        uplink = value.get("uplink", 0.0)
        if (
            isinstance(uplink, bool)
            or not isinstance(uplink, (int, float))
            or not 0 <= uplink <= MAX_UPLINK_BYTES_PER_S
        ):
            raise ValueError("bad uplink")
        quant = value.get("quant", "none")
        if not isinstance(quant, str) or not 0 < len(quant) <= MAX_QUANT_CHARS:
            raise ValueError("bad quant")
        return cls(
            peer_id=strings["peer_id"],
            state=state,
            start=start,
            end=end,
            decode_tokens_per_s=decode_tps,
            prefill_tokens_per_s=prefill_tps,
            device=strings["device"],
            memory_total_bytes=mem_total,
            memory_free_bytes=mem_free,
            dtype=strings["dtype"],
            cache_tokens_free=cache_free,
            protocol_version=(proto[0], proto[1]),
            package_version=strings["version"],
            public_name=strings["name"],
            next_rtts_ms=rtts,
            announced_at=at,
            addrs=tuple(addrs),
            reach=reach,
            uplink_bytes_per_s=float(uplink),
            quant=quant,
        )


def latest_per_peer(
    records: Iterable[ServerRecord], keep: Callable[[ServerRecord], bool] = lambda _: True
) -> dict[str, ServerRecord]:
    """The newest record of each peer among ``records`` that ``keep`` accepts, by peer id.

    A peer stores one record per hosted block, so a DHT read sees it several times; after a move,
    its old blocks hold an OFFLINE record and its new ones an ONLINE one. Filtering with ``keep``
    happens *before* picking the newest, so ``keep=lambda r: r.state is PeerState.ONLINE`` yields
    the live record even when an OFFLINE one for abandoned blocks is newer.
    """
    out: dict[str, ServerRecord] = {}
    for record in records:
        if not keep(record):
            continue
        current = out.get(record.peer_id)
        if current is None or record.announced_at > current.announced_at:
            out[record.peer_id] = record
    return out

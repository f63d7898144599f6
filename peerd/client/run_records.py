"""What the members of a collaborative run say about themselves in the DHT (remote input, parsed defensively).

A round's key holds one entry per member, in the member's signed subkey: where to reach it, when
it arrived, and a digest of the base adapter it holds (peerd/client/averaging.py).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["Member", "digest"]

MAX_ADDRS = 16


def digest(flat: Tensor) -> str:
    return hashlib.sha256(flat.float().contiguous().numpy().tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Member:
    """One member's DHT entry (remote input: every field checked, defaults otherwise).

    ``peer`` is the member's libp2p peer id as it claims it. A claim is cheap to make, but not to
    use: pushes and state are accepted only on streams libp2p authenticated as that peer, and a
    stream dialled to a peer id reaches only the holder of its key.
    """

    peer: str
    addrs: list[str]
    at: float = 0.0  # when it arrived in the round (DHT time); 0 on the run key
    base: str = ""  # digest of the base adapter it holds
    round: int = -1  # on the run key: the round whose base it holds
    window: float = 0.0  # how long after its arrival it proposes the round stay open (seconds)

    @classmethod
    def parse(cls, value: Any) -> Member:
        got = value if isinstance(value, dict) else {}
        peer, base = got.get("peer"), got.get("base")
        return cls(
            peer=peer[:128] if isinstance(peer, str) else "",
            addrs=_addrs(got),
            at=_float_field(got, "at"),
            base=base[:64] if isinstance(base, str) else "",
            round=_int_field(got, "round"),
            window=_float_field(got, "window"),
        )

    @classmethod
    def by_peer(cls, values: Iterable[Any], own_peer: str) -> dict[str, Member]:
        """Entries by claimed peer id; a peer id claimed twice (someone lying) is dropped, but never ours."""
        seen: dict[str, list[Member]] = {}
        for value in values:
            member = cls.parse(value)
            if member.peer:
                seen.setdefault(member.peer, []).append(member)
        return {p: ms[0] for p, ms in seen.items() if len(ms) == 1 or p == own_peer}


def _addrs(value: dict[str, Any]) -> list[str]:
    addrs = value.get("addrs")
    if not isinstance(addrs, list):
        return []
    return [a for a in addrs[:MAX_ADDRS] if isinstance(a, str)]


def _float_field(value: dict[str, Any], name: str) -> float:
    got = value.get(name)
    if not isinstance(got, int | float) or isinstance(got, bool) or not math.isfinite(got):
        return 0.0
    return float(got)


def _int_field(value: dict[str, Any], name: str) -> int:
    got = value.get(name)
    return got if isinstance(got, int) and not isinstance(got, bool) else -1

"""The records of a collaborative run: what members say about themselves in the DHT (remote input,
parsed defensively), how a trainer takes part (config) and what each round did (report).

A round's key holds one entry per member, in the member's signed subkey: where to reach it, when
it arrived, and a digest of the base adapter it holds (peerd/client/averaging.py).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from peerd.client.training_options import Aggregation, Averaged
from peerd.rpc.tensors import from_wire
from protocols import AveragePush, Compression, ErrorCode, ProtocolError, StateResponse

__all__ = [
    "MAX_PENDING_ROUNDS",
    "Averaged",
    "AveragingConfig",
    "Member",
    "RoundReport",
    "check_push",
    "check_state",
    "digest",
]

MAX_ADDRS = 16
MAX_PENDING_ROUNDS = 4  # pushes are kept for this many rounds ahead of ours (fast members)


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


@dataclass(frozen=True)
class AveragingConfig:
    """How a trainer takes part in a run's averaging rounds."""

    run: str
    averaged: Averaged = Averaged.GRADIENTS
    target_batch_size: int = 0  # GRADIENTS: samples across all trainers per step (0: each trainer's own batches)
    group_window_s: float = 1.0  # after the first member of a round arrives, others may join this long
    round_timeout_s: float = 10.0  # after the group closes, how long to wait for the others' pushes
    compression: Compression = Compression.NONE  # of the pushed updates (FLOAT16, BLOCKWISE8)
    aggregation: Aggregation = Aggregation.MEAN
    max_norm_factor: float = 10.0  # updates over this many times the round's lower median norm are dropped
    dht_timeout_s: float = 5.0
    record_ttl_s: float = 120.0


@dataclass
class RoundReport:
    """What one averaging round did, as this member saw it."""

    round: int
    group: list[str] = field(default_factory=list)  # members by peer id (this one included)
    used: list[str] = field(default_factory=list)  # whose updates were combined
    excluded: dict[str, str] = field(default_factory=dict)  # peer id -> why its update was dropped
    missing: list[str] = field(default_factory=list)  # members whose push never came
    bytes_sent: int = 0  # frames pushed to the others
    bytes_received: int = 0
    elapsed_s: float = 0.0
    late: bool = False  # missed the window: took the group's result from a member instead
    digest: str = ""  # of the adapter the round agreed on: equal across members when all went well
    window_s: float = 0.0  # how long the group stayed open after its first member arrived
    samples: float = 0.0  # behind the combined update (the used members' weights summed)


def check_push(push: AveragePush, run: str, round_: int, size: int) -> Tensor:
    """The update ``[size]`` of a push to a member of ``run`` at round ``round_``; ProtocolError if it is not one.

    NaN / inf / absurd norms are not judged here but with the round's other updates (aggregation).
    """
    if push.run != run:
        raise ProtocolError(ErrorCode.NOT_ALLOWED, f"this trainer is in run {run!r}, not {push.run!r}")
    if not round_ <= push.round < round_ + MAX_PENDING_ROUNDS:
        raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"round {push.round}; this trainer is at {round_}")
    update = from_wire(push.update).float()
    if update.shape != (size,):
        raise ProtocolError(ErrorCode.WRONG_SHAPE, f"update of shape {tuple(update.shape)}, expected ({size},)")
    return update


def check_state(
    answer: StateResponse, size: int, extra: int, *, at_least: int, digest_: str = ""
) -> tuple[Tensor, Tensor]:
    """The base ``[size]`` and extra state ``[extra]`` a member sent; ValueError unless it is
    ``size + extra`` finite values at round ``at_least`` or later (with digest ``digest_`` if given)."""
    state = from_wire(answer.state).float().reshape(-1)  # [size + extra]: the base, then the extra state
    if state.numel() != size + extra or not bool(torch.isfinite(state).all()):
        raise ValueError(f"the state has {state.numel()} values, not {size + extra} finite ones")
    if answer.round < at_least:
        raise ValueError(f"the sender is at round {answer.round}, not {at_least} yet")
    if digest_ and digest(state[:size]) != digest_:
        raise ValueError("the sender's state is not the one it announced")
    return state[:size], state[size:]

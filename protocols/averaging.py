"""Messages between trainers of one collaborative fine-tuning run (data parallelism).

Trainers of a run average their adapters in rounds (peerd/client/averaging.py). In a round each
member pushes its contribution to every other member of the round's group on the averaging
stream; a trainer that joins late asks a member for the run's current state on the state stream.
See protocols/README.md, "Averaging".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from protocols.fields import check_float, check_int, check_str, check_tensor
from protocols.tensors import WireTensor

MAX_AVERAGE_WEIGHT = 1e12  # samples behind one contribution: far above any real round


@dataclass(frozen=True, slots=True)
class AveragePush:
    """One member's contribution to round ``round`` of run ``run``: its flattened adapter minus the
    round's base (runs averaging parameters) or its mean gradient (runs averaging gradients), and
    the number of samples behind it (the weight of a weighted mean).
    Answered by AverageAck, or an Error (unknown run, a round the receiver is not in)."""

    TYPE: ClassVar[str] = "average_push"
    run: str
    round: int
    weight: float
    update: WireTensor

    def __post_init__(self) -> None:
        check_str(self, "run")
        check_int(self, "round")
        check_float(self, "weight", MAX_AVERAGE_WEIGHT)
        check_tensor(self, "update")


@dataclass(frozen=True, slots=True)
class AverageAck:
    """The receiver holds the push for ``round`` (it will count it if the round is still open)."""

    TYPE: ClassVar[str] = "average_ack"
    round: int

    def __post_init__(self) -> None:
        check_int(self, "round")


@dataclass(frozen=True, slots=True)
class StateRequest:
    """Ask a member of run ``run`` for the run's current adapter (a trainer joining late)."""

    TYPE: ClassVar[str] = "state_request"
    run: str

    def __post_init__(self) -> None:
        check_str(self, "run")


@dataclass(frozen=True, slots=True)
class StateResponse:
    """The member's flattened adapter as agreed before round ``round`` (followed by the optimizer
    state in runs averaging gradients): the joiner takes part from ``round`` on."""

    TYPE: ClassVar[str] = "state_response"
    round: int
    state: WireTensor

    def __post_init__(self) -> None:
        check_int(self, "round")
        check_tensor(self, "state")

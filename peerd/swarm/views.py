"""What a DHT read returns, as plain data: the records per block. No hivemind here, so pure code
(route planning, the swarm simulator) can use it without loading the DHT stack."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from peerd.swarm.records import PeerState, ServerRecord

__all__ = ["BlockView", "records_of"]


@dataclass(frozen=True)
class BlockView:
    """What the DHT says about one block: the live records of the peers that serve it."""

    index: int
    records: tuple[ServerRecord, ...]

    def online(self) -> tuple[ServerRecord, ...]:
        return tuple(r for r in self.records if r.state is PeerState.ONLINE)


def records_of(views: Iterable[BlockView]) -> Iterator[ServerRecord]:
    """Every record of every view (a peer appears once per block it serves)."""
    return (r for view in views for r in view.records)

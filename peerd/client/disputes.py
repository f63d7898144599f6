"""Disputes no third opinion could settle, remembered until the odd one out shows (docs/security.md).

A spot check compares two computations of the same blocks. When they disagree and neither the
client nor a third chain of peers can judge, the check alone cannot tell who lied: both answers are
dropped (:mod:`peerd.client.verify`). Over a session the client meets more peers, and a liar that
perturbs its outputs disagrees with every honest peer it is compared with, while honest peers
disagree only with it. So a peer that has disputed with two *disjoint* groups of peers, whose members
disputed with nobody else, is the odd one out: two independent computations agree against it.

One guard keeps honest peers safe from two independent liars (which would make the honest peer look
like the odd one out): a peer that has agreed with another in a spot check is never judged by this
rule, only by a majority verdict. A liar that perturbs every output never agrees with anyone.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["DisputeLedger"]


class DisputeLedger:
    """Unresolved disputes and agreements of one client's spot checks; names the odd one out."""

    def __init__(self) -> None:
        self._disputes: dict[str, list[frozenset[str]]] = {}  # peer -> the groups it disagreed with
        self._agreed: set[str] = set()  # peers that matched another peer's computation at least once

    def agreed(self, peers: Iterable[str]) -> None:
        """``peers`` computed the same result in a check (the checked peer and its checkers)."""
        peers = set(peers)
        if len(peers) >= 2:
            self._agreed |= peers

    def disputed(self, peer: str, others: Iterable[str]) -> tuple[str, frozenset[str]] | None:
        """``peer`` disagreed with the chain ``others``; returns (the odd one out, every peer that
        disputed with it: the honest side), if this settles it, else None.

        The odd one out is forgotten from the ledger (it is banned by the caller), and so are the
        disputes its counterparts had with it.
        """
        group = frozenset(others) - {peer}
        if not group:
            return None
        self._disputes.setdefault(peer, []).append(group)
        for other in group:
            self._disputes.setdefault(other, []).append(frozenset({peer}))
        for candidate in (peer, *sorted(group)):
            if self._is_odd(candidate):
                return candidate, self._forget(candidate)
        return None

    def disputes_of(self, peer: str) -> int:
        return len(self._disputes.get(peer, []))

    def _is_odd(self, candidate: str) -> bool:
        if candidate in self._agreed:
            return False
        # counterparts that disputed only with the candidate: independent witnesses against it
        groups = [g for g in self._disputes.get(candidate, []) if all(self._only_against(p, candidate) for p in g)]
        return any(a.isdisjoint(b) for i, a in enumerate(groups) for b in groups[i + 1 :])

    def _only_against(self, peer: str, candidate: str) -> bool:
        return all(g == frozenset({candidate}) for g in self._disputes.get(peer, []))

    def _forget(self, candidate: str) -> frozenset[str]:
        groups = self._disputes.pop(candidate, [])
        for group in groups:
            for other in group:
                kept = [g for g in self._disputes.get(other, []) if candidate not in g]
                if kept:
                    self._disputes[other] = kept
                else:
                    self._disputes.pop(other, None)
        return frozenset().union(*groups)

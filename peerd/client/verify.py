"""Spot checks of remote work: recompute a span's output elsewhere and compare (docs/security.md).

A peer can return wrong hidden states (a bug, a bad GPU, or on purpose) and nothing in the protocol
can tell. Checks are on by default: the client checks the first answer of every peer in a session
(and of every peer a stateless forward uses), then, with probability ``spot_check_rate``
(:data:`DEFAULT_SPOT_CHECK_RATE` = 2%), any later step; ``spot_check_rate = 0`` turns all checks
off. A check recomputes that span's output on *other* peers serving the same blocks (a stateless
``forward`` over the span's whole input so far, which the client keeps for failover anyway) and/or
locally when it has the weights, and compares every position within a dtype-aware tolerance.
Because each check covers the span's whole history, a peer that lied at any earlier step of a
session is caught by any later check while it still serves that session.

Two opinions that disagree need a third: the client's own computation when local checks are enabled
(``local_max_blocks``; the client then trusts itself), else a third chain of peers (majority). When
there is no third opinion the incident is ``unresolved``: both sides get an ordinary failure ban and
the work moves on without either, so a wrong answer is never knowingly kept; the dispute is
remembered, and a peer that keeps disagreeing with independent peers is banned as the odd one out
(:mod:`peerd.client.disputes`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from peerd.client.bans import LIAR_BAN_S
from peerd.client.compression import CompressionChoice, hop_compression, worst_case
from peerd.client.disputes import DisputeLedger
from peerd.client.router import Router
from peerd.client.routing import Span
from peerd.config import DEFAULT_SPOT_CHECK_RATE
from peerd.model.loading import load_stage
from peerd.model.quant import QUANTS
from peerd.model.stage import Stage
from peerd.rpc.errors import NoRouteError, PeerError, PeerUnavailable
from peerd.rpc.transport import PeerClient
from protocols import Compression

__all__ = [
    "DEFAULT_SPOT_CHECK_RATE",
    "Incident",
    "SpotChecker",
    "Verdict",
    "first_mismatch",
    "relative_errors",
    "tolerance_for",
]

logger = logging.getLogger(__name__)


# Relative L2 error per position allowed between two honest computations of the same blocks. Honest
# peers differ by kernel choice, batching (a KV-cache step vs a whole-sequence forward) and
# hardware (TF32 on GPUs): float32 agrees to ~1e-5 on one CPU, ~1e-3 across devices.
_DTYPE_TOLERANCE = {"float32": 5e-3, "float16": 2e-2, "bfloat16": 5e-2}
_COMPRESSION_TOLERANCE = {Compression.NONE: 0.0, Compression.FLOAT16: 2e-3, Compression.BLOCKWISE8: 4e-2}
# Quantised weights (``--quant``) move a span's output away from full precision: measured on SmolLM2
# spans of 3 to 10 blocks, int8 by at most 0.06 relative, nf4 by at most 0.28 (docs/decisions.md).
# These allow for that, with a margin, when computations of different precisions are compared.
# int4 reproduces a Q4_1 checkpoint such as SmolLM2 exactly and errs less than nf4 on weights off
# its grid (10 random-weight blocks: 0.078 against nf4's 0.094), so nf4's room covers it.
_QUANT_TOLERANCE = {"none": 0.0, "int8": 0.1, "nf4": 0.5, "int4": 0.5}
# Computations with the same quantisation hold the same weights (quantising is deterministic). nf4
# and int4 are dequantised exactly on every device, so only the dtype tolerance applies; int8
# multiplies differently on CUDA (activations quantised too, LLM.int8) than on the CPU (weights
# dequantised).
_SAME_QUANT_TOLERANCE = {"none": 0.0, "int8": 0.1, "nf4": 0.0, "int4": 0.0}
_UNKNOWN_QUANT_TOLERANCE = 0.5  # a quantization this client does not know: as loose as nf4


def tolerance_for(dtypes: Iterable[str], compression: Compression, quants: Iterable[str] = ("none",)) -> float:
    """Relative error two honest results may show, for peers computing in ``dtypes`` with weights ``quants``.

    Same-precision comparisons are tight; a quantised result checked against another precision
    gets the room its quantization needs -- which a subtle liar could hide in, so checks recompute
    at the same precision when they can (:meth:`SpotChecker.verify`).
    """
    base = max((_DTYPE_TOLERANCE.get(d, 5e-2) for d in dtypes), default=5e-2)
    kinds = set(quants) or {"none"}
    table = _SAME_QUANT_TOLERANCE if len(kinds) == 1 else _QUANT_TOLERANCE
    quant = max(table.get(k, _UNKNOWN_QUANT_TOLERANCE) for k in kinds)
    return base + quant + 2 * _COMPRESSION_TOLERANCE[compression]  # both results went through the codec


def relative_errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per position [n]: the largest over the batch of ||got - want|| / ||want||; inf where not finite."""
    got, want = got.float(), want.float()  # [b, n, h]
    diff = torch.linalg.vector_norm(got - want, dim=-1)  # [b, n]
    scale = torch.linalg.vector_norm(want, dim=-1).clamp_min(1e-6)  # [b, n]
    err = diff / scale
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))
    return err.amax(dim=0)  # [n]


def first_mismatch(got: torch.Tensor, want: torch.Tensor, tol: float) -> int | None:
    """Index of the first position where ``got`` is off by more than ``tol`` (None: all agree)."""
    if got.shape != want.shape:
        return 0
    bad = (relative_errors(got, want) > tol).nonzero()
    return int(bad[0, 0]) if len(bad) else None


@dataclass(frozen=True)
class Incident:
    """A spot check that failed, as reported on the client and in ``GenerationResult.incidents``."""

    peer_ids: tuple[str, ...]  # who was found wrong ("lied") or disputed ("unresolved")
    start: int  # blocks checked
    end: int
    verdict: str  # "lied": a judge (or the dispute ledger) agreed with the other side; "unresolved": no third opinion
    error: float  # largest relative error between the span's answer and the check
    first_bad_position: int  # first session position whose output was wrong (0 for stateless calls)
    judge: str  # "local", "peers", "disputes" (the odd one out of earlier disputes) or "" (unresolved)
    at: float  # time.time() of the check


@dataclass(frozen=True)
class Verdict:
    """Outcome of one spot check of one span."""

    checked: bool  # False: no second opinion was available (counted, not an incident)
    span_peer_wrong: bool  # the checked peer's answer must not be used (lied, or disputed)
    first_bad_position: int | None  # into the checked outputs
    incident: Incident | None = None


_LOCAL = "local"


class SpotChecker:
    """Decides when to check and runs the checks for one client (see module doc).

    Second opinions come from other peers through ``router`` (which also bans the culprits) and
    ``peers``, or from the client's own weights at ``model_path``.
    """

    def __init__(
        self,
        router: Router,
        peers: PeerClient,
        *,
        rate: float = DEFAULT_SPOT_CHECK_RATE,
        check_first: bool = True,
        compression: CompressionChoice = Compression.NONE,
        local_max_blocks: int = 0,
        model_path: Path | None = None,
        tolerance: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"spot_check_rate must be in [0, 1], got {rate}")
        self.router = router
        self.peers = peers
        self.compression = compression
        self.rate = rate
        # the first answer of each peer (per session; per client for stateless forwards) is always
        # checked while checks are on: a liar that lies from the start is caught at once
        self.check_first = check_first and rate > 0
        self.disputes = DisputeLedger()
        self._forward_checked: set[str] = set()  # peers whose first stateless forward was checked
        self.local_max_blocks = local_max_blocks if model_path is not None else 0
        self.model_path = model_path
        self.tolerance = tolerance
        self.rng = rng or random.Random()
        self.incidents: list[Incident] = []
        self._stages: dict[tuple[int, int, str], Stage] = {}

    def should_check(self, *, first: bool = False) -> bool:
        """Whether to check the answer just received; ``first``: the peer's first in this session."""
        if first and self.check_first:
            return True
        return self.rate > 0 and self.rng.random() < self.rate

    def should_check_forward(self, peer_id: str) -> bool:
        """Like :meth:`should_check`, for a stateless forward: each peer's first one is checked."""
        first = peer_id not in self._forward_checked
        self._forward_checked.add(peer_id)
        return self.should_check(first=first)

    def _quant_of(self, peer_id: str) -> str:
        record = self.router.known_records().get(peer_id)
        return record.quant if record is not None else "none"

    def _tolerance(self, peers: Iterable[str], span: Span) -> float:
        if self.tolerance is not None:
            return self.tolerance
        known = self.router.known_records()
        peers = list(peers)
        dtypes = [known[p].dtype for p in peers if p in known and known[p].dtype] or ["bfloat16"]
        # the client's own check computes at the span peer's quantization (see _local)
        quants = [self._quant_of(span.peer_id if p == _LOCAL else p) for p in peers]
        return tolerance_for(dtypes, worst_case(self.compression), quants)

    async def verify(self, span: Span, inputs: torch.Tensor, outputs: torch.Tensor) -> Verdict:
        """Check ``outputs`` = blocks [span.start, span.end) applied to ``inputs`` (both [b, n, h])."""
        first = await self._opinion(span, inputs, exclude={span.peer_id})
        if first is None:  # nobody else serves those blocks and no local weights
            return Verdict(checked=False, span_peer_wrong=False, first_bad_position=None)
        reference, checkers = first
        tol = self._tolerance([span.peer_id, *checkers], span)
        bad = first_mismatch(outputs, reference, tol)
        if bad is None:
            self.disputes.agreed(p for p in (span.peer_id, *checkers) if p != _LOCAL)
            return Verdict(checked=True, span_peer_wrong=False, first_bad_position=None)
        error = float(relative_errors(outputs, reference).max()) if outputs.shape == reference.shape else float("inf")
        if checkers == (_LOCAL,):  # the client's own computation is the judge
            return self._report(span, (span.peer_id,), "lied", error, bad, _LOCAL, wrong=True)
        arbiter = await self._opinion(span, inputs, exclude={span.peer_id, *checkers}, local_first=True)
        if arbiter is not None:
            judged, judge = arbiter
            tol = self._tolerance([span.peer_id, *checkers, *judge], span)
            span_ok = first_mismatch(outputs, judged, tol) is None
            checker_ok = first_mismatch(reference, judged, tol) is None
            kind = _LOCAL if judge == (_LOCAL,) else "peers"
            if checker_ok and not span_ok:
                self.disputes.agreed(p for p in (*checkers, *judge) if p != _LOCAL)
                return self._report(span, (span.peer_id,), "lied", error, bad, kind, wrong=True)
            if span_ok and not checker_ok:
                self.disputes.agreed(p for p in (span.peer_id, *judge) if p != _LOCAL)
                self._report(span, checkers, "lied", error, 0, kind, wrong=False)
                return Verdict(checked=True, span_peer_wrong=False, first_bad_position=None)
        return self._unresolved(span, checkers, error, bad)

    def _unresolved(self, span: Span, checkers: tuple[str, ...], error: float, bad: int) -> Verdict:
        """Two opinions and no judge: drop both, unless the dispute ledger now names the odd one out."""
        settled = self.disputes.disputed(span.peer_id, checkers)
        if settled is None:
            return self._report(span, (span.peer_id, *checkers), "unresolved", error, bad, "", wrong=True)
        odd, honest = settled
        for peer in honest:  # their disputes with the odd one cost them short bans: lift those
            self.router.bans.forgive(peer)
        if odd == span.peer_id:
            return self._report(span, (odd,), "lied", error, bad, "disputes", wrong=True)
        self._report(span, (odd,), "lied", error, 0, "disputes", wrong=False)
        return Verdict(checked=True, span_peer_wrong=False, first_bad_position=None)

    def _report(
        self, span: Span, peers: tuple[str, ...], verdict: str, error: float, bad: int, judge: str, *, wrong: bool
    ) -> Verdict:
        peers = tuple(p for p in peers if p != _LOCAL)
        incident = Incident(peers, span.start, span.end, verdict, error, bad, judge, time.time())
        self.incidents.append(incident)
        logger.warning(
            "spot check of blocks %d:%d: %s %s (relative error %.3g)",
            span.start,
            span.end,
            ", ".join(p[:16] for p in peers),
            verdict,
            error,
        )
        for peer in peers:
            if verdict == "lied":
                self.router.ban(peer, reason=f"wrong result for blocks {span.start}:{span.end}", duration_s=LIAR_BAN_S)
            else:
                self.router.ban(peer, reason=f"disputed result for blocks {span.start}:{span.end}")
        return Verdict(checked=True, span_peer_wrong=wrong, first_bad_position=bad, incident=incident)

    async def _opinion(
        self, span: Span, inputs: torch.Tensor, *, exclude: set[str], local_first: bool = False
    ) -> tuple[torch.Tensor, tuple[str, ...]] | None:
        """Another computation of the span: (outputs, who computed them), or None if nobody can."""
        local = self.local_max_blocks >= span.end - span.start
        order = ["local", "remote"] if local_first else ["remote", "local"]
        for source in order:
            if source == "local":
                if local:
                    return await self._local(span, inputs)  # the client's own weights always answer
            else:
                result = await self._remote(span, inputs, exclude)
                if result is not None:
                    return result
        return None

    async def _remote(
        self, span: Span, inputs: torch.Tensor, exclude: set[str]
    ) -> tuple[torch.Tensor, tuple[str, ...]] | None:
        # Peers at the span peer's precision first: their answer must match tightly. Only when none
        # serves those blocks does a peer of another precision check, within that precision's room.
        quant = self._quant_of(span.peer_id)
        other_precision = {p for p, r in self.router.known_records().items() if r.quant != quant}
        route = None
        # the last view, never a DHT read: a check is opportunistic, and in a swarm where nobody else
        # serves these blocks (`make demo`) it must cost nothing (a read can take seconds)
        view = self.router.known_records() or None
        for avoid in (exclude | other_precision, exclude):
            try:
                route = await self.router.plan_load_balanced(
                    span.start, span.end, rng=self.rng, exclude=avoid, servers=view
                )
                break
            except NoRouteError:
                continue
        if route is None:
            return None
        x = inputs
        try:
            for hop in route:
                codec = hop_compression(self.compression, hop.record)
                x = await self.peers.forward(hop.peer_id, x, hop.start, hop.end, codec)
        except (PeerUnavailable, PeerError) as exc:
            self.router.ban(exc.peer_id, reason=f"failed a spot check request: {exc}")
            return None
        return x, tuple(hop.peer_id for hop in route)

    async def _local(self, span: Span, inputs: torch.Tensor) -> tuple[torch.Tensor, tuple[str, ...]]:
        quant = self._quant_of(span.peer_id)
        if quant not in QUANTS:
            quant = "none"  # a quantization we cannot reproduce: judge at full precision (loose tolerance)
        key = (span.start, span.end, quant)  # the same precision as the peer checked: a tight comparison
        stage = self._stages.get(key)
        if stage is None:
            assert self.model_path is not None  # local_max_blocks is 0 without it
            path = self.model_path
            stage = await asyncio.to_thread(
                load_stage, path, span.start, span.end, torch.float32, "cpu", False, None, None, quant
            )
            self._stages[key] = stage

        def compute() -> torch.Tensor:
            with torch.inference_mode():
                return stage.forward(inputs.to(torch.float32)).to(inputs.dtype)

        return await asyncio.to_thread(compute), (_LOCAL,)

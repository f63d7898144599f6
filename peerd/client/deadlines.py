"""How long a session waits for one peer's answer to a step: learned from that peer's own steps.

A peer that stops answering (a frozen process, a machine that swapped itself to death, a hostile
peer holding the client) looks, to the client, exactly like a slow one; the transport's read
deadline (30 s by default) is sized for a first contact and a long prefill, so waiting for it
stalls a generation by that much. Once a peer has answered a few decode steps we know what its
normal looks like, so a step that takes many times its slowest recent steps is a hang, not a slow
step: the session fails over at once and never uses the late answer (its stream is closed).
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["MIN_STEP_DEADLINE_S", "STEP_DEADLINE_FACTOR", "StepDeadline"]

MIN_STEP_DEADLINE_S = 1.0  # never less: a GC pause or a busy batch must not look like a hang
STEP_DEADLINE_FACTOR = 10.0  # a hang is an answer this many times later than the peer's p99
DECODE_MAX_TOKENS = 8  # steps this short (decode, small speculative steps) are timed and bounded
MIN_SAMPLES = 3  # until then, the transport's own deadline applies
WINDOW = 64  # recent steps a p99 is taken over: old enough to be stable, young enough to follow load


class StepDeadline:
    """Deadline for a peer's next short step: ``max(floor_s, factor x p99)`` of its recent short steps.

    Prefill-sized steps (more than ``max_tokens`` tokens) and a peer not measured yet get
    ``default_s``: their time is not predicted by decode steps. Pure bookkeeping, no clock: the
    caller times each step and reports it with ``observe``.
    """

    def __init__(
        self,
        *,
        floor_s: float = MIN_STEP_DEADLINE_S,
        factor: float = STEP_DEADLINE_FACTOR,
        max_tokens: int = DECODE_MAX_TOKENS,
        min_samples: int = MIN_SAMPLES,
        window: int = WINDOW,
    ) -> None:
        self.floor_s = floor_s
        self.factor = factor
        self.max_tokens = max_tokens
        self.min_samples = min_samples
        self._samples: deque[float] = deque(maxlen=window)

    def observe(self, tokens: int, elapsed_s: float) -> None:
        """A step of ``tokens`` tokens per row was answered after ``elapsed_s``."""
        if tokens <= self.max_tokens and elapsed_s >= 0:
            self._samples.append(elapsed_s)

    def p99_s(self) -> float | None:
        if len(self._samples) < self.min_samples:
            return None
        ordered = sorted(self._samples)
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]

    def deadline_s(self, tokens: int, default_s: float) -> float:
        """Seconds to wait for a step of ``tokens`` tokens per row (never more than ``default_s``)."""
        p99 = self.p99_s()
        if tokens > self.max_tokens or p99 is None:
            return default_s
        return min(default_s, max(self.floor_s, self.factor * p99))

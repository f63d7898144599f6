"""How long a batch of inference steps waits for more steps before its forward starts.

A decode batch costs about as much for one step as for sixteen (the weights are read once either
way), so when recent batches of a key held more steps than wait now, the steps still missing are
probably on their way: sessions that step together reach a peer a frame at a time, a fraction of a
millisecond apart, as their client relays the previous peer's answers one by one. The compute
thread then waits for them, but only

* while they keep coming: at most :data:`QUIET_FACTOR` times the usual spacing of a batch's
  arrivals (never less than :data:`QUIET_MIN_S`) after the last one, and
* at most :data:`BATCH_WINDOW_S`, and never longer than such a batch takes to compute.

The first bound matters when sessions move through a pipeline of peers as several waves (they do:
16 sessions through 3 peers settle into two or three groups that step together, each at another
peer). The largest recent batch then promises steps that are at another peer, a whole hop away;
waiting for them until the second bound idled a peer for about a batch's compute time at every
batch of every wave (docs/benchmarks.md, issue 14: a wait of 37-45 ms p50 after the last arrival,
against a 26-36 ms forward), and did not merge the waves either. A wave's steps arrive close
together, so a pause of several times their spacing means the wave is complete.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass

__all__ = ["BATCH_WINDOW_S", "PEAK_HORIZON_S", "QUIET_FACTOR", "QUIET_MIN_S", "BatchHistory"]

BATCH_WINDOW_S = 0.050  # longest wait for steps that recent batches suggest are on their way
PEAK_HORIZON_S = 3.0  # a batch size is expected again for this long after it last ran
# A batch stops waiting once no step of its key came for QUIET_FACTOR x the usual spacing of
# arrivals within a batch, or QUIET_MIN_S if that is shorter (timer and wakeup jitter of a thread
# wait is of the order of a millisecond on a loaded box).
QUIET_FACTOR = 4.0
QUIET_MIN_S = 0.002
_SMOOTHING = 0.2  # weight of the newest batch in the moving averages


@dataclass
class BatchHistory:
    """Per batch key: the largest recent batch, how long batches take, how far apart steps arrive."""

    peak: int = 1
    at: float = 0.0  # when a batch of ``peak`` steps last ran
    compute_s: float = 0.0  # moving average of a batch's forward time
    gap_s: float | None = None  # moving average of the median spacing of a batch's arrivals

    def ran(self, size: int, started: float, took: float, arrivals: list[float]) -> None:
        """Record a batch of ``size`` steps that started at ``started``, took ``took`` seconds, and
        whose steps were queued at ``arrivals`` (perf_counter times, any order)."""
        if size >= self.peak or started - self.at > PEAK_HORIZON_S:
            self.peak, self.at = size, started
        self.compute_s = took if not self.compute_s else _mix(self.compute_s, took)
        if len(arrivals) >= 2:
            ordered = sorted(arrivals)
            # the median spacing: one long pause (two waves queued behind a busy thread) does not count
            gap = statistics.median(b - a for a, b in itertools.pairwise(ordered))
            self.gap_s = gap if self.gap_s is None else _mix(self.gap_s, gap)

    def expected(self, now: float, max_steps: int) -> int:
        """Steps a batch may expect now: the largest recent batch (1 when none ran lately)."""
        if now - self.at > PEAK_HORIZON_S:
            return 1
        return min(self.peak, max_steps)

    def quiet_s(self) -> float:
        """How long after the last arrival a filling batch still waits (unbounded before any batch
        of two or more told the spacing: then only the window and the compute time bound it)."""
        if self.gap_s is None:
            return float("inf")
        return max(QUIET_MIN_S, QUIET_FACTOR * self.gap_s)

    def fill_deadline(self, now: float, window_s: float) -> float:
        """The latest start of a batch that begins filling at ``now``."""
        return now + min(window_s, self.compute_s)


def _mix(average: float, sample: float) -> float:
    return (1 - _SMOOTHING) * average + _SMOOTHING * sample

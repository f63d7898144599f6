"""oneDNN's float32 products against MKL's, on this CPU: a peer's decode step and the client's LM head.

``peerd.model.linear.Linear`` runs a float32 CPU inference product with oneDNN, where ``F.linear``
would take MKL. Here the same weights run both ways in this process, alternating (switching
``linear.ONEDNN``), ``rounds`` times each: a decode step of 1 and of 16 sessions through a peer's
span of blocks (``forward_batch``, as the peer's runtime calls it; MKL's run pads small batches as
it does then), a backward RPC's work over that span (``backward_chunks``: the forward recomputed
with autograd, then the input's gradient), and the LM head's pass for 1 and 16 positions. One
torch thread, as ``make bench``'s peers. The outputs of the two kernels are compared too (they sum in another order).

Products over 2-4 rows take MKL with the weight as the left operand (``linear.SKINNY_ROWS``); the
same way, those cases (2 and 4 sessions' steps, the head for 2 and 4 positions) run alternately
with that path and with oneDNN's for every row count (``SKINNY_ROWS`` emptied).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["kernels_rows", "run_kernels_bench"]

SPAN_BLOCKS = 10  # a peer of make bench's 3-peer swarm serves 10 of SmolLM2's 30 blocks
CONTEXT = 64  # tokens already in each session's cache


def _median_ms(fn: Callable[[], object], calls: int) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def run_kernels_bench(model: Any, *, rounds: int = 4, calls: int = 5) -> dict[str, Any]:
    """Median ms per call of each case with each kernel, and oneDNN's speedup (MKL ms / oneDNN ms)."""
    from peerd.model import linear
    from peerd.model.batching import StepInput, backward_chunks, forward_batch
    from peerd.server.compute import CHUNK_TOKENS

    stage, head = model.stage, model.head
    blocks = min(SPAN_BLOCKS, stage.config.num_layers)
    hidden_size = stage.config.hidden_size
    generator = torch.Generator().manual_seed(0)

    def sessions(n: int) -> Callable[[], list[torch.Tensor | ValueError]]:
        caches = []
        with torch.inference_mode():
            for _ in range(n):
                cache = stage.allocate_cache(1, CONTEXT + 1)
                stage.forward(torch.randn(1, CONTEXT, hidden_size, generator=generator), cache=cache, position=0)
                caches.append(cache)
        xs = [torch.randn(1, 1, hidden_size, generator=generator) for _ in range(n)]

        def step() -> list[torch.Tensor | ValueError]:  # the same position again: the cache rewinds
            steps = [StepInput(x, c, CONTEXT) for x, c in zip(xs, caches, strict=True)]
            with torch.inference_mode():
                return forward_batch(stage, steps, 0, blocks)

        return step

    def backward_pass(batch: int, n: int) -> Callable[[], torch.Tensor]:
        x = torch.randn(batch, n, hidden_size, generator=generator)
        grad = torch.randn(batch, n, hidden_size, generator=generator)

        def run() -> torch.Tensor:  # a backward RPC: the forward recomputed with autograd, then its gradient
            chunks = backward_chunks(stage, x, grad, 0, blocks, CHUNK_TOKENS)
            while True:
                try:
                    next(chunks)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]

        return run

    def head_pass(n: int) -> Callable[[], torch.Tensor]:
        x = torch.randn(1, n, hidden_size, generator=generator)

        def run() -> torch.Tensor:
            with torch.inference_mode():
                return head.logits(x)  # type: ignore[no-any-return]

        return run

    cases: dict[str, Callable[[], Any]] = {
        f"{blocks} blocks, 1 session": sessions(1),
        f"{blocks} blocks, 16 sessions": sessions(16),
        f"{blocks} blocks, backward of 4 x 64 tokens": backward_pass(4, 64),
        "LM head, 1 position": head_pass(1),
        "LM head, 16 positions": head_pass(16),
    }
    small: dict[str, Callable[[], Any]] = {
        f"{blocks} blocks, 2 sessions": sessions(2),
        f"{blocks} blocks, 4 sessions": sessions(4),
        "LM head, 2 positions": head_pass(2),
        "LM head, 4 positions": head_pass(4),
    }
    # mode -> (linear.ONEDNN, linear.SKINNY_ROWS), and the cases it runs
    skinny = linear.SKINNY_ROWS
    modes = {"onednn": (True, skinny, cases | small), "mkl": (False, skinny, cases), "onednn_only": (True, (), small)}
    threads = torch.get_num_threads()
    was, mkl_max_weight = linear.ONEDNN, linear.MKL_MAX_WEIGHT
    times: dict[str, dict[str, list[float]]] = {case: {mode: [] for mode in modes} for case in cases | small}
    differences: dict[str, float] = {}

    def compare(fn: Callable[[], Any], a_mode: str, b_mode: str) -> float:
        outputs = []
        for mode in (a_mode, b_mode):
            linear.ONEDNN, linear.SKINNY_ROWS = modes[mode][:2]
            out = fn()
            outputs.append(torch.cat(out, dim=1) if isinstance(out, list) else out)
        a, b = outputs
        return float((a - b).abs().max() / b.abs().max())

    try:
        torch.set_num_threads(1)
        linear.MKL_MAX_WEIGHT = 0  # the kernels as named, whatever peerd takes on this CPU (linear.py)
        for r in range(rounds):
            for mode in list(modes) if r % 2 == 0 else list(reversed(modes)):
                linear.ONEDNN, linear.SKINNY_ROWS, runs = modes[mode]
                for case, fn in runs.items():
                    fn()  # warm: the kernel's primitives, the caches' pages
                    times[case][mode].append(_median_ms(fn, calls))
        for case, fn in cases.items():
            differences[case] = compare(fn, "onednn", "mkl")
        for case, fn in small.items():
            differences[case] = compare(fn, "onednn", "onednn_only")
    finally:
        linear.ONEDNN, linear.SKINNY_ROWS, linear.MKL_MAX_WEIGHT = was, skinny, mkl_max_weight
        torch.set_num_threads(threads)

    def entry(case: str, fast: str, slow: str, fast_key: str, slow_key: str) -> dict[str, float]:
        fast_ms, slow_ms = statistics.median(times[case][fast]), statistics.median(times[case][slow])
        return {
            fast_key: fast_ms,
            slow_key: slow_ms,
            "speedup": slow_ms / fast_ms,
            "max_relative_difference": differences[case],
        }

    result: dict[str, Any] = {
        "onednn_available": linear._KERNEL is not None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_max_weight": mkl_max_weight,  # weights this small take MKL here whatever the rows compare
        "rounds": rounds,
        "cases": {case: entry(case, "onednn", "mkl", "onednn_ms", "mkl_ms") for case in cases},
        # products over 2-4 rows as Linear runs them (MKL, weight on the left) against oneDNN's
        "small_rows": {case: entry(case, "onednn", "onednn_only", "weight_left_ms", "onednn_ms") for case in small},
    }
    return result


def kernels_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    if not result["onednn_available"]:
        return [("oneDNN products", "n/a", "this torch build has no oneDNN linear kernel: MKL everywhere")]
    rule = (
        f"weights of up to {result['mkl_max_weight']} elements take MKL, larger ones the rules below"
        if result.get("mkl_max_weight")
        else "oneDNN, MKL weight-left for 2-4 short rows"
    )
    return (
        [("kernels peerd takes here", str(result.get("cpu_capability", "?")), rule)]
        + [
            (
                f"oneDNN vs MKL: {case}",
                f"{c['speedup']:.2f}x",
                f"{c['onednn_ms']:.2f} vs {c['mkl_ms']:.2f} ms, float32, 1 thread; "
                f"outputs differ by {c['max_relative_difference']:.1e} (relative)",
            )
            for case, c in result["cases"].items()
        ]
        + [
            (
                f"2-4 rows, MKL weight-left vs oneDNN: {case}",
                f"{c['speedup']:.2f}x",
                f"{c['weight_left_ms']:.2f} vs {c['onednn_ms']:.2f} ms, float32, 1 thread; "
                f"outputs differ by {c['max_relative_difference']:.1e} (relative)",
            )
            for case, c in result.get("small_rows", {}).items()
        ]
    )

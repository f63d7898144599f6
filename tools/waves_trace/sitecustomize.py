"""Diagnostic for tools/probe_waves.py, not part of peerd: traces every batch a peer's runtime runs.

Put this folder first on PYTHONPATH and set PROBE_TRACE_DIR; every Python process started so (the
peers that tools/probe_waves.py spawns) then appends one line per event to
``$PROBE_TRACE_DIR/trace-<pid>.txt`` once ``peerd.server.runtime`` is imported:

* ``B start end size cpu wait spread``: a batch on the compute thread (``time.monotonic`` start and
  end, steps, the thread's CPU seconds, seconds from its last and its first step's arrival to start)
* ``I start end 1 cpu 0 0``: a step run inline on the event loop
* ``F start end 0 0 0 0``: the time the compute thread spent filling a batch (waiting for steps)
"""

import builtins
import os
import sys
import time

_DIR = os.environ.get("PROBE_TRACE_DIR")
_real_import = builtins.__import__


def _patch() -> None:
    from peerd.server import runtime as rt

    out = open(os.path.join(_DIR, f"trace-{os.getpid()}.txt"), "a", buffering=1)  # noqa: SIM115 (lives as long as the process)
    run_steps, run_inline, fill = rt.ComputeRuntime._run_steps, rt.ComputeRuntime._run_inline, rt.ComputeRuntime._fill

    def traced_steps(self, jobs):  # type: ignore[no-untyped-def]
        t0, c0, p0 = time.monotonic(), time.thread_time(), time.perf_counter()
        arrivals = [j.enqueued_at for j in jobs]
        try:
            return run_steps(self, jobs)
        finally:
            cpu = time.thread_time() - c0
            wait, spread = p0 - max(arrivals), p0 - min(arrivals)
            out.write(f"B {t0:.6f} {time.monotonic():.6f} {len(jobs)} {cpu:.6f} {wait:.6f} {spread:.6f}\n")

    def traced_inline(self, payload, runner, owner):  # type: ignore[no-untyped-def]
        t0, c0 = time.monotonic(), time.thread_time()
        try:
            return run_inline(self, payload, runner, owner)
        finally:
            out.write(f"I {t0:.6f} {time.monotonic():.6f} 1 {time.thread_time() - c0:.6f} 0 0\n")

    def traced_fill(self, *args):  # type: ignore[no-untyped-def]
        t0 = time.monotonic()
        try:
            return fill(self, *args)
        finally:
            out.write(f"F {t0:.6f} {time.monotonic():.6f} 0 0 0 0\n")

    rt.ComputeRuntime._run_steps = traced_steps
    rt.ComputeRuntime._run_inline = traced_inline
    rt.ComputeRuntime._fill = traced_fill


_patched: list[bool] = []


def _hook(name, *args, **kwargs):  # type: ignore[no-untyped-def]
    module = _real_import(name, *args, **kwargs)
    # once fully imported; imports nest, so the frames of the enclosing imports get here too
    if not _patched and hasattr(sys.modules.get("peerd.server.runtime"), "_await"):
        _patched.append(True)
        builtins.__import__ = _real_import
        _patch()
    return module


if _DIR:
    builtins.__import__ = _hook

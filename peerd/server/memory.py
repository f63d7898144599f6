"""How much memory backward requests take on a server, measured where it is spent.

A backward request recomputes its blocks' forward with autograd on (activation checkpointing) and
frees everything when it answers. :class:`ActivationMeter` makes that checkable: every tensor the
recomputed forward saves for backward passes through ``torch.autograd.graph.saved_tensors_hooks``,
so the meter counts activation bytes exactly (each storage once; weights, which are saved by every
matmul but are not activations, excluded) and knows when autograd lets go of them. ``live_bytes``
returns to 0 after every request when nothing is kept across requests; ``peak_bytes`` is bounded
by the largest single request, because the compute runtime runs one job at a time, however many
clients have requests in flight. On CUDA it also reads the allocator's exact peak for the request
(activations plus transients such as attention scores); CPU torch has no such counter.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = ["ActivationMeter"]


class _Saved:
    """A saved activation in autograd's hands; tells the meter when autograd drops it."""

    __slots__ = ("key", "meter", "tensor")

    def __init__(self, tensor: Tensor, meter: ActivationMeter, key: int) -> None:
        self.tensor = tensor
        self.meter = meter
        self.key = key

    def __del__(self) -> None:
        self.meter._release(self.key)


class ActivationMeter:
    """Counts activation bytes saved for backward on one stage: live now, peak ever, and per request.

    Use ``with meter.track(): ...`` around a request's differentiable compute (on the compute
    thread). Counters are plain ints behind a lock: autograd may free saved tensors on another
    thread (CUDA's backward threads).
    """

    def __init__(self, parameters: Iterable[Tensor], device: torch.device | str = "cpu") -> None:
        self._weights = {p.untyped_storage().data_ptr() for p in parameters}
        self.device = torch.device(device)
        self._lock = threading.RLock()  # re-entrant: a GC pass inside pack() may run _Saved.__del__
        self._refs: dict[int, list[int]] = {}  # storage pointer -> [references held by autograd, bytes]
        self.live_bytes = 0  # activation bytes autograd holds right now (0 between requests)
        self.peak_bytes = 0  # most ever held at once
        self.last_request_bytes = 0  # activation bytes of the latest tracked request
        self.last_request_device_peak_bytes = 0  # CUDA only: allocator peak above the start of the request
        self.requests = 0

    @contextmanager
    def track(self) -> Iterator[None]:
        """Count what autograd saves inside this block (one request)."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        start_live = self.live_bytes
        request_peak = [0]

        def pack(tensor: Tensor) -> Any:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in self._weights or storage.nbytes() == 0:
                return tensor
            with self._lock:
                ref = self._refs.get(key)
                if ref is None:
                    self._refs[key] = [1, storage.nbytes()]
                    self.live_bytes += storage.nbytes()
                    self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                    request_peak[0] = max(request_peak[0], self.live_bytes - start_live)
                else:
                    ref[0] += 1
            # A detached alias (same storage, same version counter): holding the tensor itself would
            # tie a saved *output* to its own grad_fn, a cycle through C++ that no gc can break.
            return _Saved(tensor.detach(), self, key)

        def unpack(saved: Any) -> Tensor:
            return saved.tensor if isinstance(saved, _Saved) else saved  # type: ignore[no-any-return]

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                yield
        finally:
            self.requests += 1
            self.last_request_bytes = request_peak[0]
            if cuda:
                self.last_request_device_peak_bytes = torch.cuda.max_memory_allocated(self.device) - base

    def _release(self, key: int) -> None:
        with self._lock:
            ref = self._refs.get(key)
            if ref is None:
                return
            ref[0] -= 1
            if ref[0] == 0:
                self.live_bytes -= ref[1]
                del self._refs[key]

    def snapshot(self) -> dict[str, int]:
        """Counters for ``info`` (plain ints, wire-safe)."""
        with self._lock:
            return {
                "activation_live_bytes": self.live_bytes,
                "activation_peak_bytes": self.peak_bytes,
                "activation_last_request_bytes": self.last_request_bytes,
                "device_last_request_peak_bytes": self.last_request_device_peak_bytes,
                "backward_requests": self.requests,
            }

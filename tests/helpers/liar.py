"""A stage wrapper that makes a peer return wrong hidden states (test-only liar, docs/security.md)."""

from __future__ import annotations

from typing import Any

import torch


class PerturbedStage:
    """Wraps a stage so that every output is wrong by ``scale`` x its own spread."""

    def __init__(self, stage: Any, scale: float) -> None:
        self._stage, self._scale = stage, scale
        self.lies = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stage, name)

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self._stage.forward(hidden, *args, **kwargs)
        self.lies += 1
        noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(self.lies), dtype=torch.float32)
        return out + self._scale * out.std() * noise.to(out.dtype)

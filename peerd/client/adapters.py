"""Trainable parameters on the client's side of the network boundary: a soft prompt and low-rank adapters.

The swarm's blocks are frozen and shared by everyone, so a client can only train what it runs
itself, or what enters the blocks as input:

* **soft prompt** -- ``prompt_tokens`` trainable vectors prepended to every sequence's embeddings
  (prompt tuning). They pass through every remote block; their gradient comes back through the
  backward RPCs.
* **LoRA on the LM head** -- ``logits = W norm(h) + (alpha / r) B A norm(h)``: adapts the output
  distribution. Entirely local.
* **LoRA on the token embeddings** -- ``E[ids] + (alpha / r) A[ids] B`` (the embedding LoRA layout of
  PEFT): adapts what each token means on the way in; its gradient also crosses the swarm.

Not adapted: the attention and MLP weights inside the blocks. LoRA there would need every server
to hold each client's adapter and compute with it -- per-client state on volunteer machines, a
wire format for weights, and trust that a server applies them -- while our servers keep nothing
per client between requests. Everything here is a few megabytes at most and stays on the client.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from peerd.model.head import ClientHead

__all__ = ["ClientAdapter"]

_FORMAT = "peerd-client-adapter"
_VERSION = "1"


class ClientAdapter(nn.Module):
    """A soft prompt and/or LoRA deltas around a frozen :class:`ClientHead`; only these parameters train.

    :meth:`embed` maps token ids ``[batch, n]`` to hidden states ``[batch, prefix_length + n,
    hidden]`` (the soft prompt first, when ``with_prompt``); :meth:`logits` maps final hidden states
    to logits with the head's LoRA applied. A rank of 0 disables that adapter. LoRA ``B`` matrices
    start at zero, so a fresh adapter with no prompt changes nothing. The soft prompt starts as the
    embeddings of ``init_prompt_ids`` (or of random vocabulary tokens), a better start than noise.
    Save with :meth:`save`, restore with :meth:`load`.
    """

    def __init__(
        self,
        head: ClientHead,
        *,
        prompt_tokens: int = 0,
        head_rank: int = 0,
        embed_rank: int = 0,
        alpha: float = 16.0,
        init_prompt_ids: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if min(prompt_tokens, head_rank, embed_rank) < 0:
            raise ValueError("prompt_tokens and ranks must be >= 0")
        self.head = head  # frozen; not part of this module's saved state
        self.head.requires_grad_(False)
        self.prompt_tokens = prompt_tokens
        self.head_rank = head_rank
        self.embed_rank = embed_rank
        self.alpha = alpha
        config = head.config
        hidden, vocab = config.hidden_size, config.vocab_size
        generator = torch.Generator().manual_seed(seed)
        self.prompt: nn.Parameter | None = None
        if prompt_tokens:
            ids = list(init_prompt_ids or [])[:prompt_tokens]
            ids += torch.randint(0, vocab, (prompt_tokens - len(ids),), generator=generator).tolist()
            with torch.no_grad():
                init = head.embed_tokens.weight[torch.tensor(ids)].float().clone()  # [prompt_tokens, hidden]
            self.prompt = nn.Parameter(init)
        self.head_lora_a: nn.Parameter | None = None
        self.head_lora_b: nn.Parameter | None = None
        if head_rank:
            a = torch.randn(head_rank, hidden, generator=generator) / hidden**0.5  # [r, hidden]
            self.head_lora_a = nn.Parameter(a)
            self.head_lora_b = nn.Parameter(torch.zeros(vocab, head_rank))  # [vocab, r]
        self.embed_lora_a: nn.Parameter | None = None
        self.embed_lora_b: nn.Parameter | None = None
        if embed_rank:
            self.embed_lora_a = nn.Parameter(torch.zeros(vocab, embed_rank))  # [vocab, r]
            self.embed_lora_b = nn.Parameter(torch.randn(embed_rank, hidden, generator=generator))  # [r, hidden]

    @property
    def prefix_length(self) -> int:
        """Positions the soft prompt occupies before the real tokens (a session must hold them too)."""
        return self.prompt_tokens

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters an optimizer should train (the frozen head excluded), by saved name."""
        return {name: p for name, p in self.named_parameters() if not name.startswith("head.")}

    def embed(self, input_ids: Tensor, *, with_prompt: bool = True) -> Tensor:
        """Hidden states ``[batch, prefix + n, hidden]`` for ``input_ids [batch, n]``; prefix 0 without prompt."""
        hidden = self.head.embed(input_ids)  # [batch, n, hidden], frozen
        if self.embed_lora_a is not None and self.embed_lora_b is not None:
            delta = self.embed_lora_a[input_ids] @ self.embed_lora_b  # [batch, n, hidden]
            hidden = hidden + (self.alpha / self.embed_rank) * delta.to(hidden.dtype)
        if self.prompt is not None and with_prompt:
            prompt = self.prompt.to(hidden.dtype).expand(hidden.shape[0], -1, -1)  # [batch, prefix, hidden]
            hidden = torch.cat([prompt, hidden], dim=1)  # [batch, prefix + n, hidden]
        return hidden

    def logits(self, hidden: Tensor) -> Tensor:
        """Logits ``[batch, n, vocab]`` from final hidden states, with the head's LoRA delta added."""
        if self.head_lora_a is None or self.head_lora_b is None:
            return self.head.logits(hidden)
        normed = self.head.norm(hidden)  # [batch, n, hidden]
        delta = (normed.float() @ self.head_lora_a.T) @ self.head_lora_b.T  # [batch, n, vocab]
        return self.head.lm_head(normed) + (self.alpha / self.head_rank) * delta.to(normed.dtype)  # type: ignore[no-any-return]

    def save(self, path: str | Path, *, model_id: str = "") -> Path:
        """Write the trainable parameters to a safetensors file, shapes and settings in its metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().float().contiguous().cpu() for name, p in self.trainable_parameters().items()}
        metadata = {
            "format": _FORMAT,
            "version": _VERSION,
            "model_id": model_id,
            "settings": json.dumps(
                {
                    "prompt_tokens": self.prompt_tokens,
                    "head_rank": self.head_rank,
                    "embed_rank": self.embed_rank,
                    "alpha": self.alpha,
                    "hidden_size": self.head.config.hidden_size,
                    "vocab_size": self.head.config.vocab_size,
                }
            ),
        }
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path, head: ClientHead) -> ClientAdapter:
        """An adapter saved by :meth:`save`, on ``head``; ValueError if it was trained for another shape."""
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _FORMAT:
                raise ValueError(f"{path} is not a peerd client adapter (metadata format {metadata.get('format')!r})")
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        settings = json.loads(metadata["settings"])
        config = head.config
        if (settings["hidden_size"], settings["vocab_size"]) != (config.hidden_size, config.vocab_size):
            raise ValueError(
                f"{path} was trained for hidden {settings['hidden_size']} / vocab {settings['vocab_size']}, "
                f"this model has {config.hidden_size} / {config.vocab_size}"
            )
        adapter = cls(
            head,
            prompt_tokens=settings["prompt_tokens"],
            head_rank=settings["head_rank"],
            embed_rank=settings["embed_rank"],
            alpha=settings["alpha"],
        )
        missing = set(adapter.trainable_parameters()) ^ set(tensors)
        if missing:
            raise ValueError(f"{path} does not match its own settings: tensors {sorted(missing)} differ")
        with torch.no_grad():
            for name, param in adapter.trainable_parameters().items():
                param.copy_(tensors[name])
        return adapter

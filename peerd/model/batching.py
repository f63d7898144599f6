"""Stage forwards for a serving peer: many sessions' steps in one forward, and long work in chunks.

``forward_batch`` runs the steps of several sessions, each with its own KV cache, length and
position, as one forward: every token of every step is one row of the dense parts (norms, q/k/v and
output projections, MLP), which is where a step's time goes at small batch; attention then runs per
session on that session's own cache (RoPE is applied to all rows at once, each by its own
position). The caches stay where they are (no gather into a padded slab,
no copy per step), so a session joins or leaves a batch between any two steps at no cost.

``forward_chunks`` and ``backward_chunks`` are generators that do a large request one bounded chunk
at a time (a window of tokens through one block), yielding the chunk's cost (tokens x blocks), so
the peer's compute thread can run other clients' decode steps between chunks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor

from peerd.model.linear import onednn_on
from peerd.model.llama import Block, RotaryEmbedding, apply_rotary, attention_mask
from peerd.model.stage import KVCache, Stage

__all__ = [
    "BACKWARD_COST_FACTOR",
    "CPU_MIN_ROWS",
    "StepInput",
    "backward_chunks",
    "cpu_padding_rows",
    "forward_batch",
    "forward_chunks",
    "min_shared_rows",
]

# A backward recomputes the forward, then runs autograd through it: about three forwards of work.
BACKWARD_COST_FACTOR = 3.0
# Where the dense parts' float32 products on a CPU are MKL's (``F.linear``; peerd.model.linear
# runs oneDNN's instead unless switched off), a batch of 2 or 3 rows runs them with zero rows added
# up to this many: MKL's products over 2-3 rows are slower than over 4 (measured on the AVX-512 dev
# box, 60 [1536 x 576] weights streamed from memory: 1 row 19 ms, 2 rows 30, 3 rows 34, 4 rows 24; a
# batch of 2 or 3 SmolLM2 decode steps through 10 blocks took 24.1-24.8 / 27.9-28.6 ms of CPU
# unpadded, 22.3-23.4 / 22.3-23.9 ms padded, alternating runs). oneDNN's have no such step (10
# blocks: 2 rows 11.8 ms unpadded, 12.9 padded), so they run unpadded (and their products over 2-4
# rows take MKL with the weight on the left, which pads 3 rows to 4 itself: peerd.model.linear).
# Such batches are common when sessions move through a pipeline as many small waves (a loaded box).
# Rows are independent in every dense part, so padding changes no real row's result beyond the
# rounding of another kernel (as any batch, within the 1e-5 of forward_batch's contract).
CPU_MIN_ROWS = 4


@dataclass
class StepInput:
    """One session's step: ``hidden [batch, n, hidden_size]`` written to ``cache`` from ``position``."""

    hidden: Tensor
    cache: KVCache
    position: int


def forward_batch(stage: Stage, steps: Sequence[StepInput], start: int, end: int) -> list[Tensor | ValueError]:
    """Blocks ``[start, end)`` applied to every step at once; per step its output, or the
    ``ValueError`` :meth:`Stage.forward` would raise (a bad step never runs, the others do).

    Equal to running the steps one by one through :meth:`Stage.forward` up to float rounding (the
    dense parts see more rows; tested to 1e-5 in float32). Runs without autograd.
    """
    results: list[Tensor | ValueError] = []
    good: list[int] = []
    for i, step in enumerate(steps):
        try:
            stage.check_step(step.hidden, step.cache, step.position, start, end)
        except ValueError as exc:
            results.append(exc)
        else:
            results.append(step.hidden)  # replaced by its output below
            good.append(i)
    if not good:
        return results
    runs = [steps[i] for i in good]
    with torch.no_grad():
        outputs = _forward_rows(stage, runs, start, end)
    for i, out in zip(good, outputs, strict=True):
        results[i] = out
        steps[i].cache.length = steps[i].position + steps[i].hidden.shape[1]
    return results


def _forward_rows(stage: Stage, steps: Sequence[StepInput], start: int, end: int) -> list[Tensor]:
    config = stage.config
    hidden_size = config.hidden_size
    shapes = [(s.hidden.shape[0], s.hidden.shape[1]) for s in steps]
    rows = _slices([b * n for b, n in shapes])
    x = torch.cat([s.hidden.reshape(-1, hidden_size) for s in steps])  # [rows of all steps, hidden]
    pad = cpu_padding_rows(x)
    x = torch.cat([x, x.new_zeros(pad, hidden_size)]) if pad else x  # [rows + pad, hidden]
    # RoPE angles per row (row = one token of one sequence), for all rows at once: full-attention
    # blocks' and, if any, sliding blocks' own; attention masks per step, as Stage.forward builds them
    positions = torch.tensor([s.position + t for s, (b, n) in zip(steps, shapes, strict=True)
                              for _ in range(b) for t in range(n)] + [0] * pad, device=x.device)  # fmt: skip
    local = getattr(stage, "local_rotary", None) or stage.rotary  # sliding blocks' own RoPE, if any
    angles = [_row_angles(rotary, positions, x) for rotary in (stage.rotary, local)]
    masks = []  # per step: (full-attention mask, sliding-window mask)
    for s, (_, n) in zip(steps, shapes, strict=True):
        full = attention_mask(n, s.position + n, config.num_queries_per_kv, x.device)
        sliding = full
        if config.sliding_window is not None:
            sliding = attention_mask(n, s.position + n, config.num_queries_per_kv, x.device, config.sliding_window)
        masks.append((full, sliding))
    heads, kv_heads, dim = config.num_heads, config.num_kv_heads, config.head_dim
    for index in range(start, end):
        block = stage.layers[str(index)]
        assert isinstance(block, Block)  # built by Stage; narrows the ModuleDict's type
        attn = block.self_attn
        h = block.input_layernorm(x)
        q = attn.q_proj(h).view(-1, heads, dim)  # [rows, heads, dim]
        k = attn.k_proj(h).view(-1, kv_heads, dim)
        v = attn.v_proj(h).view(-1, kv_heads, dim)
        if hasattr(attn, "q_norm"):  # per head, before RoPE (Qwen3, Gemma 3)
            q, k = attn.q_norm(q), attn.k_norm(k)
        which = 1 if config.is_sliding(index) else 0
        cos, sin = angles[which]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # every row by its own position
        attended = torch.empty(x.shape[0], heads * dim, dtype=x.dtype, device=x.device)
        attended[x.shape[0] - pad :] = 0  # padding rows attend to nothing
        slot = index - stage.start
        for s, (b, n), r, mask in zip(steps, shapes, rows, masks, strict=True):
            ck, cv = s.cache.keys[slot], s.cache.values[slot]
            if b == 1 and n == 1 and mask[which] is None:  # a decode step: no reshapes, no mask
                ck[:, :, s.position], cv[:, :, s.position] = k[r], v[r]
                attended[r] = attn.attend_one(q[r], ck, cv, s.position + 1)
                continue
            qi = q[r].view(b, n, heads, dim).transpose(1, 2)  # [b, heads, n, dim]
            ki, vi = (t[r].view(b, n, kv_heads, dim).transpose(1, 2) for t in (k, v))  # [b, kv_heads, n, dim]
            attended[r] = attn.attend_rotated(qi, ki, vi, mask[which], ck, cv, s.position).view(b * n, -1)
        attended = attn.o_proj(attended)  # [rows, hidden]
        # the block's own residual layout (Block.forward): plain, or Gemma's sandwich norms
        feed_forward = getattr(block, block.feed_forward_name)
        if not block.sandwich:
            x = x + attended
            x = x + feed_forward(block.post_attention_layernorm(x).unsqueeze(0)).squeeze(0)
        else:
            x = x + block.post_attention_layernorm(attended)
            ff_in = block.pre_feedforward_layernorm(x).unsqueeze(0)  # [1, rows, hidden]: MoE wants 3-D
            x = x + block.post_feedforward_layernorm(feed_forward(ff_in).squeeze(0))
    return [x[r].view(b, n, hidden_size) for r, (b, n) in zip(rows, shapes, strict=True)]


def min_shared_rows(x: Tensor) -> int:
    """Fewest rows worth one shared pass for rows like ``x``: :data:`CPU_MIN_ROWS` where the products
    are MKL's float32 ones on a CPU, else 1 (any batch is cheaper than its rows one by one)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and not onednn_on():
        return CPU_MIN_ROWS
    return 1


def cpu_padding_rows(x: Tensor) -> int:
    """Zero rows to add to a batch's rows ``x [rows, ...]`` before its dense parts (see :data:`CPU_MIN_ROWS`)."""
    rows, least = x.shape[0], min_shared_rows(x)
    return least - rows if 2 <= rows < least else 0


def _row_angles(rotary: RotaryEmbedding, positions: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin ``[rows, 1, head_dim]`` of each row's position, from ``rotary``'s shared table."""
    cos, sin = rotary.cos_sin(0, int(positions.max()) + 1, dtype=x.dtype, device=x.device)
    return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)


def _slices(sizes: Sequence[int]) -> list[slice]:
    out, offset = [], 0
    for size in sizes:
        out.append(slice(offset, offset + size))
        offset += size
    return out


def forward_chunks(
    stage: Stage,
    hidden: Tensor,
    cache: KVCache | None,
    position: int,
    start: int,
    end: int,
    chunk_tokens: int,
) -> Generator[float, None, Tensor]:
    """:meth:`Stage.forward` done a window of about ``chunk_tokens`` tokens (all rows) through one
    block at a time; yields each chunk's cost (tokens x 1 block) and returns the output.

    Without a cache (a stateless forward) a one-block scratch cache carries the earlier windows'
    keys and values, so causal attention sees exactly what the whole-sequence forward sees. Each
    chunk runs in inference mode on its own: nothing is left switched on while other work runs
    between chunks.
    """
    start, end = stage.check_step(hidden, cache, position, start, end)
    batch, n, _ = hidden.shape
    window = max(1, chunk_tokens // batch)
    groups = stage.config.num_queries_per_kv
    if cache is None:
        position = 0
        config = stage.config
        shape = (1, batch, config.num_kv_heads, n, config.head_dim)  # one block's keys, reused by each
        cache = KVCache(
            torch.zeros(shape, dtype=stage.dtype, device=stage.device),
            torch.zeros(shape, dtype=stage.dtype, device=stage.device),
        )
        scratch = True
    else:
        scratch = False
    x = hidden
    for index in range(start, end):
        out = torch.empty_like(x)
        slot = 0 if scratch else index - stage.start
        kv = cache
        for w0 in range(0, n, window):
            w1 = min(n, w0 + window)
            p = position + w0
            with torch.inference_mode():
                sliding = stage.config.is_sliding(index)  # that block's own RoPE and window, as Stage.forward
                rotary = (getattr(stage, "local_rotary", None) or stage.rotary) if sliding else stage.rotary
                cos, sin = rotary.cos_sin(p, w1 - w0, dtype=x.dtype, device=x.device)
                window_keys = stage.config.sliding_window if sliding else None
                mask = attention_mask(w1 - w0, p + w1 - w0, groups, x.device, window_keys)
                block = stage.layers[str(index)]
                out[:, w0:w1] = block(x[:, w0:w1], cos, sin, mask, kv.keys[slot], kv.values[slot], p)
            yield float(batch * (w1 - w0))
        x = out
    if not scratch:
        cache.length = position + n
    return x


def backward_chunks(
    stage: Stage,
    hidden: Tensor,
    grad_output: Tensor,
    start: int,
    end: int,
    chunk_tokens: int,
    track: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
) -> Generator[float, None, Tensor]:
    """Gradient of blocks ``[start, end)`` w.r.t. ``hidden``, a group of rows at a time.

    Rows of a batch are independent, so each chunk recomputes the forward of about ``chunk_tokens``
    tokens' worth of whole rows with autograd and takes their gradient (a single row longer than
    that is one chunk: attention over a sequence does not split without storing its activations).
    ``track`` wraps each chunk's autograd work (a server counts the activations it saves).
    """
    start, end = stage.check_step(hidden, None, 0, start, end)
    batch, n, _ = hidden.shape
    rows = max(1, chunk_tokens // n)
    grads = []
    for r0 in range(0, batch, rows):
        with torch.enable_grad(), track():
            x = hidden[r0 : r0 + rows].detach().requires_grad_(True)
            y = stage.forward(x, start=start, end=end)
            (grad,) = torch.autograd.grad(y, x, grad_output[r0 : r0 + rows])
        grads.append(grad)
        yield BACKWARD_COST_FACTOR * x.shape[0] * n * (end - start)
    return torch.cat(grads)

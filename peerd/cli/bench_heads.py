"""Concurrent generations from one client, with the client's LM head batched or one pass per request.

``make bench``'s load part steps sessions with random hidden states, so the client's own work per
token (the LM head, sampling) is not in it. Here one ``SwarmClient`` (as behind the OpenAI API)
runs N greedy generations of the bench prompt at once, in alternating rounds: the head batched
(``HeadBatcher``'s default) and one head pass per request (``max_rows = 1``), plus one generation
alone for scale. Aggregate tokens/s count every generated token over the span of the round.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

__all__ = ["head_ceiling", "heads_rows", "run_heads_bench"]

MAX_ROWS = 64  # HeadBatcher's default


async def _round(client: Any, prompt: list[int], n: int, tokens: int) -> tuple[float, list[list[int]]]:
    started = time.perf_counter()
    results = await asyncio.gather(
        *(client.generate(prompt, max_new_tokens=tokens, stop_on_eos=False) for _ in range(n))
    )
    elapsed = time.perf_counter() - started
    return sum(len(r.token_ids) for r in results) / elapsed, [r.token_ids for r in results]


async def run_heads_bench(
    initial_peers: list[str],
    path: Path,
    model_id: str,
    prompt: list[int],
    *,
    n: int = 16,
    tokens: int = 16,
    rounds: int = 4,
) -> dict[str, Any]:
    """Aggregate tokens/s of ``n`` concurrent generations, head batched vs not, alternated ``rounds`` times."""
    from peerd.client import SwarmClient

    client = await SwarmClient.connect(initial_peers, path, model_id=model_id)
    batched_rows = client.heads.max_rows
    tps: dict[str, list[float]] = {"one": [], "unbatched": [], "batched": []}
    outputs: dict[str, list[list[int]]] = {}
    per_pass: dict[str, list[float]] = {mode: [] for mode in tps}  # positions per head pass
    try:
        await client.wait_for_route(timeout_s=60)
        await _round(client, prompt, 1, 2)  # warm-up: route, connections
        for r in range(rounds):
            # the two modes swap places every round: the run right after a lone generation is faster
            modes = ("one", "unbatched", "batched") if r % 2 == 0 else ("one", "batched", "unbatched")
            for mode in modes:
                client.heads.max_rows = 1 if mode == "unbatched" else batched_rows
                passes, rows = client.heads.batches, client.heads.rows
                rate, outputs[mode] = await _round(client, prompt, 1 if mode == "one" else n, tokens)
                tps[mode].append(rate)
                per_pass[mode].append((client.heads.rows - rows) / max(1, client.heads.batches - passes))
            print(
                f"      round {r + 1}: 1 generation {tps['one'][-1]:5.1f} tok/s   {n} with one head pass each "
                f"{tps['unbatched'][-1]:5.1f} tok/s   {n} with the head batched {tps['batched'][-1]:5.1f} tok/s",
                flush=True,
            )
    finally:
        await client.close()
    med = {mode: statistics.median(values) for mode, values in tps.items()}
    return {
        "generations": n,
        "tokens": tokens,
        "tokens_per_s": tps,
        "batched_vs_unbatched": med["batched"] / med["unbatched"],
        "batched_vs_one": med["batched"] / med["one"],
        "unbatched_vs_one": med["unbatched"] / med["one"],
        "positions_per_head_pass": per_pass,
        # greedy, so every generation of a round should agree; batched passes may round differently
        "ceiling": await head_ceiling(path),
        "outputs_identical": all(o == outputs["one"][0] for mode in ("unbatched", "batched") for o in outputs[mode]),
    }


async def head_ceiling(path: Path, *, n: int = 16, steps: int = 12) -> dict[str, float]:
    """The head alone, in process: ``n`` requests at a time for ``steps`` rounds, batched vs one pass each
    (the most the batcher can save a client whose generations all wait for logits together)."""
    import torch

    from peerd.client.heads import HeadBatcher
    from peerd.model.loading import load_client_head

    head = load_client_head(path, progress=False)
    heads = HeadBatcher()
    hidden = [torch.randn(1, 1, head.config.hidden_size) for _ in range(n)]
    rates: dict[str, list[float]] = {"unbatched": [], "batched": []}
    try:
        await heads.logits(head, hidden[0])  # warm-up
        for _ in range(2):
            for mode, rows in (("unbatched", 1), ("batched", MAX_ROWS)):
                heads.max_rows = rows
                started = time.perf_counter()
                for _ in range(steps):
                    await asyncio.gather(*(heads.logits(head, h) for h in hidden))
                rates[mode].append(n * steps / (time.perf_counter() - started))
    finally:
        heads.close()
    batched, unbatched = statistics.median(rates["batched"]), statistics.median(rates["unbatched"])
    return {"batched_tokens_per_s": batched, "unbatched_tokens_per_s": unbatched, "ratio": batched / unbatched}


def heads_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    n, ceiling = result["generations"], result["ceiling"]
    per_pass = statistics.median(result["positions_per_head_pass"]["batched"])
    return [
        (
            f"client head, {n} requests at once",
            f"{ceiling['ratio']:.2f}x",
            f"batched vs one pass each, in process: {ceiling['batched_tokens_per_s']:.0f} vs "
            f"{ceiling['unbatched_tokens_per_s']:.0f} tokens/s of logits",
        ),
        (
            f"{n} generations, head batched",
            f"{result['batched_vs_unbatched']:.2f}x",
            f"aggregate tok/s vs one head pass per request; {result['batched_vs_one']:.2f}x vs 1 generation "
            f"({result['unbatched_vs_one']:.2f}x unbatched); {per_pass:.1f} positions per head pass; "
            f"outputs identical: {result['outputs_identical']}",
        ),
    ]

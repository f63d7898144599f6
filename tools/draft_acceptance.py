"""How often a local draft model's guesses would land, without a swarm: greedy replay in process.

The target model's greedy output of each bench prompt (tools/bench_latency.py) says which guesses a
swarm would confirm (greedy verification is deterministic), so a draft model's acceptance rate and
tokens per step can be measured on one machine. ``--early-exit K`` builds an "early exit" draft from
the target itself: its first K blocks, then its own final norm and head (no training).

    .venv/bin/python tools/draft_acceptance.py --early-exit 4 10
    .venv/bin/python tools/draft_acceptance.py --draft /path/to/small-model
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from bench_latency import PROMPTS  # tools/ is on sys.path when this file runs as a script

from peerd.client.draft_model import ModelDrafter, check_draft_model
from peerd.client.speculative import Speculation
from peerd.model.chat import load_tokenizer
from peerd.model.loading import load_local_model
from peerd.model.local import LocalModel
from peerd.model.registry import resolve_model


def early_exit(path: Path, blocks: int, workdir: Path) -> Path:
    """A model folder that reads ``path``'s weights but has only its first ``blocks`` blocks."""
    out = workdir / f"early-exit-{blocks}"
    out.mkdir()
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = blocks
    (out / "config.json").write_text(json.dumps(config))
    for file in path.iterdir():
        if file.name != "config.json":
            (out / file.name).symlink_to(file.resolve())
    return out


def replay(target_ids: list[int], prompt: list[int], draft: LocalModel) -> tuple[int, int, int, float]:
    """(guesses, accepted, steps, draft seconds) generating ``target_ids`` after ``prompt``."""
    drafter = ModelDrafter(draft, Speculation(), len(prompt) + len(target_ids))
    out: list[int] = []
    steps, spent = 0, 0.0
    while len(out) < len(target_ids):
        started = time.perf_counter()
        guesses = drafter.drafts([*prompt, *out], len(target_ids) - len(out) - 1)
        spent += time.perf_counter() - started
        accepted = 0
        while accepted < len(guesses) and guesses[accepted] == target_ids[len(out) + accepted]:
            accepted += 1
        drafter.observe(len(guesses), accepted)
        out += target_ids[len(out) : len(out) + accepted + 1]
        steps += 1
    return drafter.proposed, drafter.accepted, steps, spent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="the swarm's model (id or folder)")
    parser.add_argument("--draft", action="append", default=[], help="a draft model (id or folder; repeatable)")
    parser.add_argument("--early-exit", type=int, nargs="*", default=[], help="early-exit drafts of K blocks")
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = resolve_model(args.model)
    target, tokenizer = load_local_model(path), load_tokenizer(path)
    with tempfile.TemporaryDirectory(prefix="peerd-draft-") as tmp:
        drafts = [(d, resolve_model(d)) for d in args.draft]
        drafts += [(f"first {k} blocks", early_exit(path, k, Path(tmp))) for k in args.early_exit]
        print(f"{'draft':<20} {'prompt':<8} {'acceptance':>12} {'tokens/step':>12} {'draft ms/step':>14}")
        for name, draft_path in drafts:
            draft = load_local_model(draft_path, progress=False)
            check_draft_model(draft, target.config.vocab_size)
            for prompt_name, text in PROMPTS.items():
                prompt = tokenizer.encode(text).ids
                reference = target.generate_greedy(prompt, args.tokens, eos_token_ids=[])
                proposed, accepted, steps, spent = replay(reference, prompt, draft)
                rate = f"{accepted}/{proposed} {accepted / max(1, proposed):.2f}"
                per_step = f"{len(reference) / steps:>12.2f} {spent * 1e3 / steps:>14.1f}"
                print(f"{name:<20} {prompt_name:<8} {rate:>12} {per_step}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Score prompt-lookup drafting offline: the tokens per step each policy would get on real outputs.

Greedy verification accepts a guess exactly when it equals the greedy token at its place, so given
the greedy output of a prompt, the steps, guesses and acceptances of a speculative run follow
without a swarm (``peerd.client.lookup.replay``). This tool computes the greedy outputs of the
latency bench's prompts with the whole model in this process (or reads them from ``--reference``),
replays several drafting policies on them, and prints tokens per step, acceptance, positions
computed, a modelled time per token (``--step-ms`` per step plus ``--position-ms`` per position),
and the oracle: the fewest steps any lookup policy could take.

    python tools/draft_replay.py [--tokens 48 96] [--prompts quoting fresh] [--reference FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peerd.client.lookup import oracle_steps, replay  # noqa: E402
from peerd.client.speculative import Speculation  # noqa: E402

# the policy before the longest-match lookup, then each change on its own, then today's defaults
POLICIES = {
    "before (latest 3/2-gram, k 4..8)": Speculation(
        max_draft_tokens=8, initial_draft_tokens=4, max_ngram=3, copy_window=0, trusted_match=4
    ),
    "longest match": Speculation(max_draft_tokens=8, initial_draft_tokens=4, copy_window=0, trusted_match=33),
    "+ k 8..16": Speculation(copy_window=0, trusted_match=33),
    "+ copy pointer": Speculation(trusted_match=33),
    "+ trusted matches (defaults)": Speculation(),
}


def greedy_outputs(model: str, cache_dir: str | None, names: list[str], tokens: int) -> dict[str, dict[str, list[int]]]:
    """Prompt ids and greedy continuation (EOS not stopping it, as in the bench) of each prompt."""
    import torch
    from bench_latency import PROMPTS

    from peerd.cli.helpers import resolve
    from peerd.model.chat import ChatTemplate, chat_prompt_ids, load_tokenizer
    from peerd.model.loading import load_local_model

    torch.set_num_threads(1)
    _, path = resolve(model, cache_dir)
    tokenizer, template = load_tokenizer(path), ChatTemplate.from_folder(path)
    local = load_local_model(path, progress=False)
    out = {}
    for name in names:
        ids = chat_prompt_ids(tokenizer, template, [{"role": "user", "content": PROMPTS[name]}])
        out[name] = {"prompt": ids, "output": local.generate_greedy(ids, tokens, eos_token_ids=[])}
    return out


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO / "tools"))
    from bench_latency import PROMPTS

    parser = argparse.ArgumentParser(prog="python tools/draft_replay.py", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--tokens", type=int, nargs="+", default=[48], help="output lengths to score (default 48)")
    parser.add_argument("--prompts", nargs="+", choices=list(PROMPTS), default=list(PROMPTS))
    parser.add_argument("--reference", default=None, help="JSON of greedy outputs: read if it exists, else written")
    parser.add_argument("--step-ms", type=float, default=175.0, help="modelled cost of a step (default 175)")
    parser.add_argument("--position-ms", type=float, default=6.0, help="modelled cost per position (default 6)")
    args = parser.parse_args(argv)

    reference = Path(args.reference) if args.reference else None
    if reference is not None and reference.exists():
        outputs = json.loads(reference.read_text())
    else:
        outputs = greedy_outputs(args.model, args.cache_dir, args.prompts, max(args.tokens))
        if reference is not None:
            reference.write_text(json.dumps(outputs))
    for tokens in args.tokens:
        print(f"{tokens} new tokens: tokens/step, acceptance, positions, modelled ms/token")
        for name in args.prompts:
            prompt, output = outputs[name]["prompt"], outputs[name]["output"][:tokens]
            best = len(output) / oracle_steps(prompt, output, 16)
            print(f"  {name}: oracle (k <= 16) {best:.2f} tokens/step")
            for label, config in POLICIES.items():
                r = replay(prompt, output, config)
                ms = (args.step_ms * r.steps + args.position_ms * r.positions) / r.tokens
                print(f"    {label:34} {r.tokens_per_step:5.2f}  {r.acceptance_rate:4.2f}  {r.positions:4d}  {ms:5.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

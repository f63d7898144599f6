"""`make bench-latency`: generation over links with emulated delay: relayed, push, speculative steps.

Loopback hides what a decode step costs over the internet: round trips. Here every peer listens
behind a TCP delay shim (tests/helpers/delay_shim.py, on 127.0.0.1, in a process of its own) and
announces only the shim's address, so every connection to a peer, the client's included, pays the
shim's delay each way (the delay is read per chunk, so connections opened before a change of delay
pay the new one).
For each emulated round-trip time the same client generates greedily in four modes: client-relayed
(the client carries every hop), speculative (prompt-lookup guesses verified in one trip), push (each
peer hands its output to the next peer: server/push.py) and push + speculative, on a prompt that
copies text and on one that does not. Runs alternate the modes, so machine drift hits all alike;
we report medians, their ratios to client-relayed, the acceptance rate and time to first token,
print them and write them as JSON.

    python tools/bench_latency.py [--model ID] [--tokens N] [--rtt-ms 0 20 50 100] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# A copying task (code edit): the answer repeats most of the prompt, as edits and summaries do.
CODE = """def mean(values):
    total = 0
    for value in values:
        total = total + value
    return total / len(values)


def variance(values):
    m = mean(values)
    total = 0
    for value in values:
        total = total + (value - m) * (value - m)
    return total / len(values)
"""
COPYING = f"Rewrite this Python code exactly as it is, but rename the variable total to acc:\n\n{CODE}"
# Quoting: the answer is the prompt's text again (SmolLM2-135M rewrites the code above rather than
# copying it, but repeats prose nearly word for word).
PROSE = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single "
    "step. All that glitters is not gold. Actions speak louder than words."
)
QUOTING = f"Repeat this text word for word:\n\n{PROSE}"
FRESH = "Write a short story about a robot who learns to paint."
# Summary: asked to summarise, SmolLM2-135M repeats the paragraph (75 tokens) word for word, so
# unlike quoting (27 tokens, then the model's end-of-turn and a made-up next turn) all 48 tokens of
# the default run are the copying answer.
PARAGRAPH = (
    "The city council met on Tuesday to discuss the new bicycle lanes on Main Street. Residents said the "
    "lanes made the street safer for children walking to school, but shop owners complained that they lost "
    "parking spaces in front of their stores. The council agreed to keep the lanes for six more months and "
    "to count how many people use them before deciding."
)
SUMMARY = f"Summarise this paragraph in two sentences:\n\n{PARAGRAPH}"
PROMPTS = {"copying": COPYING, "quoting": QUOTING, "fresh": FRESH, "summary": SUMMARY}


class Shims:
    """One delay shim per peer, all in one process of their own (``delay_shim.py --control``).

    Out of the measured client's process, as a real link is: the client does not forward the
    links' bytes, and its GIL and CPU time are not the links'. ``set_rtt_ms`` holds for every chunk
    from then on, on connections already open too: the peers dial each other (through these shims)
    at start-up, at delay 0, and keep those connections for the pushes; a delay read once per
    connection left every peer-to-peer leg undelayed.
    """

    def __init__(self) -> None:
        script = REPO / "tests" / "helpers" / "delay_shim.py"
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--control"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _ask(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if not answer or answer.startswith("ERROR"):
            raise RuntimeError(f"delay shim process: {command!r} -> {answer or 'no answer (exited?)'}")
        return answer

    def add(self, target_port: int) -> int:
        """A shim in front of 127.0.0.1:``target_port``; returns the port it listens on."""
        return int(self._ask(f"add 127.0.0.1:{target_port}").split()[-1])

    def set_rtt_ms(self, rtt_ms: float) -> None:
        self._ask(f"delay {rtt_ms / 2}")  # held this long in each direction

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # EOF ends the shim process
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _level(initial_peers: list[str], path: Path, model_id: str, prompts: dict[str, list[int]], args: Any) -> Any:
    """Every prompt in every mode, ``args.rounds`` times each (mode order reversed every other round),
    through one fresh client."""
    from peerd.client import Speculation, SwarmClient

    client = await SwarmClient.connect(initial_peers, path, model_id=model_id)
    runs: dict[str, dict[str, list[Any]]] = {name: {mode: [] for mode in MODES} for name in prompts}
    try:
        await client.wait_for_route(timeout_s=120)
        for push in (False, True):  # connect, both ways
            client.push = push
            await client.generate(next(iter(prompts.values())), max_new_tokens=2, stop_on_eos=False)
        for round_ in range(args.rounds):
            for name, prompt in prompts.items():
                # odd rounds run the modes in reverse, so drift within a round favours none of them
                order = list(MODES.items()) if round_ % 2 == 0 else list(reversed(MODES.items()))
                for mode, (push, draft_tokens) in order:
                    client.push = push
                    client.speculation = Speculation() if draft_tokens else Speculation(max_draft_tokens=0)
                    runs[name][mode].append(
                        await client.generate(prompt, max_new_tokens=args.tokens, stop_on_eos=False)
                    )
    finally:
        await client.close()
    return runs


# mode -> (push on, speculative steps on)
MODES = {"relayed": (False, False), "speculative": (False, True), "push": (True, False), "push_spec": (True, True)}


def _summary(runs: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, modes in runs.items():
        tps = {mode: statistics.median(r.tokens_per_s for r in modes[mode]) for mode in MODES}
        spec = modes["speculative"] + modes["push_spec"]
        drafts = sum(r.draft_tokens for r in spec)
        row: dict[str, Any] = {f"{mode}_tokens_per_s": tps[mode] for mode in MODES}
        row.update({f"{mode}_vs_relayed": tps[mode] / tps["relayed"] for mode in MODES if mode != "relayed"})
        row.update(
            {f"{mode}_ttft_s": statistics.median(r.time_to_first_token_s for r in modes[mode]) for mode in MODES}
        )
        reference = modes["relayed"][0].token_ids
        row.update(
            {
                "push_spec_vs_push": tps["push_spec"] / tps["push"],
                "acceptance_rate": sum(r.accepted_tokens for r in spec) / drafts if drafts else 0.0,
                "tokens_per_step": statistics.median(len(r.token_ids) / r.steps for r in spec),
                "identical": all(r.token_ids == reference for runs_ in modes.values() for r in runs_),
                # per mode: the first generated token where a run left the first relayed run's (None: none did)
                "first_difference": {mode: _first_difference(reference, modes[mode]) for mode in MODES},
            }
        )
        out[name] = row
    return out


def _first_difference(reference: list[int], runs: list[Any]) -> int | None:
    """The earliest index where any of ``runs`` generated another token than ``reference`` (None: none did)."""
    firsts = []
    for run in runs:
        if run.token_ids != reference:
            pairs = enumerate(zip(run.token_ids, reference, strict=False))
            firsts.append(next((i for i, (a, b) in pairs if a != b), min(len(run.token_ids), len(reference))))
    return min(firsts) if firsts else None


def _thin_model(path: Path) -> Path:
    """A random-weight copy of ``path`` with blocks of hidden size 64 and its tokenizer and chat template."""
    import shutil
    import tempfile

    from tests.helpers.tiny_model import make_tiny_checkpoint

    config = json.loads((path / "config.json").read_text())
    out = Path(tempfile.mkdtemp(prefix="peerd-thin-")) / f"thin-{path.name}"
    make_tiny_checkpoint(
        out,
        num_layers=config["num_hidden_layers"],
        hidden_size=64,
        intermediate_size=128,
        vocab_size=config["vocab_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    for file in path.iterdir():
        if file.name.startswith("tokenizer") or file.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy(file, out / file.name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/bench_latency.py", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per generation (default 48)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each kind per delay (default 1)")
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[0, 20, 50, 100])
    parser.add_argument("--prompts", nargs="+", choices=list(PROMPTS), default=list(PROMPTS))
    parser.add_argument("--out", default="bench-results/latency.json")
    parser.add_argument(
        "--thin-blocks",
        action="store_true",
        help="swap the model's blocks for random ones of hidden size 64 (same block count, tokenizer and "
        "vocabulary): the same routes and protocol with next to no compute, to show what the links alone allow",
    )
    parser.add_argument(
        "--peer-quant",
        default="none",
        choices=["none", "int4"],
        help="the peers' --quant (default none). With --peer-dtype bfloat16, int4 runs torch's packed int4 kernel "
        "on the CPU, the fastest CPU setting: less compute per token, so the links' share shows",
    )
    parser.add_argument("--peer-dtype", default="float32", choices=["float32", "bfloat16"], help="the peers' --dtype")
    args = parser.parse_args(argv)

    from peerd.cli.demo import LocalSwarm, split_blocks
    from peerd.cli.helpers import resolve, run_async
    from peerd.model.chat import ChatTemplate, chat_prompt_ids, load_tokenizer

    torch.set_num_threads(1)
    model_id, path = resolve(args.model, args.cache_dir)
    if args.thin_blocks:
        path = _thin_model(Path(path))
        model_id, args.model = path.name, str(path)
    tokenizer, template = load_tokenizer(path), ChatTemplate.from_folder(path)
    prompts = {
        name: chat_prompt_ids(tokenizer, template, [{"role": "user", "content": text}])
        for name, text in PROMPTS.items()
        if name in args.prompts
    }
    from peerd.model.config import ModelConfig

    spans = split_blocks(ModelConfig.from_pretrained(path).num_layers, args.peers)
    print(
        f"peerd latency bench: {model_id}, {len(spans)} spans (--quant {args.peer_quant} --dtype {args.peer_dtype}), "
        f"{args.tokens} new tokens, RTT {args.rtt_ms} ms"
    )
    shims = Shims()
    results: dict[str, Any] = {
        "model": model_id,
        "spans": len(spans),
        "tokens": args.tokens,
        "peer_quant": args.peer_quant,
        "peer_dtype": args.peer_dtype,
        "levels": {},
    }
    try:
        with LocalSwarm(args.model, cache_dir=args.cache_dir) as swarm:
            swarm.start_bootstrap()
            procs = []
            for i, span in enumerate(spans):
                port = _free_port()
                announce = f"/ip4/127.0.0.1/tcp/{shims.add(port)}"
                extra = ["--torch-threads", "1", "--port", str(port), "--announce-maddrs", announce]
                extra += ["--quant", args.peer_quant, "--dtype", args.peer_dtype]
                procs.append(swarm.start_peer(f"peer{i + 1}", span, extra))
            swarm.wait_ready(procs, timeout_s=300)
            for rtt_ms in args.rtt_ms:
                shims.set_rtt_ms(rtt_ms)
                summary = _summary(run_async(_level(swarm.initial_peers, path, model_id, prompts, args)))
                results["levels"][str(rtt_ms)] = summary
                for name, row in summary.items():
                    print(
                        f"  RTT {rtt_ms:5.0f} ms  {name:8}  relayed {row['relayed_tokens_per_s']:6.2f}  "
                        f"speculative {row['speculative_tokens_per_s']:6.2f}  push {row['push_tokens_per_s']:6.2f}  "
                        f"push+spec {row['push_spec_tokens_per_s']:6.2f} tok/s  push x{row['push_vs_relayed']:.2f}  "
                        f"push+spec x{row['push_spec_vs_relayed']:.2f} (x{row['push_spec_vs_push']:.2f} of push)  "
                        f"acceptance {row['acceptance_rate']:.2f}  tokens/step {row['tokens_per_step']:.2f}  "
                        f"TTFT relayed/push "
                        f"{row['relayed_ttft_s'] * 1e3:.0f}/{row['push_ttft_s'] * 1e3:.0f} ms  "
                        f"identical {row['identical']}",
                        flush=True,
                    )
    finally:
        shims.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

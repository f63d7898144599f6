"""The `peerd` argument parser: every subcommand and option, in one place.

Parsing lives here and only here; the commands below get parsed arguments and build frozen
config objects from them.
"""

from __future__ import annotations

import argparse

from peerd import __version__
from peerd.config import ALL_INTERFACES, DEFAULT_SPOT_CHECK_RATE, MAX_ANNOUNCE_PERIOD_S

__all__ = ["all_parsers", "build_parser", "parse_blocks", "parse_size"]


def _ranged(kind: type[int] | type[float], low: float, high: float | None = None, *, above: bool = False):  # type: ignore[no-untyped-def]
    """An argparse type: a number of ``kind`` in [low, high] (or (low, high] with ``above``).

    A value out of range is refused at parse time with the range in the message, not found later
    as a hang or a traceback deep in the daemon.
    """
    bounds = f"{'>' if above else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if value != value or (value <= low if above else value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {bounds}")
        return value

    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = _ranged(int, 1)
PORT = _ranged(int, 0, 65535)
NON_NEGATIVE = _ranged(float, 0.0)
POSITIVE = _ranged(float, 0.0, above=True)


def parse_blocks(text: str) -> tuple[int, int]:
    """``"0:10"`` -> (0, 10); a clear argparse error otherwise."""
    try:
        start_s, end_s = text.split(":")
        start, end = int(start_s), int(end_s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks must look like START:END (e.g. 0:10), got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"--blocks {text}: need 0 <= START < END")
    return start, end


def parse_size(text: str) -> int:
    """``"6GB"``/``"512MiB"``/``"1000000"`` -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
    stripped = text.strip().lower()
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyz")
    try:
        return int(float(number) * units[stripped[len(number) :].strip()])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 6GB or 512MiB)") from None


def _maddr_list(text: str) -> list[str]:
    """``"A,B"`` or ``"A B"`` -> [A, B]: one flag value holds several multiaddrs, so a positional
    argument after ``--initial-peers MADDR`` is never taken for another address."""
    return text.replace(",", " ").split()


def _add_speed_args(p: argparse.ArgumentParser) -> None:
    """How a client's generations travel: push or relay, and where speculative guesses come from."""
    p.add_argument(
        "--push",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="peers pass hidden states on to the next peer, one client round trip less per hop and token "
        "(default: when the route's peers are 10 ms or more away; --no-push: the client relays every hop)",
    )
    p.add_argument(
        "--draft-model",
        metavar="MODEL",
        default=None,
        help="a small local model with the swarm model's tokenizer (id or folder) that guesses tokens ahead, "
        "checked by the swarm in one step (default: guesses from the context by prompt lookup); output unchanged",
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--spot-check-rate",
        type=_ranged(float, 0.0, 1.0),
        default=DEFAULT_SPOT_CHECK_RATE,
        help="share of steps recomputed on another peer to catch one that returns wrong results, after "
        "each peer's first answer, which is always checked (default %(default)s; 0 = no checks at all)",
    )
    _add_speed_args(p)
    g = p.add_argument_group("sampling (as in the OpenAI API; the defaults are plain greedy decoding)")
    g.add_argument("--max-new-tokens", type=POSITIVE_INT, default=64, help="longest reply, in tokens")
    g.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=_ranged(float, 0.0, 1.0, above=True), default=1.0, help="nucleus sampling mass")
    g.add_argument("--top-k", type=_ranged(int, 0), default=0, help="sample from the k likeliest tokens (0 = off)")
    g.add_argument(
        "--repetition-penalty", type=POSITIVE, default=1.0, help="> 1 discourages tokens already seen (1 = off)"
    )
    g.add_argument("--presence-penalty", type=_ranged(float, -2.0, 2.0), default=0.0, help="OpenAI's, -2..2")
    g.add_argument("--frequency-penalty", type=_ranged(float, -2.0, 2.0), default=0.0, help="OpenAI's, -2..2")
    g.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="end the reply before this text (repeatable)"
    )
    g.add_argument(
        "--stop-token-id", type=_ranged(int, 0), action="append", default=[], help="end at this token (repeatable)"
    )
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")


def _add_swarm_args(p: argparse.ArgumentParser, *, need_peers: bool) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model id (e.g. smollm2-135m) or HF-format folder")
    p.add_argument("--model-id", default=None, help="name the swarm knows the model by (default: id or folder name)")
    p.add_argument("--cache-dir", default=None, help="peerd cache root (default: $PEERD_CACHE_DIR or ~/.cache/peerd)")
    p.add_argument(
        "--swarm", default="public", help="swarm name; peers in different swarms never mix (default: public)"
    )
    p.add_argument(
        "--initial-peers",
        type=_maddr_list,
        action="extend",
        default=[],
        metavar="MADDR[,MADDR...]",
        help="multiaddrs of peers to join (printed by `peerd run` at start-up), comma-separated or the flag "
        "repeated; default: $PEERD_INITIAL_PEERS, else the public swarm's bootstrap list",
    )
    if not need_peers:
        p.add_argument(
            "--new-swarm",
            action="store_true",
            help="start a new swarm instead of joining one (prints the --initial-peers line others join with)",
        )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peerd",
        description="peerd: run large models across volunteer peers (pipeline parallel, peer to peer).",
    )
    parser.add_argument("--version", action="version", version=f"peerd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run a peer that hosts a slice of the model's blocks",
        epilog="Every option can also be set as PEERD_<OPTION> (e.g. PEERD_MAX_SESSIONS=32, PEERD_HTTP_PORT=9100, "
        "PEERD_NO_MEASURE=1); a flag wins over the variable. The defaults shown include such variables.",
    )
    _add_swarm_args(run, need_peers=False)
    run.add_argument(
        "--blocks",
        type=parse_blocks,
        default=None,
        help="blocks to host, START:END (default: placed automatically where the swarm is weakest)",
    )
    run.add_argument(
        "--max-blocks", type=POSITIVE_INT, default=None, help="host at most this many blocks (automatic placement)"
    )
    run.add_argument(
        "--memory-budget",
        type=parse_size,
        default=None,
        help="memory for weights + KV cache, e.g. 6GB (default: 80%% of free memory)",
    )
    run.add_argument(
        "--placement-jitter",
        type=NON_NEGATIVE,
        default=3.0,
        help="test/ops knob: max random delay before choosing blocks",
    )
    run.add_argument(
        "--placement-settle", type=NON_NEGATIVE, default=1.0, help="test/ops knob: wait before re-checking the choice"
    )
    run.add_argument(
        "--rebalance-period", type=NON_NEGATIVE, default=120.0, help="seconds between move checks (0 = never move)"
    )
    run.add_argument(
        "--rebalance-threshold",
        type=NON_NEGATIVE,
        default=0.2,
        help="move only if the swarm bottleneck rises by this fraction",
    )
    run.add_argument(
        "--host", default=ALL_INTERFACES, help="libp2p listen address (default 0.0.0.0: every interface, IPv6 too)"
    )
    run.add_argument(
        "--reachability",
        choices=["auto", "direct", "relayed"],
        default="auto",
        help="auto (default): ask the initial peers to dial back, and go through them as relays if nobody can; "
        "direct: others can dial this peer (public address or port forward); relayed: always use relays",
    )
    run.add_argument("--port", type=PORT, default=0, help="libp2p listen port (default 0: any free port)")
    run.add_argument("--announce-maddrs", nargs="*", default=[], metavar="MADDR", help="public multiaddrs to advertise")
    run.add_argument(
        "--identity",
        default="~/.config/peerd/identity.key",
        help="identity key file (0600, created on first run)",
    )
    run.add_argument("--name", default="", help="public name shown in status tables")
    run.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 (default cpu)")
    run.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="compute dtype (and weights' unless --quant)",
    )
    run.add_argument(
        "--quant",
        default="none",
        choices=["none", "int8", "nf4", "int4"],
        help="store hosted blocks' linear weights in fewer bits: int8 (8 bits, bitsandbytes), nf4 (4-bit "
        "NormalFloat, blocks of 64, bitsandbytes; 4.1 bits/weight) or int4 (4-bit codes in groups of 32 with "
        "a float16 scale and minimum each, GGUF Q4_1's layout; 5.0 bits/weight with its scales, lossless on "
        "Q4_1 checkpoints such as the shipped SmolLM2). About 2x / 3-4x the blocks of bfloat16 in the same "
        "memory, at some accuracy (docs/operating.md). On a CPU, int8 and int4 with --dtype bfloat16 multiply with "
        "torch's packed kernels, 2-3x as fast as float32 blocks; default none",
    )
    run.add_argument("--torch-threads", type=POSITIVE_INT, default=None, help="torch intra-op threads")
    run.add_argument("--cache-tokens", type=POSITIVE_INT, default=8192, help="KV cache budget in tokens (default 8192)")
    run.add_argument("--max-session-length", type=POSITIVE_INT, default=2048, help="longest session a client may open")
    run.add_argument("--max-sessions", type=POSITIVE_INT, default=64, help="concurrent inference sessions")
    run.add_argument(
        "--max-sessions-per-peer", type=POSITIVE_INT, default=16, help="concurrent inference sessions of one client"
    )
    run.add_argument(
        "--max-inflight-per-peer",
        type=POSITIVE_INT,
        default=8,
        help="concurrent forward/backward/info requests of one client",
    )
    run.add_argument(
        "--allow-peers",
        nargs="+",
        default=None,
        metavar="PEER_ID",
        help="private peer: serve only these peer ids (others get NOT_ALLOWED); default: serve anyone",
    )
    run.add_argument(
        "--session-idle-timeout", type=POSITIVE, default=60.0, help="seconds before an idle session is freed"
    )
    run.add_argument(
        "--evict-idle",
        type=POSITIVE,
        default=2.0,
        help="seconds without a step after which a session may lose its cache to one that needs it",
    )
    run.add_argument("--http-port", type=PORT, default=None, help="serve /metrics and the health page on this port")
    run.add_argument("--http-host", default="127.0.0.1", help="address for the HTTP port (default 127.0.0.1)")
    run.add_argument(
        "--drain-timeout", type=NON_NEGATIVE, default=10.0, help="on SIGTERM, seconds open sessions get to finish"
    )
    run.add_argument(
        "--announce-period",
        type=_ranged(float, 0.0, MAX_ANNOUNCE_PERIOD_S, above=True),
        default=30.0,
        help="seconds between DHT announcements",
    )
    run.add_argument("--no-measure", action="store_true", help="skip the start-up throughput benchmark (tests)")
    run.add_argument(
        "--step-delay", type=NON_NEGATIVE, default=0.0, help="test/ops knob: extra seconds per inference step"
    )
    run.add_argument("--ready-file", default=None, help="write JSON {peer_id, maddrs, http_port} here once serving")

    boot = sub.add_parser("bootstrap", help="run a DHT-only node other peers can join through")
    _add_swarm_args(boot, need_peers=False)
    boot.add_argument(
        "--host", default=ALL_INTERFACES, help="libp2p listen address (default 0.0.0.0: every interface, IPv6 too)"
    )
    boot.add_argument("--port", type=PORT, default=0, help="libp2p listen port (0: any free port)")
    boot.add_argument("--identity", default="~/.config/peerd/bootstrap.key", help="identity key file")
    boot.add_argument("--ready-file", default=None, help="write JSON {peer_id, maddrs, http_port} here once serving")
    boot.add_argument("--http-port", type=PORT, default=None, help="serve /healthz on this port (container checks)")
    boot.add_argument("--http-host", default="127.0.0.1", help="address for the HTTP port (default 127.0.0.1)")

    demo = sub.add_parser("demo", help="start a local swarm of 3 peers and chat with the model through it")
    demo.add_argument(
        "prompt", nargs="?", default="What is the capital of France? Answer in one sentence.", help="the question"
    )
    demo.add_argument("--model", default="smollm2-135m", help="model id or HF-format folder")
    demo.add_argument(
        "--cache-dir", default=None, help="peerd cache root (default: $PEERD_CACHE_DIR or ~/.cache/peerd)"
    )
    demo.add_argument("--max-new-tokens", type=POSITIVE_INT, default=64, help="longest reply, in tokens")
    demo.add_argument("--peers", type=POSITIVE_INT, default=3, help="number of peers the blocks are split over")
    demo.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    gen = sub.add_parser("generate", help="generate text through a running swarm")
    _add_swarm_args(gen, need_peers=True)
    gen.add_argument("prompt", help="the question (in the model's chat template unless --raw)")
    _add_sampling_args(gen)
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the model's chat template")
    gen.add_argument("--adapter", default=None, help="adapter file written by `peerd finetune`")
    gen.add_argument(
        "--min-precision",
        default=None,
        choices=["nf4", "int4", "int8", "bfloat16", "float16", "float32"],
        help="route only through peers storing weights in at least this precision (nf4 and int4 are both "
        "4-bit; default: any)",
    )

    chat = sub.add_parser("chat", help="chat with the model through a running swarm (multi-turn, streamed)")
    _add_swarm_args(chat, need_peers=True)
    _add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="a system message that starts every conversation")

    api = sub.add_parser("api", help="serve an OpenAI-compatible HTTP API and a web chat, as a client of a swarm")
    _add_swarm_args(api, need_peers=True)
    _add_speed_args(api)
    from peerd.cli.api import add_api_arguments

    add_api_arguments(api, POSITIVE_INT, PORT)

    status = sub.add_parser("status", help="show the peers of a swarm and the coverage of every block")
    _add_swarm_args(status, need_peers=True)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--no-probe",
        dest="probe",
        action="store_false",
        help="do not time one token through each online peer (the OBSERVED speed column)",
    )

    finetune = sub.add_parser("finetune", help="train a soft prompt / adapters through a swarm (blocks stay frozen)")
    _add_swarm_args(finetune, need_peers=True)
    from peerd.cli.finetune_args import add_finetune_arguments

    add_finetune_arguments(finetune)

    simulate = sub.add_parser("simulate", help="simulate a large swarm with the real placement and routing code")
    from peerd.cli.simulate import add_simulate_arguments

    add_simulate_arguments(simulate)

    model = sub.add_parser("model", help="manage model files")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    fetch = model_sub.add_parser("fetch", help="download and convert the embedded default model (idempotent)")
    from peerd.cli.model import add_fetch_arguments

    add_fetch_arguments(fetch)
    _env_defaults(run)
    _env_defaults(boot)
    for command in all_parsers(parser):
        # every option's help ends with its default, so `--help` tells what happens when it is left out
        command.formatter_class = _HelpFormatter
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the help already says what the default is, or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


def all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every subcommand parser below it."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += all_parsers(child)
    return found


TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})
# read elsewhere already, under these names (the model cache root, and the peers every command joins)
_ENV_READ_ELSEWHERE = frozenset({"cache_dir", "initial_peers"})


def _env_defaults(command: argparse.ArgumentParser) -> None:
    """Defaults from ``PEERD_<OPTION>`` (e.g. ``PEERD_MAX_SESSIONS=32``) for every option of ``command``.

    A flag on the command line still wins. Values go through the option's own type check, so a
    bad variable is refused like a bad flag, naming the variable.
    """
    import os

    for action in command._actions:
        if not action.option_strings or action.dest in ("help", "version", *_ENV_READ_ELSEWHERE):
            continue
        name = "PEERD_" + action.dest.upper()
        text = os.environ.get(name)
        if text is None:
            continue
        value: object
        try:
            if isinstance(action, argparse._StoreTrueAction):
                if text.strip().lower() not in TRUE_WORDS | FALSE_WORDS:
                    raise argparse.ArgumentTypeError(f"not a yes/no value: {text!r}")
                value = text.strip().lower() in TRUE_WORDS
            elif action.nargs in ("+", "*"):
                value = [action.type(v) if action.type else v for v in text.replace(",", " ").split()]  # type: ignore[operator]
            else:
                value = action.type(text) if action.type else text  # type: ignore[operator]
        except (argparse.ArgumentTypeError, ValueError) as exc:
            command.error(f"${name}: {exc}")
        if action.choices is not None and value not in action.choices:
            command.error(f"${name}: {text!r} is not one of {', '.join(map(str, action.choices))}")
        command.set_defaults(**{action.dest: value})

"""The `peerd` argument parser: every subcommand and option, in one place.

Parsing lives here and only here; the commands below get parsed arguments and build frozen
config objects from them.
"""

from __future__ import annotations

import argparse

from peerd import __version__
from peerd.config import ALL_INTERFACES, MAX_ANNOUNCE_PERIOD_S

__all__ = ["build_parser", "parse_blocks", "parse_size"]


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


def _add_swarm_args(p: argparse.ArgumentParser, *, need_peers: bool) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model id (e.g. smollm2-135m) or HF-format folder")
    p.add_argument("--model-id", default=None, help="name the swarm knows the model by (default: id or folder name)")
    p.add_argument("--cache-dir", default=None, help="peerd cache root (default: $PEERD_CACHE_DIR or ~/.cache/peerd)")
    p.add_argument(
        "--swarm", default="public", help="swarm name; peers in different swarms never mix (default: public)"
    )
    p.add_argument(
        "--initial-peers",
        nargs="+",
        default=[],
        metavar="MADDR",
        help="multiaddrs of peers to join (printed by `peerd run` at start-up); default: $PEERD_INITIAL_PEERS, "
        "else the public swarm's bootstrap list",
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

    run = sub.add_parser("run", help="run a peer that hosts a slice of the model's blocks")
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
        choices=["none", "int8", "nf4"],
        help="store hosted blocks' linear weights in 8 or 4 bits (bitsandbytes): about 2x / 4x the blocks "
        "of bfloat16 in the same memory, at some accuracy (docs/operating.md); default none",
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
    boot.add_argument("--port", type=PORT, default=0)
    boot.add_argument("--identity", default="~/.config/peerd/bootstrap.key")
    boot.add_argument("--ready-file", default=None)

    demo = sub.add_parser("demo", help="start a local swarm of 3 peers and chat with the model through it")
    demo.add_argument("prompt", nargs="?", default="What is the capital of France? Answer in one sentence.")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--cache-dir", default=None)
    demo.add_argument("--max-new-tokens", type=POSITIVE_INT, default=64)
    demo.add_argument(
        "--peers", type=POSITIVE_INT, default=3, help="number of peers the blocks are split over (default 3)"
    )
    demo.add_argument("-v", "--verbose", action="store_true")

    gen = sub.add_parser("generate", help="generate text through a running swarm")
    _add_swarm_args(gen, need_peers=True)
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=POSITIVE_INT, default=64)
    gen.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=_ranged(float, 0.0, 1.0, above=True), default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--adapter", default=None, help="adapter file written by `peerd finetune`")
    gen.add_argument(
        "--min-precision",
        default=None,
        choices=["nf4", "int8", "bfloat16", "float16", "float32"],
        help="route only through peers storing weights in at least this precision (default: any)",
    )

    status = sub.add_parser("status", help="show the peers of a swarm and the coverage of every block")
    _add_swarm_args(status, need_peers=True)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    finetune = sub.add_parser("finetune", help="train a soft prompt / adapters through a swarm (blocks stay frozen)")
    _add_swarm_args(finetune, need_peers=True)
    from peerd.cli.finetune import add_finetune_arguments

    add_finetune_arguments(finetune)

    model = sub.add_parser("model", help="manage model files")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    fetch = model_sub.add_parser("fetch", help="download and convert the embedded default model (idempotent)")
    from peerd.cli.model import add_fetch_arguments

    add_fetch_arguments(fetch)
    return parser

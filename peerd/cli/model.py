"""`peerd model fetch`: download and convert the embedded default model into the cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peerd.model.fetch import fetch_model
from peerd.model.registry import DEFAULT_MODEL_ID, KNOWN_MODELS, ModelFetchError, ModelNotFoundError

__all__ = ["add_fetch_arguments", "run_fetch_command"]


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `peerd model fetch` options to `parser` (see run_fetch_command)."""
    known = ", ".join(KNOWN_MODELS)
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL_ID,
        metavar="ID",
        help=f"model to fetch (known: {known}; default: %(default)s)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="peerd cache root; models go to DIR/models/<id> "
        "(default: $PEERD_CACHE_DIR, else $XDG_CACHE_HOME/peerd, else ~/.cache/peerd)",
    )
    parser.add_argument("--force", action="store_true", help="download and convert again even if the model is present")
    parser.add_argument("--quiet", action="store_true", help="no step lines or progress bars")


def run_fetch_command(args: argparse.Namespace) -> int:
    """Run `peerd model fetch` from parsed arguments; print the folder on stdout; return the exit status."""
    try:
        path = fetch_model(
            args.model,
            args.cache_dir,
            force=bool(getattr(args, "force", False)),
            progress=not getattr(args, "quiet", False),
        )
    except (ModelFetchError, ModelNotFoundError) as exc:
        print(f"peerd model fetch: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0

"""The `peerd` command: run a peer, start a demo swarm, generate, show swarm status, fetch models.

``main`` parses the arguments (``peerd.cli.parser``) and hands them to the command's module; each
command imports its heavy dependencies only when it runs, so ``peerd --help`` stays fast.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from peerd.cli.helpers import SwarmArgumentError, resolve_initial_peers, run_async, setup_logging
from peerd.cli.parser import build_parser

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "simulate":
            from peerd.cli.simulate import cmd_simulate

            return cmd_simulate(args)
        if args.command == "model":
            from peerd.cli.model import run_fetch_command

            return run_fetch_command(args)
        if hasattr(args, "initial_peers"):
            args.initial_peers = resolve_initial_peers(args)
        setup_logging(getattr(args, "verbose", False))
        if args.command == "run":
            from peerd.cli.run import cmd_run

            return run_async(cmd_run(args))
        if args.command == "bootstrap":
            from peerd.cli.bootstrap import cmd_bootstrap

            return run_async(cmd_bootstrap(args))
        if args.command == "demo":
            from peerd.cli.demo import cmd_demo

            return cmd_demo(args)
        if args.command == "generate":
            from peerd.cli.generate import cmd_generate

            return run_async(cmd_generate(args))
        if args.command == "chat":
            from peerd.cli.chat import cmd_chat

            return run_async(cmd_chat(args))
        if args.command == "api":
            from peerd.cli.api import cmd_api

            return run_async(cmd_api(args))
        if args.command == "finetune":
            from peerd.cli.finetune import cmd_finetune

            return run_async(cmd_finetune(args))
        if args.command == "status":
            from peerd.cli.status import cmd_status

            return run_async(cmd_status(args))
    except SwarmArgumentError as exc:
        print(f"peerd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the CLI's one place that turns errors into readable text
        from peerd.identity import IdentityError
        from peerd.model.registry import ModelNotFoundError
        from peerd.rpc.errors import PeerdClientError

        if isinstance(exc, (PeerdClientError, ModelNotFoundError, IdentityError, ValueError, OSError)):
            print(f"peerd: error: {exc}", file=sys.stderr)
            return 1
        raise
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""`peerd chat`: an interactive terminal chat through a swarm, with history, streaming, /reset and /exit."""

from __future__ import annotations

import argparse
import asyncio
import sys

from peerd.cli.helpers import connect_client, empty_swarm_reason, sampling_from_args

__all__ = ["cmd_chat"]

HELP = "/reset starts a new conversation, /exit (or Ctrl-D) quits"


def _read_line(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


async def cmd_chat(args: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    from peerd.model.chat import ChatTemplateError
    from peerd.rpc.errors import PeerdClientError

    client = await connect_client(args)
    try:
        reason = await empty_swarm_reason(client, args.swarm)
        if reason is not None:
            print(f"peerd chat: error: {reason}", file=sys.stderr)
            return 1
        route = await client.wait_for_route()
        client.chat_ids([{"role": "user", "content": "hi"}])  # no template: say so now, not after a question
        print(f"peerd chat: {client.model_id} via " + " -> ".join(str(s) for s in route), file=sys.stderr)
        print(HELP, file=sys.stderr, flush=True)
        start = [{"role": "system", "content": args.system}] if args.system else []
        history = list(start)
        sampling = sampling_from_args(args)
        while True:
            line = await asyncio.to_thread(_read_line, "you> ")
            if line is None or line.strip() in ("/exit", "/quit"):
                break
            if line.strip() == "/reset":
                history = list(start)
                print("(new conversation)", file=sys.stderr, flush=True)
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            print("bot> ", end="", flush=True)
            try:
                result = await client.chat(
                    history,
                    max_new_tokens=args.max_new_tokens,
                    sampling=sampling,
                    on_text=lambda piece: print(piece, end="", flush=True),
                )
            except (PeerdClientError, ChatTemplateError) as exc:  # the chat goes on; this turn is dropped
                history.pop()
                print(f"\npeerd chat: error: {exc}", file=sys.stderr, flush=True)
                continue
            history.append({"role": "assistant", "content": result.text})
            print(flush=True)
            print(f"[{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tokens/s]", file=sys.stderr, flush=True)
    finally:
        await client.close()
    return 0

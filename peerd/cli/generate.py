"""`peerd generate`: connect to a swarm and stream a completion to stdout."""

from __future__ import annotations

import argparse
import sys

from peerd.cli.helpers import connect_client, empty_swarm_reason, sampling_from_args

__all__ = ["cmd_generate"]


async def cmd_generate(args: argparse.Namespace) -> int:
    client = await connect_client(args)
    try:
        reason = await empty_swarm_reason(client, args.swarm)
        if reason is not None:
            print(f"peerd generate: error: {reason}", file=sys.stderr)
            return 1
        route = await client.wait_for_route()
        print("route: " + " -> ".join(str(s) for s in route), file=sys.stderr, flush=True)
        # the same prompt the SDK's chat() and the API build: the model's own template
        prompt = args.prompt if args.raw else client.chat_ids([{"role": "user", "content": args.prompt}])
        adapter = None
        if args.adapter:
            from peerd.client.adapters import ClientAdapter

            adapter = ClientAdapter.load(args.adapter, client.head)
        result = await client.generate(
            prompt,
            max_new_tokens=args.max_new_tokens,
            sampling=sampling_from_args(args),
            on_text=lambda piece: print(piece, end="", flush=True),
            adapter=adapter,
        )
        print(flush=True)
        print(
            f"[{len(result.token_ids)} tokens, first token after {result.time_to_first_token_s * 1e3:.0f} ms, "
            f"{result.tokens_per_s:.1f} tokens/s]",
            file=sys.stderr,
        )
    finally:
        await client.close()
    return 0

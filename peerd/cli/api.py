"""`peerd api`: an OpenAI-compatible HTTP server (and a web chat) in front of a swarm.

The server is a client of the swarm, hosting no blocks: one ``SwarmClient`` for the process, one
inference session per request.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from peerd.cli.helpers import connect_client, install_stop_handlers, write_ready_file

__all__ = ["add_api_arguments", "cmd_api"]

logger = logging.getLogger(__name__)


def add_api_arguments(p: argparse.ArgumentParser, positive_int: object, port: object) -> None:
    p.add_argument("--host", default="127.0.0.1", help="HTTP listen address; expose it beyond this host with care")
    p.add_argument("--port", type=port, default=8000, help="HTTP port (0: any free port)")  # type: ignore[arg-type]
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="require `Authorization: Bearer KEY` on /v1 (repeatable; default: $PEERD_API_KEY, else none)",
    )
    p.add_argument(
        "--max-context-tokens",
        type=positive_int,  # type: ignore[arg-type]
        default=2048,
        help="prompt + reply tokens per request (peers grant sessions up to their --max-session-length)",
    )
    p.add_argument(
        "--default-max-tokens",
        type=positive_int,  # type: ignore[arg-type]
        default=512,
        help="reply length for requests that set no max_tokens",
    )
    p.add_argument(
        "--max-concurrent-requests",
        type=positive_int,  # type: ignore[arg-type]
        default=64,
        help="requests served at once; more get 429 with Retry-After",
    )
    p.add_argument("--ready-file", default=None, help="write JSON {url, port, model} here once serving")


async def cmd_api(args: argparse.Namespace) -> int:
    from peerd.api import ApiSettings, build_app
    from peerd.model.registry import canonical_model_id
    from peerd.web.server import AsgiServer

    keys = args.api_key or [k for k in os.environ.get("PEERD_API_KEY", "").replace(",", " ").split() if k]
    if args.host not in ("127.0.0.1", "::1", "localhost") and not keys:
        logger.warning("serving on %s without an API key: anyone who can reach it can use the swarm", args.host)
    client = await connect_client(args)
    server = None
    try:
        if client.draft_model is not None:  # refused now, not on every request
            from peerd.client.draft_model import check_draft_model

            check_draft_model(client.draft_model, client.config.vocab_size)
        names = {client.model_id, args.model, canonical_model_id(args.model) or client.model_id}
        settings = ApiSettings(
            model_names=frozenset(names),
            max_context_tokens=args.max_context_tokens,
            default_max_tokens=args.default_max_tokens,
            max_concurrent_requests=args.max_concurrent_requests,
            api_keys=frozenset(keys),
        )
        server = AsgiServer(build_app(client, settings))
        port = await server.start(args.host, args.port)
        host = f"[{args.host}]" if ":" in args.host else args.host
        url = f"http://{host}:{port}"
        print(f"peerd api: model {client.model_id!r} at {url}/v1 (OpenAI-compatible); web chat at {url}/", flush=True)
        write_ready_file(args.ready_file, {"url": url, "port": port, "model": client.model_id})
        stop = asyncio.Event()
        install_stop_handlers(stop.set)
        await stop.wait()
    finally:
        if server is not None:
            await server.close()
        await client.close()
    return 0

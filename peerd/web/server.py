"""Serve an ASGI app (Starlette) with uvicorn inside a daemon's own event loop.

uvicorn's ``Server.serve`` replaces the process's SIGINT/SIGTERM handlers while it runs; a peer
daemon owns those (SIGTERM drains its sessions first), so this server leaves them alone and the
command that runs it decides when to stop. The socket is bound here, before serving, so port 0
yields the chosen port at once and a busy port fails the start-up with a clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

__all__ = ["AsgiServer"]

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
# streams still open at shutdown get this long to finish before they are cancelled
GRACEFUL_SHUTDOWN_S = 3.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # the peerd command running this server owns signal handling (see the module docstring)
        yield


class AsgiServer:
    """One uvicorn server for ``app``: ``await start(host, port)`` returns the bound port, ``close()`` stops it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> int:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}") from exc
        bound = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            log_config=None,  # keep peerd's logging set-up
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN_S),
            server_header=False,
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name=f"http:{bound}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not self._server.started:  # uvicorn says when its listener is up
            if self._task.done():
                await self._task  # re-raises why it failed
                raise OSError(f"the HTTP server on {host}:{bound} stopped during start-up")
            if loop.time() > deadline:
                raise TimeoutError(f"the HTTP server on {host}:{bound} did not start in {START_TIMEOUT_S:g} s")
            await asyncio.sleep(0.01)
        return bound

    async def close(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            async with asyncio.timeout(GRACEFUL_SHUTDOWN_S + 5.0):
                await self._task
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._server = self._task = None

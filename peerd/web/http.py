"""A small asyncio HTTP/1.1 server for GET endpoints (metrics, health page, JSON API).

Deliberately tiny: the daemon serves a handful of read-only routes, and pulling a web framework
into every volunteer's peer for that is not worth its weight. Requests are bounded in size and
time; anything unexpected gets a 4xx and the connection is closed. One request per connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

__all__ = ["HttpResponse", "HttpServer", "Route"]

logger = logging.getLogger(__name__)

MAX_REQUEST_HEAD_BYTES = 16 * 1024
READ_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class HttpResponse:
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()  # extra headers, e.g. a Content-Security-Policy


Route = Callable[[], Awaitable[HttpResponse]]
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class HttpServer:
    """Serves ``routes`` (path -> async handler) on host:port; port 0 picks a free port."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST_HEAD_BYTES)
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head_only = False
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            head_only = head.startswith(b"HEAD ")
            response = await self._respond(head)
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            response = HttpResponse(b"bad request\n", status=400)
        try:
            reason = _REASONS.get(response.status, "Unknown")
            extra = "".join(f"{name}: {value}\r\n" for name, value in response.headers)
            status_head = (
                f"HTTP/1.1 {response.status} {reason}\r\nContent-Type: {response.content_type}\r\n"
                f"Content-Length: {len(response.body)}\r\nCache-Control: no-store\r\n"
                f"X-Content-Type-Options: nosniff\r\n{extra}Connection: close\r\n\r\n"
            )
            writer.write(status_head.encode() + (b"" if head_only else response.body))
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await writer.drain()
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    async def _respond(self, head: bytes) -> HttpResponse:
        if len(head) > MAX_REQUEST_HEAD_BYTES:
            return HttpResponse(b"request too large\n", status=400)
        try:
            method, target, _ = head.split(b"\r\n", 1)[0].decode("ascii").split(" ", 2)
        except (UnicodeDecodeError, ValueError):
            return HttpResponse(b"bad request line\n", status=400)
        if method not in ("GET", "HEAD"):
            return HttpResponse(b"only GET\n", status=405, headers=(("Allow", "GET, HEAD"),))
        route = self.routes.get(target.split("?", 1)[0])
        if route is None:
            return HttpResponse(b"not found\n", status=404)
        try:
            return await route()
        except Exception:
            logger.exception("HTTP handler for %s failed", target)
            return HttpResponse(b"internal error\n", status=500)

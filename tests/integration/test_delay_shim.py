"""The TCP delay shim on loopback: each connection pays the delay it was accepted with, both ways."""

from __future__ import annotations

import asyncio
import time

from tests.helpers.delay_shim import start_delay_shim


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _round_trip_s(port: int) -> tuple[float, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), timeout=10) == b"ping"
    return time.monotonic() - started, writer


async def test_a_delay_function_is_read_for_each_new_connection() -> None:
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    one_way_s = [0.05]
    shim = await start_delay_shim(
        ("127.0.0.1", 0), ("127.0.0.1", echo.sockets[0].getsockname()[1]), lambda: one_way_s[0]
    )
    port = shim.sockets[0].getsockname()[1]
    writers = []
    try:
        first, w = await _round_trip_s(port)
        writers.append(w)
        assert first >= 2 * 0.05  # held once on the way there, once on the way back
        one_way_s[0] = 0.2  # a benchmark moving to a longer link
        second, w = await _round_trip_s(port)
        writers.append(w)
        assert second >= 2 * 0.2
    finally:
        for w in writers:
            w.close()
        shim.close()
        echo.close()

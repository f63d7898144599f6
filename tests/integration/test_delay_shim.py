"""The TCP delay shim on loopback: every chunk pays the delay of the moment it was read, both ways."""

from __future__ import annotations

import asyncio
import time

from tests.helpers.delay_shim import start_delay_shim


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _round_trip_s(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    started = time.monotonic()
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), timeout=10) == b"ping"
    return time.monotonic() - started


async def test_a_delay_function_is_read_for_each_chunk_on_new_and_open_connections() -> None:
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    one_way_s = [0.05]
    shim = await start_delay_shim(
        ("127.0.0.1", 0), ("127.0.0.1", echo.sockets[0].getsockname()[1]), lambda: one_way_s[0]
    )
    port = shim.sockets[0].getsockname()[1]
    writers = []
    try:
        old = await asyncio.open_connection("127.0.0.1", port)
        writers.append(old[1])
        assert await _round_trip_s(*old) >= 2 * 0.05  # held once on the way there, once on the way back
        one_way_s[0] = 0.2  # a benchmark moving to a longer link
        new = await asyncio.open_connection("127.0.0.1", port)
        writers.append(new[1])
        assert await _round_trip_s(*new) >= 2 * 0.2
        # a connection opened before the change pays the new delay too (libp2p peers keep theirs)
        assert await _round_trip_s(*old) >= 2 * 0.2
        one_way_s[0] = 0.0
        assert await _round_trip_s(*old) < 0.2
    finally:
        for w in writers:
            w.close()
        shim.close()
        echo.close()

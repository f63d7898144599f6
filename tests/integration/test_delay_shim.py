"""The TCP delay shim on loopback: every chunk pays the delay of the moment it was read, both ways."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from tests.helpers.delay_shim import start_delay_shim

SCRIPT = Path(__file__).resolve().parents[1] / "helpers" / "delay_shim.py"


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


async def test_a_control_process_adds_shims_and_sets_their_delay_from_stdin() -> None:
    """``--control``: the shims of a benchmark run in a process of their own, driven line by line."""
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "--control",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None

    async def ask(command: str) -> str:
        proc.stdin.write(command.encode() + b"\n")  # type: ignore[union-attr]
        return (await asyncio.wait_for(proc.stdout.readline(), timeout=10)).decode().strip()  # type: ignore[union-attr]

    writers = []
    try:
        answer = await ask(f"add 127.0.0.1:{echo.sockets[0].getsockname()[1]}")
        assert answer.startswith("LISTENING 127.0.0.1 ")
        conn = await asyncio.open_connection("127.0.0.1", int(answer.split()[-1]))
        writers.append(conn[1])
        assert await _round_trip_s(*conn) < 0.1  # delay 0 until told otherwise
        assert await ask("delay 150") == "OK"
        assert await _round_trip_s(*conn) >= 0.15  # 75 ms each way, on the connection already open
        assert (await ask("delay -1")).startswith("ERROR")  # a bad command is answered, not fatal
        assert (await ask("add nowhere")).startswith("ERROR")
        assert await ask("delay 0") == "OK"
        assert await _round_trip_s(*conn) < 0.1
    finally:
        for w in writers:
            w.close()
        proc.stdin.close()  # EOF ends the process
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
        echo.close()

"""A TCP forwarder that delays every chunk by a fixed time in each direction (link delay emulation).

``tc netem`` is not available on the test machines, so tests that need latency put this shim
between two endpoints: it listens on ``listen``, opens a connection to ``target`` for each
accepted client, and forwards bytes both ways, holding each chunk ``delay`` seconds after it was
read before writing it on. Chunks leave in the order they arrived; EOF (half-close) is forwarded
after the data before it, also delayed; a reset on either side aborts both. Buffering is bounded
(``max_chunks`` chunks of at most ``chunk_size`` bytes per direction), so a slow receiver
back-pressures the sender; note that this also caps throughput at about
``max_chunks * chunk_size / delay`` (4 MiB / delay with the defaults).

The file is standalone (standard library only) so it can run inside a namespace by path::

    ip netns exec NS python3 tests/helpers/delay_shim.py --listen 10.200.0.2:9000 \\
        --target 10.200.0.3:8000 --delay-ms 50

It prints ``LISTENING <host> <port>`` once ready (port 0 picks a free port). With ``--control``
it takes commands on stdin instead, one per line, answering each on stdout: ``add HOST:PORT``
starts a shim on a free 127.0.0.1 port in front of that target (``LISTENING <host> <port>``);
``delay MS`` sets the one-way delay of every shim of the process, open connections included
(``OK``). A benchmark uses this to keep its links out of the process it measures. From asyncio
code::

    server = await start_delay_shim(("127.0.0.1", 0), ("127.0.0.1", port), delay=0.05)
    shim_port = server.sockets[0].getsockname()[1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Callable

CHUNK_SIZE = 65536
MAX_CHUNKS = 64


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    delay_of: Callable[[], float],
    chunk_size: int,
    max_chunks: int,
) -> None:
    """Copy reader -> writer, each chunk written ``delay_of()`` s after it was read; forwards EOF.

    The delay is read as each chunk arrives; chunks still leave in order (one whose delay is
    shorter than its predecessor's waits for it).
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(max_chunks)

    async def receive() -> None:
        while True:
            data = await reader.read(chunk_size)
            await queue.put((loop.time() + max(0.0, delay_of()), data))  # b"" marks EOF
            if not data:
                return

    async def send() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                await writer.drain()
                return
            writer.write(data)
            await writer.drain()

    # If either half fails (reset, broken pipe), the TaskGroup cancels the other and raises.
    async with asyncio.TaskGroup() as group:
        group.create_task(receive())
        group.create_task(send())


async def _handle(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target: tuple[str, int],
    delay_of: Callable[[], float],
    chunk_size: int,
    max_chunks: int,
) -> None:
    try:
        up_reader, up_writer = await asyncio.open_connection(*target)
    except OSError:
        client_writer.transport.abort()
        return
    writers = (client_writer, up_writer)
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(_pipe(client_reader, up_writer, delay_of, chunk_size, max_chunks))
            group.create_task(_pipe(up_reader, client_writer, delay_of, chunk_size, max_chunks))
    except* (OSError, asyncio.IncompleteReadError):
        for w in writers:
            w.transport.abort()  # propagate the failure as a reset, like a real link would
    finally:
        for w in writers:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()


async def start_delay_shim(
    listen: tuple[str, int],
    target: tuple[str, int],
    delay: float | Callable[[], float],
    *,
    chunk_size: int = CHUNK_SIZE,
    max_chunks: int = MAX_CHUNKS,
) -> asyncio.Server:
    """Start the shim in the running loop; close the returned server to stop accepting.

    ``delay`` may be a function: it is called for each chunk as it is read, so a benchmark can
    change the delay without restarting the shim, and connections already open pay the new delay
    too (libp2p peers keep the connections they opened at start-up, so a delay read once per
    connection would leave those at the delay of that moment).
    """
    delay_of = delay if callable(delay) else (lambda: delay)
    if delay_of() < 0:
        raise ValueError("delay must be >= 0")

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _handle(reader, writer, target, delay_of, chunk_size, max_chunks)

    return await asyncio.start_server(on_client, listen[0], listen[1], limit=chunk_size)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


async def _main(args: argparse.Namespace) -> None:
    server = await start_delay_shim(args.listen, args.target, args.delay_ms / 1000.0)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"LISTENING {host} {port}", flush=True)
    async with server:
        await server.serve_forever()


async def _control() -> None:
    """Shims added and delays set by commands on stdin (see the module's docstring); EOF ends it."""
    loop = asyncio.get_running_loop()
    one_way_s = [0.0]
    servers: list[asyncio.Server] = []
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := (await reader.readline()).decode():
            command, _, arg = line.strip().partition(" ")
            try:
                if command == "add":
                    server = await start_delay_shim(("127.0.0.1", 0), _hostport(arg), lambda: one_way_s[0])
                    servers.append(server)
                    host, port = server.sockets[0].getsockname()[:2]
                    print(f"LISTENING {host} {port}", flush=True)
                    continue
                if command == "delay" and float(arg) >= 0:
                    one_way_s[0] = float(arg) / 1000.0
                    print("OK", flush=True)
                    continue
            except (ValueError, OSError, argparse.ArgumentTypeError) as exc:
                print(f"ERROR {exc}", flush=True)
                continue
            print(f"ERROR expected 'add HOST:PORT' or 'delay MS', got {line.strip()!r}", flush=True)
    finally:
        for server in servers:
            server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", type=_hostport, help="HOST:PORT to accept on")
    parser.add_argument("--target", type=_hostport, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, help="one-way delay per direction")
    parser.add_argument("--control", action="store_true", help="take 'add HOST:PORT' and 'delay MS' on stdin")
    args = parser.parse_args(argv)
    if not args.control and None in (args.listen, args.target, args.delay_ms):
        parser.error("--listen, --target and --delay-ms are required without --control")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_control() if args.control else _main(args))


if __name__ == "__main__":
    main()

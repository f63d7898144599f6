"""Supervision of the p2pd child process that hivemind's P2P runs for us.

p2pd is a peer's (or bootstrap node's) only network: every stream and every DHT message goes
through it. If it dies (killed, crashed, OOM), the Python process keeps running without a network
and a supervisor (systemd, Docker) sees nothing wrong. So we watch it, and when it exits without
being asked to, the daemon stops with a clear error and a non-zero exit status, to be restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from hivemind.p2p import P2P, P2PDaemonError, PeerID
from hivemind.utils.multiaddr import Multiaddr

from peerd.rpc.fdlimit import raise_open_files_limit

__all__ = [
    "CONN_LIMITS",
    "RELAY_LIMITS",
    "P2PDaemonLost",
    "connect_in_turn",
    "daemon_multiaddr",
    "p2pd_pid",
    "start_p2p",
    "wait_for_p2pd_exit",
]

# p2pd's circuit-relay (v2) flags for a reachable peer. They reach only the relay go-libp2p starts
# once AutoNAT finds a public address; p2pd also always runs one with go-libp2p's defaults (128 KiB,
# 2 min per relayed connection), so peerd's own data never relies on circuits: it goes through
# peerd/relay/1 (peerd/rpc/relay.py, docs/decisions.md section 8).
# p2pd's connection manager: past connHi connections it closes the least useful ones down to connLo,
# sparing those younger than connGrace. Fresh identities are free, so a flood of connections is
# trimmed after 30 s (go-libp2p's default grace is 2 min); 512 stays far below the open-files limit
# peerd raises at start (raise_open_files_limit), which p2pd inherits.
CONN_LIMITS: dict[str, object] = {"connLo": 256, "connHi": 512, "connGrace": "30s"}

RELAY_LIMITS: dict[str, object] = {
    "relayMaxReservations": 64,  # NATed peers that may hold a slot here at once
    "relayMaxCircuits": 16,  # relayed connections at once, per reserving peer
    "relayDataLimit": 4 << 30,
    "relayTimeLimit": "30m",
}
logger = logging.getLogger(__name__)
DIAL_YIELD_S = 1.0  # how long the higher peer id of a pair waits for the lower one's connection
DIAL_POLL_S = 0.05
BOOTSTRAP_ATTEMPTS = 3  # p2pd starts that may fail to reach the initial peers before we give up

# exec argv[1:] in a new session (same pid: the p2pd hivemind waits for is this process)
_NEW_SESSION_EXEC = "import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])"


class P2PDaemonLost(ConnectionError):
    """The p2pd child exited on its own: this process has no network left."""

    def __init__(self, pid: int | None, returncode: int | None) -> None:
        self.pid, self.returncode = pid, returncode
        super().__init__(
            f"the libp2p daemon (p2pd, pid {pid}) exited with status {returncode}: this process has no network "
            "left and stops; run it again (a supervisor such as systemd restarts it on its own)"
        )


def _child(p2p: P2P) -> asyncio.subprocess.Process | None:
    # hivemind 1.1.12 keeps the p2pd process here (pinned in pyproject; checked by a test)
    child = getattr(p2p, "_child", None)
    return child if isinstance(child, asyncio.subprocess.Process) else None


def p2pd_pid(p2p: P2P) -> int | None:
    child = _child(p2p)
    return child.pid if child is not None else None


async def wait_for_p2pd_exit(p2p: P2P, stop: asyncio.Event) -> P2PDaemonLost | None:
    """Wait until ``stop`` is set (None) or p2pd exits first (the error to report)."""
    child = _child(p2p)
    waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(stop.wait())}
    if child is not None:
        waiters.add(asyncio.ensure_future(child.wait()))
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
    if stop.is_set() or child is None:
        return None
    return P2PDaemonLost(child.pid, child.returncode)


async def start_p2p(
    *,
    host_maddrs: Sequence[str],
    initial_peers: Sequence[str] = (),
    identity_path: str | None = None,
    announce_maddrs: Sequence[str] = (),
    relays: Sequence[str] = (),
) -> P2P:
    """Start p2pd for a peer or bootstrap node.

    Without ``relays`` the node is dialable: it offers circuit-relay service to NATed peers within
    :data:`RELAY_LIMITS`. With ``relays`` (multiaddrs of reachable peers) it is not: it reserves a
    slot on exactly those relays and nowhere else (no relay discovery: p2pd would otherwise pick
    any relay-capable peer, and the circuit address we announce would not work), runs its libp2p
    DHT as a client, and relays for nobody.
    """
    raise_open_files_limit()  # before p2pd starts, so that it inherits the raised limit too
    options: dict[str, object] = {}
    if relays:
        flags: dict[str, object] = {"relayDiscovery": False, "relayService": False, **CONN_LIMITS}
        # AutoNAT cannot judge private addresses, so we tell p2pd what dial-back found out
        options = dict(
            use_auto_relay=True, trusted_relays=list(relays), force_reachability="private", dht_mode="client"
        )
    else:
        flags = {"relayService": True, **RELAY_LIMITS, **CONN_LIMITS}

    def process_args(*args: object, **kwargs: object) -> list[str]:
        command: list[str] = P2P._make_process_args(*args, **{**kwargs, **flags})
        # p2pd in a session of its own: Ctrl-C in a terminal (SIGINT to the foreground process group)
        # or a SIGTERM to our process group reaches peerd alone, which drains, announces itself
        # offline through p2pd, and only then stops it. (systemd: KillMode=mixed, see deploy/.)
        return [sys.executable, "-c", _NEW_SESSION_EXEC, *command]

    # hivemind 1.1.12 exposes no way to pass these p2pd flags; its argument builder is overridden
    # on a subclass (hivemind is pinned, and tests/slow/test_nat_swarm.py runs the result)
    launcher: type[P2P] = type("PeerdP2P", (P2P,), {"_make_process_args": staticmethod(process_args)})
    for attempt in range(BOOTSTRAP_ATTEMPTS):
        try:
            p2p: P2P = await launcher.create(
                initial_peers=list(initial_peers) or None,
                host_maddrs=list(host_maddrs),
                announce_maddrs=list(announce_maddrs) or None,
                identity_path=identity_path,
                # an identity "taken" check spins up a second p2pd just to ask; a restarted peer with
                # the same key must be usable at once, and the key file lock already rules out twins
                check_if_identity_free=False,
                **options,
            )
            return p2p
        except P2PDaemonError as exc:
            # p2pd gives up on its initial peers after one round of dials; on a busy machine, or
            # while the peer we join through is still starting, a second round usually connects
            if "failed to connect to bootstrap peers" not in str(exc) or attempt + 1 == BOOTSTRAP_ATTEMPTS:
                raise
            logger.warning("p2pd could not reach its initial peers (%s); trying again", exc)
            await asyncio.sleep(1.0 + attempt)
    raise AssertionError("unreachable")  # the loop returns or raises


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


_P2P_CODE, _CIRCUIT_CODE = 421, 290  # multicodec table: /p2p/<multihash>, /p2p-circuit


def daemon_multiaddr(text: str) -> Multiaddr:
    """A multiaddr as p2pd's control protocol wants it, e.g. ``/ip4/R/tcp/P/p2p/<relay>/p2p-circuit``.

    hivemind's Python Multiaddr encodes a ``/p2p/<id>`` component as a CIDv1, which p2pd rejects
    ("length greater than remaining number of bytes"); go-multiaddr expects the raw multihash.
    """
    head, _, rest = text.partition("/p2p/")
    raw = Multiaddr(head).to_bytes() if head else b""
    while rest:
        peer, _, tail = rest.partition("/")
        multihash = PeerID.from_base58(peer).to_bytes()
        raw += _varint(_P2P_CODE) + _varint(len(multihash)) + multihash
        rest = ""
        if tail:
            nxt, _, rest = ("/" + tail).partition("/p2p/")
            if nxt == "/p2p-circuit":
                raw += _varint(_CIRCUIT_CODE)
            elif nxt:
                raw += Multiaddr(nxt).to_bytes()
    return Multiaddr(raw)


async def is_connected(p2p: P2P, peer_id: str) -> bool:
    """Whether p2pd holds a connection to ``peer_id`` now (either side may have dialled)."""
    return any(str(info.peer_id) == peer_id for info in await p2p.list_peers())


async def connect_in_turn(p2p: P2P, peer_id: str, addrs: Sequence[str], *, yield_s: float = DIAL_YIELD_S) -> None:
    """Connect to ``peer_id`` at ``addrs`` unless connected, taking turns with it: of two peers that
    may dial each other at the same moment, the lower peer id dials at once and the higher one waits
    up to ``yield_s`` for that connection before dialling itself.

    Two p2pd daemons dialling each other at the same instant can both fail the Noise handshake
    ("noise: message is too short"; about one first contact in 30 on loopback), and libp2p then
    refuses every dial between them for 5-6 s ("dial backoff"), growing with each failure; as both
    back off in step, their next dials can collide again. Raises what p2pd's connect raises.
    """
    if await is_connected(p2p, peer_id):
        return
    if str(p2p.peer_id) > peer_id:
        deadline = asyncio.get_running_loop().time() + yield_s
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(DIAL_POLL_S)
            if await is_connected(p2p, peer_id):
                return
    await p2p._client.connect(PeerID.from_base58(peer_id), [daemon_multiaddr(a) for a in addrs])

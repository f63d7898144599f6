"""Can other machines dial this peer, or must it be reached through a relay?

At start-up a peer asks the peers it joins through to dial it back (``peerd/dialback/1``, see
``peerd/rpc/dialback.py``). If any of them can, it is *direct*: it announces its own addresses and
offers relay service to others. If they all answer but none can, it is behind NAT or a firewall:
it is *relayed* through those same peers (they answered, so they are reachable), reserving a
circuit-relay-v2 slot on each and announcing ``<relay>/p2p-circuit`` addresses in its signed
record, which clients dial. If nobody answers (old peers, no initial peers), it cannot know and
stays as it is ("unknown"), as before this existed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from hivemind.p2p import P2P

from peerd.rpc.dialback import ask_dial_back
from peerd.rpc.p2pd import start_p2p
from peerd.swarm.addresses import peer_id_of, rank_maddrs

__all__ = ["REACH_MODES", "Reachability", "dial_addresses", "discover_reachability", "start_network"]

REACH_MODES = ("auto", "direct", "relayed")
MAX_ASKED = 3  # initial peers asked to dial back

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reachability:
    """How others reach this peer: ``reach`` is "direct", "relayed" or "unknown"; ``relays`` are
    the multiaddrs (with /p2p/<id>) of the relays a relayed peer reserves slots on."""

    reach: str
    relays: tuple[str, ...] = ()
    detail: str = ""


async def _listen_port(p2p: P2P) -> int | None:
    for maddr in rank_maddrs([str(m) for m in await p2p.get_visible_maddrs()]):
        parts = maddr.split("/")
        if "tcp" in parts and "p2p-circuit" not in parts:
            return int(parts[parts.index("tcp") + 1])
    return None


async def discover_reachability(p2p: P2P, initial_peers: Sequence[str], mode: str = "auto") -> Reachability:
    """Decide how this peer is reached (``mode`` "direct"/"relayed" forces it; "auto" asks)."""
    joins = [m for m in dict.fromkeys(initial_peers) if peer_id_of(m)][:MAX_ASKED]
    if mode == "direct" or not joins:
        return Reachability("direct" if mode == "direct" else "unknown", (), "nobody to ask" if not joins else "")
    if mode == "relayed":
        return Reachability("relayed", tuple(joins), "--reachability relayed")
    port = await _listen_port(p2p)
    if port is None:
        return Reachability("unknown", (), "no TCP listening address")
    answers = await asyncio.gather(
        *(ask_dial_back(p2p, str(peer_id_of(m)), port) for m in joins), return_exceptions=True
    )
    for maddr, answer in zip(joins, answers, strict=True):
        if isinstance(answer, BaseException):
            logger.debug("dial-back via %s failed: %s", maddr, answer)
    dialled = [a for a in answers if not isinstance(a, BaseException) and a.reachable]
    if dialled:
        return Reachability("direct", (), f"dialled back at {dialled[0].observed}")
    relays = tuple(m for m, a in zip(joins, answers, strict=True) if not isinstance(a, BaseException))
    if relays:
        seen = {a.observed for a in answers if not isinstance(a, BaseException) and a.observed}
        return Reachability("relayed", relays, f"nobody could dial {', '.join(sorted(seen)) or 'us'}")
    return Reachability("unknown", (), "no peer answered the dial-back request")


async def dial_addresses(p2p: P2P, reachability: Reachability, relays: Sequence[str] = ()) -> tuple[str, ...]:
    """The addresses a record gives for dialling this peer (without /p2p/<own id>), best first.

    A relayed peer gives ``relays``, those holding a reservation for it now, as circuit addresses:
    clients read its relays from them (none: nobody can reach it).
    """
    if reachability.reach == "relayed":
        return tuple(f"{relay}/p2p-circuit" for relay in relays)
    own = f"/p2p/{p2p.peer_id}"
    ranked = rank_maddrs([str(m) for m in await p2p.get_visible_maddrs()])
    return tuple(m.removesuffix(own) for m in ranked if "p2p-circuit" not in m)[:8]


async def start_network(
    *,
    host_maddrs: Sequence[str],
    initial_peers: Sequence[str],
    identity_path: str,
    announce_maddrs: Sequence[str] = (),
    mode: str = "auto",
) -> tuple[P2P, Reachability]:
    """Start p2pd, find out how others reach us, and restart it as a relayed node if we are not dialable.

    p2pd takes its relay options only at start, and the dial-back needs a running p2pd: so a peer
    behind NAT starts twice (about a second; the identity, hence the peer id, stays the same).
    """
    p2p = await start_p2p(
        host_maddrs=host_maddrs,
        initial_peers=initial_peers,
        identity_path=identity_path,
        announce_maddrs=announce_maddrs,
    )
    try:
        reachability = await discover_reachability(p2p, initial_peers, mode)
    except BaseException:
        await p2p.shutdown()
        raise
    if reachability.reach == "relayed":
        await p2p.shutdown()
        p2p = await start_p2p(
            host_maddrs=host_maddrs,
            initial_peers=initial_peers,
            identity_path=identity_path,
            relays=reachability.relays,
        )
    logger.info("reachability: %s%s", reachability.reach, f" ({reachability.detail})" if reachability.detail else "")
    if reachability.reach == "relayed":
        logger.info("reached through relay(s): %s", ", ".join(reachability.relays))
    return p2p, reachability

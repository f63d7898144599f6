"""Why no inference route exists: nobody serves some blocks, they are busy, or the request is too big.

All three look the same to the planner (no chain of peers with room for the session), but they call
for different actions: start a peer, retry later, or ask for fewer tokens. This tells them apart from
the records the planner saw, so the user's error names the right problem.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from peerd.client.routing import missing_blocks
from peerd.rpc.errors import NoRouteError, RequestTooLargeError, SwarmBusyError
from peerd.swarm.records import ServerRecord
from peerd.swarm.status import block_ranges

__all__ = ["explain_no_route", "longest_session"]


def longest_session(record: ServerRecord, batch_size: int) -> int | None:
    """The longest session (positions) ``record``'s peer admits at ``batch_size``; None: it does not say."""
    limits = []
    if record.max_session_length > 0:
        limits.append(record.max_session_length)
    if record.session_tokens_max > 0:
        limits.append(record.session_tokens_max // max(1, batch_size))
    return min(limits) if limits else None


def explain_no_route(
    servers: Mapping[str, ServerRecord],
    start: int,
    end: int,
    *,
    max_length: int,
    batch_size: int = 1,
    banned: Iterable[str] = (),
    reserved_tokens: Mapping[str, int] | None = None,
    full: Iterable[str] = (),
) -> NoRouteError | RequestTooLargeError:
    """The error to raise when no route through [start, end) has room for a session of ``max_length``.

    * some block has no live peer: :class:`NoRouteError` (start a peer, or wait for one);
    * every peer of some block would refuse the session at any load (its per-session cap or its
      longest session is below ``max_length``): :class:`RequestTooLargeError` with the swarm's limit;
    * else the peers of some block are full now: :class:`SwarmBusyError` (a retryable NoRouteError).

    ``full``: banned peers whose ban was for answering "no room" (CACHE_FULL and the like); they
    serve, with no cache free, rather than not at all.
    """
    banned, full = set(banned), set(full)
    reserved = dict(reserved_tokens or {})
    reserved.update({p: servers[p].cache_tokens_free for p in full if p in servers})
    live = {p: r for p, r in servers.items() if (p not in banned or p in full) and r.decode_tokens_per_s > 0}
    missing = missing_blocks(live, start, end)
    if missing:
        return NoRouteError(missing)
    needed = max_length * batch_size
    too_small: list[int] = []
    limit = max_length
    busy: list[int] = []
    most_free = 0
    for block in range(start, end):
        serving = [r for r in live.values() if r.start <= block < r.end]
        longest = [longest_session(r, batch_size) for r in serving]
        if all(n is not None and n < max_length for n in longest):
            too_small.append(block)
            limit = min(limit, max(n for n in longest if n is not None))
            continue
        free = [r.cache_tokens_free - reserved.get(r.peer_id, 0) for r in serving]
        if max(free) < needed:
            busy.append(block)
            most_free = max(most_free, max(free))
    if too_small:
        what = f"the peers serving block(s) {block_ranges(too_small)} admit sessions of"
        return RequestTooLargeError(max_length, limit, what)
    return SwarmBusyError(busy or list(range(start, end)), needed, max(0, most_free))

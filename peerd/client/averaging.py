"""Data parallelism across trainers: averaging rounds over the client's own P2P node and DHT.

Trainers of one run (``--collaborate RUN``) average, in rounds, either their gradients before a
common optimizer step (:meth:`Averager.exchange`, then :meth:`Averager.commit`) or their adapters
after local steps (:meth:`Averager.average`, local SGD). A round:

1. **Matchmaking over the DHT.** Each member stores ``{addrs, at}`` under the key
   ``<swarm>.run.<RUN>.<round>`` in its own signed subkey (so the peer id is authenticated and
   only trainers of this run meet). The group closes a window after the earliest ``at``;
   everyone reads the key after that instant and takes the members that arrived before it.
2. **All-gather.** Each member pushes its vector (gradient, or adapter minus the common base;
   optionally fp16 / 8-bit) to every other member (``peerd/average/1``) and waits up to
   ``round_timeout_s`` for theirs. A member that died or stalls is simply left out.
3. **Aggregate** (peerd/client/aggregation.py): every member combines the same decoded vectors in
   peer-id order (its own decoded from the wire form too), so all get the same result bit for bit.

A late trainer downloads the adapter and optimizer state (``peerd/state/1``) and joins the next
round. Why not hivemind's ``DecentralizedAverager``: docs/decisions.md (a forked process).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from typing import Any

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time
from torch import Tensor

from peerd.client.aggregation import Contribution, aggregate
from peerd.client.run_records import AveragingConfig, Member, RoundReport, check_push, check_state, digest
from peerd.rpc.p2pd import connect_in_turn
from peerd.rpc.tensors import from_wire, to_wire
from peerd.swarm.dht import SwarmDHT
from protocols import (
    STREAM_AVERAGE,
    STREAM_STATE,
    AverageAck,
    AveragePush,
    ErrorCode,
    ProtocolError,
    StateRequest,
    StateResponse,
    decode_message,
    encode_frame,
    error_from_exception,
    expect_message,
    frame_parts,
    read_frame,
    write_parts,
)

__all__ = ["Averager", "AveragingConfig", "RoundReport"]

logger = logging.getLogger(__name__)

MAX_GROUP = 64  # members of one round that a trainer will exchange with
PUSH_RETRY_S = 0.2  # pause before pushing again to a member whose stream failed


class Averager:
    """One trainer's side of a run's averaging rounds over ``p2p`` and ``dht``.

    Holds the run's common ``base`` (the flat adapter every member agreed on last) and serves it to
    late joiners. Create with ``await Averager.create(...)``; :meth:`average` runs one round;
    :meth:`close` stops serving. Not thread safe: call it from the event loop that owns ``p2p``.
    """

    def __init__(
        self, p2p: P2P, dht: SwarmDHT, config: AveragingConfig, base: Tensor, extra: Tensor | None = None
    ) -> None:
        self.p2p = p2p
        self.dht = dht
        self.config = config
        self.base = base.detach().float().clone()  # [n]
        # state that travels with the base to late joiners but is never averaged (optimizer moments)
        self.extra = torch.zeros(0) if extra is None else extra.detach().float().reshape(-1).clone()  # [m]
        self.round = 0  # the next round this member takes part in
        self.peer_id = str(p2p.peer_id)
        self.addrs: list[str] = []
        self._inbox: dict[int, dict[str, tuple[float, Tensor, int]]] = {}  # round -> sender -> update
        self._arrived = asyncio.Condition()
        self.reports: list[RoundReport] = []
        self._last_round_end = time.monotonic()  # local work since then sizes the next round's window
        self._window_s = 0.0

    @property
    def size(self) -> int:
        return int(self.base.numel())

    def round_key(self, round_: int) -> str:
        """The DHT key of round ``round_`` of this run (its members' entries)."""
        return self._run_key(round_)

    def _run_key(self, round_: int | None = None) -> str:
        key = f"{self.dht.prefix}.run.{self.config.run}"
        return key if round_ is None else f"{key}.{round_}"

    @classmethod
    async def create(
        cls, p2p: P2P, dht: SwarmDHT, config: AveragingConfig, initial: Tensor, extra: Tensor | None = None
    ) -> Averager:
        """Serve this run's streams and, if the run has members already, download its state
        (``initial [n]`` and ``extra [m]`` are replaced by the run's then)."""
        averager = cls(p2p, dht, config, initial, extra)
        averager.addrs = [str(a) for a in await p2p.get_visible_maddrs()]
        await p2p.add_binary_stream_handler(STREAM_AVERAGE, averager._serve_push)
        await p2p.add_binary_stream_handler(STREAM_STATE, averager._serve_state)
        if await averager._catch_up(at_least=0):
            logger.info("joined run %s at round %d", config.run, averager.round)
        return averager

    async def _catch_up(self, *, at_least: int) -> bool:
        """Take the state of the member furthest ahead on the run key, if one is at round ``at_least`` or later."""
        entries = await self.dht.read_owned(self._run_key(), timeout_s=self.config.dht_timeout_s)
        members = Member.by_peer(entries.values(), self.peer_id)
        for peer_id, member in sorted(members.items(), key=lambda kv: -kv[1].round):
            if peer_id == self.peer_id or member.round < at_least:
                continue
            with contextlib.suppress(OSError, TimeoutError, ProtocolError, ValueError):
                await self._adopt_state(peer_id, member.addrs, at_least=at_least)
                return True
        return False

    async def close(self) -> None:
        for name in (STREAM_AVERAGE, STREAM_STATE):
            with contextlib.suppress(Exception):  # p2pd may already be gone
                await self.p2p.remove_binary_stream_handler(name)

    async def average(
        self, current: Tensor, weight: float, *, window_s: float | None = None
    ) -> tuple[Tensor, RoundReport]:
        """Parameter averaging: run round ``self.round`` with this member's adapter ``current [n]``
        trained on ``weight`` samples; the adapter to continue from, and the report.

        Never raises for other members' failures (they are left out), only waits at most the
        window plus one round timeout.
        """
        flat = current.detach().float().reshape(-1)  # [n]
        delta = flat - self.base  # [n]
        update, report, adopted = await self._round(delta, weight, window_s)
        if update is None:  # our update was not averaged this round: keep it, so it counts in the next one
            return (self.base + delta if adopted else flat), report
        self.base = self.base + update  # [n]
        report.digest = digest(self.base)
        self._finish_round(self.round)
        await self._announce()
        return self.base.clone(), report

    async def exchange(
        self, vector: Tensor, weight: float, *, window_s: float | None = None
    ) -> tuple[Tensor | None, RoundReport]:
        """Gradient averaging: combine ``vector [n]`` (our mean gradient over ``weight`` samples) with
        the group's; the combined vector, or None when we were late (then :attr:`base` and
        :attr:`extra` hold the group's state after the round, to continue from).

        Does not end the round: every member applies the result to :attr:`base` with the optimizer
        state :attr:`extra`, then calls :meth:`commit` with what it got.
        """
        update, report, _ = await self._round(vector.detach().float().reshape(-1), weight, window_s)
        return update, report

    async def commit(self, base: Tensor, extra: Tensor | None = None) -> str:
        """End the round with the adapter ``base [n]`` (and optimizer state ``extra``) it produced; its digest."""
        self.base = base.detach().float().reshape(-1).clone()  # [n]
        if extra is not None:
            self.extra = extra.detach().float().reshape(-1).clone()  # [m]
        self._finish_round(self.round)
        await self._announce()
        return digest(self.base)

    async def _round(
        self, vector: Tensor, weight: float, window_s: float | None
    ) -> tuple[Tensor | None, RoundReport, bool]:
        """Group, agree on the base, all-gather ``vector``, aggregate: (combined or None if late, report, adopted)."""
        started = time.perf_counter()
        report = RoundReport(round=self.round)
        group = await self._form_group(self.round, window_s)
        report.window_s = self._window_s
        report.group = sorted(group)
        if self.peer_id in group and not await self._agree_on_base(group):
            del group[self.peer_id]  # no copy of the group's base to add our update to: sit this round out
        if list(group) == [self.peer_id] and await self._catch_up(at_least=self.round + 1):
            group = {}  # alone in a round the others have left behind: we fell behind, and caught up
        if self.peer_id not in group:
            report.late = True
            adopted = bool(not group) or await self._adopt_from_group(group, self.round)
            report.elapsed_s = time.perf_counter() - started
            self.reports.append(report)
            self._last_round_end = time.monotonic()
            return None, report, adopted
        wire = to_wire(vector, self.config.compression)
        own = from_wire(wire).float()  # what the others will decode: use the same numbers
        others = {p: m.addrs for p, m in group.items() if p != self.peer_id}
        # push and collect at once: a dead member costs one round timeout, not one for each phase
        pushes = asyncio.gather(*(self._push(p, addrs, weight, wire) for p, addrs in others.items()))
        sent, received = await asyncio.gather(pushes, self._collect(self.round, set(others)))
        report.bytes_sent = sum(sent)
        report.missing = sorted(set(others) - set(received))
        report.bytes_received = sum(nbytes for _, _, nbytes in received.values())
        contributions = [Contribution(self.peer_id, weight, own)]
        contributions += [Contribution(p, w, v) for p, (w, v, _) in received.items()]
        cfg = self.config
        result = aggregate(contributions, self.size, method=cfg.aggregation, max_norm_factor=cfg.max_norm_factor)
        report.used, report.excluded = result.used, result.excluded
        report.samples = sum(c.weight for c in contributions if c.peer_id in result.used)
        if result.excluded:
            logger.warning("round %d: left out %s", self.round, result.excluded)
        report.elapsed_s = time.perf_counter() - started
        self.reports.append(report)
        self._last_round_end = time.monotonic()
        return result.update, report, True

    def _finish_round(self, round_: int) -> None:
        self.round = round_ + 1
        for r in [r for r in self._inbox if r < self.round]:
            del self._inbox[r]

    async def _announce(self) -> None:
        """Say on the run key that we hold the base of round ``self.round`` (for late joiners)."""
        value = {"peer": self.peer_id, "addrs": self.addrs, "round": self.round}
        with contextlib.suppress(TimeoutError, OSError):
            await self.dht.store_owned(
                self._run_key(), value, expiration_s=self.config.record_ttl_s, timeout_s=self.config.dht_timeout_s
            )

    async def _form_group(self, round_: int, window_s: float | None = None) -> dict[str, Member]:
        """Members of ``round_`` by peer id: those that arrived before the window closed.

        The window is the first arrival's: ``group_window_s`` plus the local work it did since its
        last round (so a peer up to twice as slow as the first still makes it), or the ``window_s``
        the caller proposes, capped at the round timeout. Everyone reads the same first record, so
        everyone closes at the same instant.
        """
        cfg = self.config
        key = self._run_key(round_)
        if window_s is None:
            window_s = cfg.group_window_s + time.monotonic() - self._last_round_end
        window_s = min(window_s, cfg.round_timeout_s)
        mine = {"peer": self.peer_id, "addrs": self.addrs, "at": get_dht_time(), "base": digest(self.base)}
        mine["window"] = window_s
        await self.dht.store_owned(key, mine, expiration_s=cfg.record_ttl_s, timeout_s=cfg.dht_timeout_s)
        give_up = time.monotonic() + cfg.group_window_s + 2 * cfg.round_timeout_s
        while True:
            entries = await self.dht.read_owned(key, timeout_s=cfg.dht_timeout_s)
            members = {p: m for p, m in Member.by_peer(entries.values(), self.peer_id).items() if m.at > 0}
            first = min(members.values(), key=lambda m: (m.at, m.peer), default=None)
            close = get_dht_time() if first is None else first.at + max(0.0, min(first.window, cfg.round_timeout_s))
            wait_s = close - get_dht_time()
            if wait_s <= 0 or time.monotonic() > give_up:
                self._window_s = 0.0 if first is None else close - first.at
                arrived = sorted((p for p, m in members.items() if m.at <= close), key=lambda p: members[p].at)
                return {p: members[p] for p in arrived[:MAX_GROUP]}
            await asyncio.sleep(min(wait_s, 0.1) + 0.01)  # past the close by a hair: every member reads after it

    async def _agree_on_base(self, group: dict[str, Member]) -> bool:
        """Make our base the group's: the digest most members hold (ties: the lowest peer id's).

        Bases differ when trainers started apart (each from its own initial adapter) or a push was
        lost in an earlier round; a member off the common base takes it from a holder and keeps its
        own update on top, so nothing it trained is lost.
        """
        counts: dict[str, int] = {}
        for m in group.values():
            counts[m.base] = counts.get(m.base, 0) + 1
        holders = {d: min(p for p, m in group.items() if m.base == d) for d in counts}
        common = min(counts, key=lambda d: (-counts[d], holders[d]))
        if digest(self.base) == common:
            return True
        for peer_id, m in sorted(group.items()):
            if m.base != common or peer_id == self.peer_id:
                continue
            with contextlib.suppress(OSError, TimeoutError, ProtocolError, ValueError):
                await self._adopt_state(peer_id, m.addrs, at_least=self.round, expect_digest=common)
                return True
        return False

    async def _adopt_from_group(self, group: dict[str, Member], round_: int) -> bool:
        """Late for ``round_``: take the group's result from one of its members (polling until they have it)."""
        deadline = time.monotonic() + self.config.round_timeout_s + self.config.group_window_s
        while time.monotonic() < deadline:
            for peer_id, member in group.items():
                with contextlib.suppress(OSError, TimeoutError, ProtocolError, ValueError):
                    await self._adopt_state(peer_id, member.addrs, at_least=round_ + 1)
                    return True
            await asyncio.sleep(0.2)
        self._finish_round(round_)  # nobody answered: go on alone from our own adapter
        return False

    async def _open(self, peer_id: str, addrs: list[str], stream: str) -> tuple[Any, Any]:
        """A stream to a member; every failure (p2pd's ControlFailure included) as ConnectionError."""
        try:
            peer = PeerID.from_base58(peer_id)
            async with asyncio.timeout(self.config.round_timeout_s):
                with contextlib.suppress(Exception):  # the stream open below reports the failure
                    await connect_in_turn(self.p2p, peer_id, addrs)  # members push to each other at once
                _, reader, writer = await self.p2p.call_binary_stream_handler(peer, stream)
        except TimeoutError:
            raise
        except Exception as exc:
            raise ConnectionError(f"cannot open {stream} to {peer_id}: {exc}") from exc
        return reader, writer

    async def _push(self, peer_id: str, addrs: list[str], weight: float, wire: Any) -> int:
        """Send our update to one member; the bytes sent (0 if it failed: that member misses it).

        A push that fails fast (a fresh connection reset while both members dial each other, a
        stream refused) is tried again, jittered, until the round timeout (keep it above libp2p's
        6 s "dial backoff" after a failed dial); the receiver keeps one per sender.
        """
        parts = frame_parts([AveragePush(run=self.config.run, round=self.round, weight=float(weight), update=wire)])
        deadline = time.monotonic() + self.config.round_timeout_s
        for attempt in itertools.count(1):
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    reader, writer = await self._open(peer_id, addrs, STREAM_AVERAGE)
                    try:
                        size = write_parts(writer, parts)
                        await writer.drain()
                        expect_message(decode_message(await read_frame(reader)), AverageAck)
                    finally:
                        writer.close()
                return size
            except ProtocolError as exc:  # the member refused this update: repeating it changes nothing
                logger.warning("round %d: %s refused our update: %s", self.round, peer_id, exc)
                break
            except (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError, EOFError) as exc:
                if deadline - time.monotonic() < PUSH_RETRY_S:
                    logger.warning("round %d: push to %s failed (%d tries): %r", self.round, peer_id, attempt, exc)
                    break
                await asyncio.sleep(PUSH_RETRY_S * (0.5 + random.random()))  # not in step with the other side
        return 0

    async def _collect(self, round_: int, expected: set[str]) -> dict[str, tuple[float, Tensor, int]]:
        """Wait until every expected member's push for ``round_`` arrived, or the round timeout."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.round_timeout_s), self._arrived:
                await self._arrived.wait_for(lambda: expected <= set(self._inbox.get(round_, {})))
        got = self._inbox.get(round_, {})
        return {p: got[p] for p in expected if p in got}

    async def _adopt_state(self, peer_id: str, addrs: list[str], *, at_least: int, expect_digest: str = "") -> None:
        """Replace our base by ``peer_id``'s if it is at round ``at_least`` or later (else ValueError)."""
        reader, writer = await self._open(peer_id, addrs, STREAM_STATE)
        try:
            async with asyncio.timeout(self.config.round_timeout_s):
                writer.write(encode_frame(StateRequest(run=self.config.run)))
                await writer.drain()
                answer = expect_message(decode_message(await read_frame(reader)), StateResponse)
        finally:
            writer.close()
        state, extra = check_state(answer, self.size, self.extra.numel(), at_least=at_least, digest_=expect_digest)
        self.base, self.extra = state.clone(), extra.clone()
        self._finish_round(answer.round - 1)

    async def _serve_push(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sender = str(info.peer_id)  # authenticated by libp2p: nobody can push as another member
        try:
            try:
                async with asyncio.timeout(self.config.round_timeout_s):
                    body = await read_frame(reader)
                push = expect_message(decode_message(body), AveragePush)
                update = check_push(push, self.config.run, self.round, self.size)
                async with self._arrived:
                    inbox = self._inbox.setdefault(push.round, {})
                    if len(inbox) < MAX_GROUP:
                        inbox[sender] = (push.weight, update, len(body) + 4)
                    self._arrived.notify_all()
                writer.write(encode_frame(AverageAck(round=push.round)))
            except ProtocolError as exc:
                writer.write(encode_frame(error_from_exception(exc)))
            await writer.drain()
        except (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError, EOFError):
            pass  # the sender went away; its update is simply missing from the round
        finally:
            writer.close()

    async def _serve_state(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(self.config.round_timeout_s):
                    request = expect_message(decode_message(await read_frame(reader)), StateRequest)
                if request.run != self.config.run:
                    raise ProtocolError(ErrorCode.NOT_ALLOWED, f"this trainer is in run {self.config.run!r}")
                state = StateResponse(round=self.round, state=to_wire(torch.cat([self.base, self.extra])))
                write_parts(writer, frame_parts([state]))
            except ProtocolError as exc:
                writer.write(encode_frame(error_from_exception(exc)))
            await writer.drain()
        except (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError, EOFError):
            pass
        finally:
            writer.close()

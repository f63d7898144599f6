"""The peer daemon: startup() -> serve() -> shutdown(), owning all of its tasks.

Phases are explicit (as in uvicorn's server): startup joins the swarm, loads the hosted blocks,
measures throughput and starts the RPC handlers; serve() keeps the DHT records fresh until asked to
stop; shutdown() announces the peer offline, drains and releases everything within a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import replace

import torch
from hivemind.p2p import P2P
from hivemind.utils.crypto import RSAPrivateKey

from peerd import __version__
from peerd.config import PeerConfig
from peerd.daemon.capacity import (
    Capacity,
    Hardware,
    blocks_to_host,
    load_hosted_blocks,
    measure_capacity,
    probe_hardware,
)
from peerd.daemon.nexthops import NextHops
from peerd.daemon.placement import PlacedPeer, Placement, choose_placement, decide_move, recheck_after_joining
from peerd.daemon.reachability import Reachability, dial_addresses, start_network
from peerd.daemon.relaying import Relaying
from peerd.daemon.routes import peer_app, refresh_peer_gauges
from peerd.identity import IdentityLock, load_or_create_identity, lock_identity, peer_id_of_public_key
from peerd.model.config import ModelConfig
from peerd.model.loading import default_dtype_for
from peerd.model.stage import Stage, cache_bytes_per_token
from peerd.rpc.dialback import DialBackService
from peerd.rpc.p2pd import P2PDaemonLost, wait_for_p2pd_exit
from peerd.rpc.streams import STREAM_NAMES
from peerd.server.bounds import stream_gate
from peerd.server.handlers import BlockServicer
from peerd.server.limits import Limits
from peerd.server.metrics import PeerMetrics
from peerd.server.runtime import ComputeRuntime
from peerd.server.sessions import CacheBudget
from peerd.swarm.addresses import listen_maddrs, rank_maddrs
from peerd.swarm.dht import SwarmDHT, records_of
from peerd.swarm.records import PeerState, ServerRecord, latest_per_peer, swarm_prefix
from peerd.web.server import AsgiServer
from protocols import PROTOCOL_VERSION, STREAM_DIALBACK

__all__ = ["Peer"]

PLACEMENT_RECHECKS = 3  # look again this many times after announcing JOINING (see placement.py)

logger = logging.getLogger(__name__)


class Peer:
    """One daemon: a P2P node, a DHT node on it, and the blocks it serves."""

    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.metrics = PeerMetrics()
        self.model_config = ModelConfig.from_pretrained(config.model_path)
        self.prefix = swarm_prefix(config.swarm, config.model_id)
        self.state = PeerState.OFFLINE
        self.p2p: P2P | None = None
        self.dht: SwarmDHT | None = None
        self.stage: Stage | None = None
        self.runtime: ComputeRuntime | None = None
        self.servicer: BlockServicer | None = None
        self.hardware: Hardware | None = None
        self.capacity: Capacity | None = None
        self.http: AsgiServer | None = None
        self.http_port: int | None = None
        self._private_key: RSAPrivateKey | None = None
        self.next_hops: NextHops | None = None  # RTTs to the peers after us (published for routing)
        self.dtype = torch.float32
        # the blocks we host or are about to host (placement fixes it during startup)
        self.blocks: tuple[int, int] = config.blocks or (0, self.model_config.num_layers)
        self._stop = asyncio.Event()
        self._shut_down = False
        self._identity_lock: IdentityLock | None = None
        self.network_lost: P2PDaemonLost | None = None  # set if p2pd died under us (see serve)
        self.reachability = Reachability("unknown")  # how others reach us (startup finds out)
        self.dial_addrs: tuple[str, ...] = ()  # the addresses our record gives for dialling us
        self.relaying: Relaying | None = None  # relay for others, or reservations on our relays
        self.peer_id = ""

    # --- lifecycle -------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Join the swarm, choose and load blocks, start handlers, announce online."""
        cfg = self.config
        self._identity_lock = lock_identity(cfg.identity_path)  # before anything else: one daemon per key
        self._private_key = load_or_create_identity(cfg.identity_path)
        self.peer_id = peer_id_of_public_key(self._private_key.get_public_key())
        self.p2p, self.reachability = await start_network(
            host_maddrs=listen_maddrs(cfg.host, cfg.port),
            initial_peers=cfg.initial_peers,
            identity_path=str(cfg.identity_path.expanduser()),
            announce_maddrs=cfg.announce_maddrs,
            mode=cfg.reachability,
        )
        await self.p2p.add_binary_stream_handler(STREAM_DIALBACK, DialBackService().handle)
        self.dht = await SwarmDHT.create(
            self.p2p,
            private_key=self._private_key,
            prefix=self.prefix,
            num_blocks=self.model_config.num_layers,
            initial_peers=cfg.initial_peers,
            client_mode=self.reachability.reach == "relayed",  # nobody could dial our DHT node
        )
        self.next_hops = NextHops(self.p2p, self.dht, cfg.model_id, self.model_config.num_layers)
        self.hardware = probe_hardware(cfg.device)
        self.runtime = ComputeRuntime(torch_threads=cfg.torch_threads)
        self.dtype = getattr(torch, cfg.dtype) if cfg.dtype else default_dtype_for(cfg.device)
        if cfg.quant in ("int8", "int4") and torch.device(cfg.device).type == "cpu" and self.dtype != torch.bfloat16:
            logger.info(
                "%s blocks on the CPU in %s dequantise their weights at every product; with --dtype bfloat16 they "
                "multiply with torch's packed %s kernel instead (SmolLM2 here: %s faster; docs/operating.md)",
                cfg.quant,
                str(self.dtype).removeprefix("torch."),
                cfg.quant,
                "about 2x" if cfg.quant == "int8" else "about 19x",
            )
        # a --step-delay is spread over a typical span: ours if fixed, else the most we would host
        span = cfg.blocks[1] - cfg.blocks[0] if cfg.blocks else cfg.max_blocks or self.model_config.num_layers
        self.capacity = await measure_capacity(
            self.runtime,
            self.model_config,
            self.dtype,
            cfg.device,
            measure=cfg.measure_throughput,
            step_delay_s=cfg.step_delay_s,
            span_blocks=span,
            quant=cfg.quant,
        )
        self.state = PeerState.JOINING
        await self._choose_blocks()
        start, end = self.blocks
        dtype = self.dtype
        self.stage = stage = await self.runtime.run(lambda: load_hosted_blocks(cfg, start, end, dtype))
        budget = CacheBudget(cfg.cache_tokens, cache_bytes_per_token(self.model_config, end - start, stage.dtype))
        self.servicer = BlockServicer(
            stage=stage,
            model_id=cfg.model_id,
            runtime=self.runtime,
            budget=budget,
            limits=Limits.from_config(cfg),
            metrics=self.metrics,
            public_name=cfg.public_name,
            step_delay_s=cfg.step_delay_s,
            allowed_peers=cfg.allowed_peers,
            push_opener=self._open_push,
        )
        self.gate = stream_gate(self.servicer.limits)  # open streams and half-read frames, per client and in all
        handlers = {name: self.gate.wrap(getattr(self.servicer, f"rpc_{rpc}")) for rpc, name in STREAM_NAMES.items()}
        for name, handler in handlers.items():
            await self.p2p.add_binary_stream_handler(name, handler)
        self.relaying = Relaying(self.p2p, self.reachability, self.metrics.relay_bytes.inc)
        await self.relaying.start(handlers)
        refresh_peer_gauges(self)
        if cfg.http_port is not None:
            self.http = AsgiServer(peer_app(self))
            self.http_port = await self.http.start(cfg.http_host, cfg.http_port)
        self.state = PeerState.ONLINE
        self.servicer.state = "online"
        await self.announce()

    async def _swarm_peers(self) -> list[PlacedPeer]:
        """Other peers serving or about to serve, as placement sees them (latest record each)."""
        assert self.dht is not None
        views = await self.dht.read_blocks(timeout_s=5.0)
        latest = latest_per_peer(
            records_of(views), lambda r: r.state is not PeerState.OFFLINE and r.peer_id != self.peer_id
        )
        return [PlacedPeer(r.peer_id, r.start, r.end, r.decode_tokens_per_s) for r in latest.values()]

    def _me(self) -> PlacedPeer:
        assert self.capacity is not None
        return PlacedPeer(self.peer_id, self.blocks[0], self.blocks[1], self.capacity.decode_tokens_per_s)

    async def _choose_blocks(self) -> None:
        """Fix ``self.blocks``: the operator's ``--blocks``, or placement against the swarm (then re-checked)."""
        cfg = self.config
        num_blocks = self.model_config.num_layers
        if cfg.blocks is not None:
            start, end = cfg.blocks
            if not 0 <= start < end <= num_blocks:
                raise ValueError(f"--blocks {start}:{end} outside the model's 0:{num_blocks}")
            self.blocks = (start, end)
            await self.announce()
            return
        assert self.capacity is not None
        assert self.hardware is not None
        length = blocks_to_host(cfg, self.model_config, self.dtype, self.hardware, self.capacity)
        # peers started at the same moment would all see the same swarm: a random delay spreads them
        await asyncio.sleep(random.uniform(0, cfg.placement_jitter_s))
        choice = choose_placement(
            await self._swarm_peers(),
            num_blocks=num_blocks,
            length=length,
            tokens_per_s=self.capacity.decode_tokens_per_s,
        )
        logger.info("placement: blocks %d:%d (%d fit in memory): %s", choice.start, choice.end, length, choice.reason)
        self.blocks = (choice.start, choice.end)
        await self.announce()
        for _ in range(PLACEMENT_RECHECKS):
            await asyncio.sleep(cfg.placement_settle_s * random.uniform(1.0, 1.5))
            me = self._me()
            move = recheck_after_joining([*await self._swarm_peers(), me], me, num_blocks=num_blocks)
            if move is None:
                continue
            logger.info("placement: re-placed to blocks %d:%d: %s", move.start, move.end, move.reason)
            old, self.blocks = self.blocks, (move.start, move.end)
            await self.announce()
            await self._release_blocks(old)

    async def _release_blocks(self, old: tuple[int, int]) -> None:
        """Mark blocks of ``old`` that we no longer host as offline for us, so nobody routes there."""
        assert self.dht is not None
        gone = [b for b in range(*old) if not self.blocks[0] <= b < self.blocks[1]]
        if not gone:
            return
        record = replace(self.record(), state=PeerState.OFFLINE, start=old[0], end=old[1], cache_tokens_free=0)
        await self.dht.announce(record, expiration_s=2 * self.config.announce_period_s, blocks=gone)

    async def serve(self) -> None:
        """Keep records fresh and (for auto-placed peers) rebalance, until stopped."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._announce_loop())
            tasks.create_task(self._watch_p2pd())
            if self.config.blocks is None and self.config.rebalance_period_s > 0:
                tasks.create_task(self._rebalance_loop())

    async def _open_push(self, peer_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A push stream to the next peer of a client's route, dialled at its record's addresses."""
        assert self.next_hops is not None  # created before the servicer
        return await self.next_hops.peers.open_stream(peer_id, "push")

    async def _watch_p2pd(self) -> None:
        """If p2pd dies on its own, stop the whole peer: without it there is no network to serve."""
        assert self.p2p is not None
        self.network_lost = await wait_for_p2pd_exit(self.p2p, self._stop)
        if self.network_lost is not None:
            logger.error("%s", self.network_lost)
            self._stop.set()

    async def _sleep_or_stop(self, seconds: float) -> bool:
        """Sleep ``seconds``; True if the peer was asked to stop meanwhile."""
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    async def _announce_loop(self) -> None:
        # jitter, so a swarm's peers do not beat in step
        while not await self._sleep_or_stop(self.config.announce_period_s * random.uniform(0.9, 1.0)):
            try:
                assert self.next_hops is not None
                await self.next_hops.measure(self.peer_id, self.blocks)
                await self.announce()
            except Exception:  # the DHT being briefly unreachable must not kill the daemon
                logger.warning("announce failed; will retry next period", exc_info=True)

    async def _rebalance_loop(self) -> None:
        cfg = self.config
        while not await self._sleep_or_stop(cfg.rebalance_period_s * random.uniform(0.8, 1.2)):
            try:
                me = self._me()
                move = decide_move(
                    [*await self._swarm_peers(), me],
                    me,
                    num_blocks=self.model_config.num_layers,
                    threshold=cfg.rebalance_threshold,
                )
                if move is not None:
                    await self._move(move)
            except Exception:
                logger.warning("rebalancing check failed; staying where we are", exc_info=True)

    async def _move(self, move: Placement) -> None:
        """Host ``move``'s blocks instead: load what is new (keeping blocks that stay), drain, switch."""
        assert self.runtime is not None and self.servicer is not None and self.stage is not None
        cfg = self.config
        logger.info("rebalancing: %s", move.reason)
        old_stage, dtype = self.stage, self.dtype
        new_stage = await self.runtime.run(lambda: load_hosted_blocks(cfg, move.start, move.end, dtype, old_stage))
        self.servicer.draining = True  # new sessions go elsewhere while we switch
        await self.servicer.drain(cfg.drain_timeout_s)
        budget = CacheBudget(
            cfg.cache_tokens, cache_bytes_per_token(self.model_config, move.end - move.start, new_stage.dtype)
        )
        self.stage = self.servicer.stage = new_stage
        self.servicer.budget = budget
        old, self.blocks = self.blocks, (move.start, move.end)
        self.metrics.moves.inc()  # counted at the switch, together with the new range
        self.servicer.draining = False
        await self.announce()
        await self._release_blocks(old)
        refresh_peer_gauges(self)

    def request_stop(self) -> None:
        self._stop.set()

    async def shutdown(self, deadline_s: float | None = None) -> None:
        """Drain, announce offline, release the runtime, the DHT node and p2pd (idempotent).

        Draining (SIGTERM, Ctrl-C): new sessions are refused with DRAINING at once and the peer
        announces itself offline so clients stop routing here; open sessions get up to
        ``drain_timeout_s`` to finish, then each is handed back to its client with a DRAINING
        error, which the client answers by failing over (replaying its inputs elsewhere).
        """
        self._stop.set()
        if self._shut_down:
            return
        self._shut_down = True
        deadline_s = self.config.drain_timeout_s if deadline_s is None else deadline_s
        if self.servicer is not None:
            self.servicer.draining = True
        if self.dht is not None and self.state is not PeerState.OFFLINE and self.network_lost is None:
            self.state = PeerState.OFFLINE
            try:
                await self.announce(timeout_s=min(5.0, max(deadline_s, 1.0)))
            except Exception:
                logger.warning("could not announce offline; records will expire on their own", exc_info=True)
        if self.servicer is not None and self.servicer.sessions and self.network_lost is None:
            logger.info("draining %d session(s) for up to %.1fs", len(self.servicer.sessions), deadline_s)
            await self.servicer.drain(deadline_s)
        if self.http is not None:
            await self.http.close()
        p2p_alive = self.p2p is not None and self.p2p.is_alive and self.network_lost is None
        if self.p2p is not None and p2p_alive:
            for name in (*STREAM_NAMES.values(), STREAM_DIALBACK):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.p2p.remove_binary_stream_handler(name), 2.0)
        if self.relaying is not None:
            await self.relaying.close()
        if self.next_hops is not None:
            await self.next_hops.aclose()
        if self.runtime is not None:
            await asyncio.to_thread(self.runtime.close, max(deadline_s, 1.0))
        if self.dht is not None and p2p_alive:
            try:
                await asyncio.wait_for(self.dht.shutdown(), 5.0)
            except Exception:  # p2pd may already be gone (crash, kill); nothing left to release there
                logger.debug("DHT shutdown failed", exc_info=True)
        if self.p2p is not None:
            await self.p2p.shutdown()
        if self._identity_lock is not None:
            self._identity_lock.release()

    def record(self) -> ServerRecord:
        hw = self.hardware or probe_hardware(self.config.device)
        cap = self.capacity or Capacity(0.0, 0.0)
        start, end = self.blocks
        return ServerRecord(
            peer_id=self.peer_id,
            # a peer no relay will relay for cannot be reached: clients must not route to it
            state=PeerState.OFFLINE if self.relaying is not None and self.relaying.unreachable else self.state,
            start=start,
            end=end,
            decode_tokens_per_s=cap.decode_tokens_per_s,
            prefill_tokens_per_s=cap.prefill_tokens_per_s,
            device=hw.device,
            memory_total_bytes=hw.memory_total_bytes,
            memory_free_bytes=hw.memory_free_bytes,
            dtype=str(self.stage.dtype).removeprefix("torch.") if self.stage is not None else "",
            quant=self.stage.quant if self.stage is not None else self.config.quant,
            cache_tokens_free=self.servicer.table.available_tokens() if self.servicer is not None else 0,
            session_tokens_max=self.servicer.budget.session_cap_tokens if self.servicer is not None else 0,
            max_session_length=self.config.max_session_length,
            protocol_version=PROTOCOL_VERSION,
            package_version=__version__,
            public_name=self.config.public_name,
            next_rtts_ms=dict(self.next_hops.rtts_ms) if self.next_hops is not None else {},
            uplink_bytes_per_s=self.next_hops.uplink_bytes_per_s if self.next_hops is not None else 0.0,
            addrs=self.dial_addrs,
            reach=self.reachability.reach,
        )

    async def announce(self, timeout_s: float = 10.0) -> bool:
        assert self.dht is not None and self.p2p is not None  # internal invariant, not remote input
        self.dial_addrs = await dial_addresses(self.p2p, self.reachability, self._relays())
        record = self.record()
        # live and offline records alike last two periods: an offline record must outlive the live
        # one it replaces, or readers would fall back to that stale live record
        expiration_s = 2 * self.config.announce_period_s
        if record.state is PeerState.OFFLINE:
            record = replace(record, cache_tokens_free=0)
        ok = await self.dht.announce(record, expiration_s=expiration_s, timeout_s=timeout_s)
        if not ok:
            logger.warning("some DHT stores for blocks %d:%d were not accepted", record.start, record.end)
        return ok

    def _relays(self) -> tuple[str, ...]:
        return self.relaying.active_relays() if self.relaying is not None else ()

    async def visible_maddrs(self) -> list[str]:
        """Multiaddrs (with /p2p/<peer id>) that others can pass as --initial-peers, best first."""
        assert self.p2p is not None
        if self.reachability.reach == "relayed":  # our own addresses cannot be dialled from outside
            return [
                f"{a}/p2p/{self.peer_id}" for a in await dial_addresses(self.p2p, self.reachability, self._relays())
            ]
        return rank_maddrs([str(m) for m in await self.p2p.get_visible_maddrs()])

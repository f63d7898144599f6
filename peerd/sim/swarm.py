"""The simulated peers and what the DHT says about them; every placement decision is the daemon's.

Placement reads the DHT and sums throughput per block. With thousands of peers the simulator hands
the real functions an *equivalent* swarm instead of one entry per peer: one pseudo-peer per block
carrying that block's total (``block_throughputs`` is a sum, so totals -- all that
``choose_placement`` and ``decide_move`` look at -- are unchanged), plus the individual peers whose
identity matters (``me``, and for ``recheck_after_joining`` the smallest-id peer overlapping me,
which decides whether I must yield). Pseudo-peer ids start with "~", which sorts after every real
id, so they are never anyone's rival.
"""

from __future__ import annotations

import enum
import heapq
import random
from dataclasses import dataclass

import numpy as np

from peerd.client.chain_index import ChainLayout
from peerd.daemon.placement import PlacedPeer, Placement, choose_placement, decide_move, recheck_after_joining
from peerd.sim.config import SimConfig
from peerd.swarm.records import PeerState, ServerRecord
from protocols import PROTOCOL_VERSION

__all__ = ["PeerPhase", "SimPeer", "SimSwarm", "ViewArrays"]

LAYOUTS_KEPT = 8  # layouts of recent views kept (each ~2 MB at 10,000 peers)


class PeerPhase(enum.Enum):
    JOINING = "joining"  # placed, announced, loading: not serving yet
    ONLINE = "online"
    GONE = "gone"  # left or crashed (a crashed peer's record lingers until it expires)


@dataclass
class SimPeer:
    idx: int
    peer_id: str
    decode_tps: float
    length: int  # blocks that fit its memory
    uplink_bytes_per_s: float
    x: float
    y: float
    phase: PeerPhase = PeerPhase.JOINING
    start: int = 0
    end: int = 0
    rtt_ms: float | None = None  # scripted: the RTT every client measures to it (else from positions)
    in_dht: bool = False  # others can read a record of it (JOINING, ONLINE, or crashed but unexpired)
    record: ServerRecord | None = None  # as of the announce before ``pending`` (see current_record)
    pending: tuple[PeerState, int, int, int] | None = None  # the last announce: state, start, end, free cache

    def current_record(self) -> ServerRecord | None:
        """Its last announced record, built only when someone reads it (peers announce far more often
        than clients look at one record)."""
        if self.pending is not None:
            assert self.record is not None
            state, start, end, tokens = self.pending
            # dataclasses.replace(record, ...) without running __init__ again: a tenth of its cost, and
            # every route's spans carry records (the other fields are as the peer announced them)
            record = object.__new__(ServerRecord)
            record.__dict__.update(self.record.__dict__, state=state, start=start, end=end, cache_tokens_free=tokens)
            self.record = record
            self.pending = None
        return self.record

    def placed(self) -> PlacedPeer:
        return PlacedPeer(self.peer_id, self.start, self.end, self.decode_tps)


class ViewArrays:
    """Per peer index: what its record says (blocks, speeds, free cache) and whether clients see it
    (ONLINE and in the DHT). Grown as peers are created; a client's view is a copy."""

    def __init__(self) -> None:
        self.size = 0
        self.start = np.zeros(64, dtype=np.int64)
        self.end = np.zeros(64, dtype=np.int64)
        self.decode_tps = np.zeros(64)
        self.uplink_bytes_per_s = np.zeros(64)
        self.cache_tokens_free = np.zeros(64)
        self.visible = np.zeros(64, dtype=bool)
        self.spans_version = 0  # bumped whenever a peer's blocks change (what a ChainLayout depends on)

    def add(self, peer: SimPeer) -> None:
        if self.size == self.start.size:
            for name in ("start", "end", "decode_tps", "uplink_bytes_per_s", "cache_tokens_free", "visible"):
                old = getattr(self, name)
                setattr(self, name, np.concatenate([old, np.zeros_like(old)]))
        self.decode_tps[self.size] = peer.decode_tps
        self.uplink_bytes_per_s[self.size] = peer.uplink_bytes_per_s
        self.size += 1

    def set(self, peer: SimPeer, *, visible: bool, cache_tokens_free: int) -> None:
        i = peer.idx
        if (self.start[i], self.end[i]) != (peer.start, peer.end):
            self.start[i], self.end[i] = peer.start, peer.end
            self.spans_version += 1
        self.visible[i], self.cache_tokens_free[i] = visible and peer.in_dht, cache_tokens_free

    def snapshot(self) -> ViewArrays:
        copy = ViewArrays.__new__(ViewArrays)
        copy.size, copy.spans_version = self.size, self.spans_version
        for name in ("start", "end", "decode_tps", "uplink_bytes_per_s", "cache_tokens_free", "visible"):
            setattr(copy, name, getattr(self, name)[: self.size].copy())
        return copy


class SimSwarm:
    """All peers ever created, the per-block throughput the DHT shows, and the DHT's traffic counters."""

    def __init__(self, config: SimConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        self.peers: list[SimPeer] = []
        self.index_of: dict[str, int] = {}  # peer id -> index in ``peers``
        self.not_gone: list[int] = []  # indices of peers not GONE, ascending (the engine removes leavers)
        self.totals = np.zeros(config.num_blocks)  # decode tok/s per block over records in the DHT
        self._cover: list[list[int]] = [[] for _ in range(config.num_blocks)]  # heaps of peer idx (lazy)
        self._block_names = [f"~{b:05d}" for b in range(config.num_blocks)]  # _equivalent's pseudo-peers
        self._pseudo: tuple[np.ndarray, list[PlacedPeer]] | None = None  # the totals they were built for
        self.version = 0  # bumped whenever a record others can read changes
        self.moves = 0
        self.dht_gets = 0  # key reads (each one Kademlia lookup)
        self.dht_records_read = 0  # records those reads returned
        self.dht_stores = 0
        self.records_in_dht = 0  # one record per hosted block
        # what clients read, per peer index, as arrays (their route tables are copies of these)
        self.table = ViewArrays()
        self._layouts: dict[tuple[int, int], ChainLayout] = {}  # by (spans version, peers): layout()

    # --- population --------------------------------------------------------------------------
    def new_peer(self, gen: np.random.Generator) -> SimPeer:
        cfg = self.config
        idx = len(self.peers)
        length = int(
            np.clip(round(gen.lognormal(np.log(cfg.blocks_fit_median), cfg.blocks_fit_sigma)), 1, cfg.num_blocks)
        )
        if cfg.peer_specs:  # a scripted peer: its parameters, not draws (the draws still advance `gen`)
            tps, fit, uplink, rtt_ms = cfg.peer_specs[idx]
            peer = SimPeer(idx, f"p{idx:07d}", tps, min(fit, cfg.num_blocks), uplink, 0.5, 0.5, rtt_ms=rtt_ms)
        else:
            peer = SimPeer(
                idx=idx,
                peer_id=f"p{idx:07d}",
                decode_tps=float(gen.lognormal(np.log(cfg.decode_tps_median), cfg.decode_tps_sigma)),
                length=length,
                uplink_bytes_per_s=float(gen.lognormal(np.log(cfg.uplink_bytes_per_s_median), cfg.uplink_sigma)),
                x=float(gen.random()),
                y=float(gen.random()),
            )
        self.peers.append(peer)
        self.index_of[peer.peer_id] = idx
        self.not_gone.append(idx)
        self.table.add(peer)
        return peer

    def alive(self) -> list[SimPeer]:
        return [p for p in self.peers if p.phase is not PeerPhase.GONE]

    # --- what the DHT shows ------------------------------------------------------------------
    def publish(self, peer: SimPeer, start: int, end: int, cache_free_sessions: int) -> None:
        """``peer`` announces blocks [start, end) (replacing whatever it announced before)."""
        if peer.in_dht:
            self.totals[peer.start : peer.end] -= peer.decode_tps
            self.records_in_dht -= peer.end - peer.start
        peer.start, peer.end, peer.in_dht = start, end, True
        self.records_in_dht += end - start
        self.totals[start:end] += peer.decode_tps
        for block in range(start, end):
            heapq.heappush(self._cover[block], peer.idx)
        self.refresh_record(peer, cache_free_sessions)
        self.dht_stores += end - start

    def refresh_record(self, peer: SimPeer, cache_free_sessions: int) -> None:
        state = PeerState.ONLINE if peer.phase is not PeerPhase.JOINING else PeerState.JOINING
        tokens = cache_free_sessions * self.config.session_tokens
        if peer.record is None:
            peer.record = ServerRecord(
                peer_id=peer.peer_id,
                state=state,
                start=peer.start,
                end=peer.end,
                decode_tokens_per_s=peer.decode_tps,
                prefill_tokens_per_s=peer.decode_tps * self.config.prefill_gain,
                device="sim",
                memory_total_bytes=0,
                memory_free_bytes=0,
                dtype="float16",
                cache_tokens_free=tokens,
                protocol_version=PROTOCOL_VERSION,
                package_version="sim",
                uplink_bytes_per_s=peer.uplink_bytes_per_s,
            )
        else:
            peer.pending = (state, peer.start, peer.end, tokens)
        self.table.set(peer, visible=state is PeerState.ONLINE, cache_tokens_free=tokens)
        self.version += 1

    def layout(self, view: ViewArrays) -> ChainLayout:
        """The planner's layout of ``view`` (a snapshot): views with the same spans share one, however
        their free cache or visibility differ. The last few are kept, since clients read the DHT at
        different moments."""
        key = (view.spans_version, view.size)
        layout = self._layouts.pop(key, None) or ChainLayout(view.start, view.end)
        self._layouts[key] = layout  # the most recently used last
        while len(self._layouts) > LAYOUTS_KEPT:
            del self._layouts[next(iter(self._layouts))]
        return layout

    def unpublish(self, peer: SimPeer) -> None:
        """The record is gone: an OFFLINE announce (graceful) or expiry (crash)."""
        if peer.in_dht:
            self.totals[peer.start : peer.end] -= peer.decode_tps
            self.records_in_dht -= peer.end - peer.start
            peer.in_dht = False
            self.table.visible[peer.idx] = False
            self.version += 1

    def record_of(self, idx: int) -> ServerRecord:
        record = self.peers[idx].current_record()
        assert record is not None  # only peers with a record are ever visible
        return record

    def view(self) -> dict[str, ServerRecord]:
        """What a client's DHT read returns now: online records by peer id (expired ones are gone)."""
        records = {p.peer_id: p.current_record() for p in self.peers if p.in_dht}
        return {peer_id: r for peer_id, r in records.items() if r is not None and r.state is PeerState.ONLINE}

    def count_full_read(self) -> None:
        """One reader fetched every block key (placement, a rebalance check, a client's view)."""
        self.dht_gets += self.config.num_blocks
        self.dht_records_read += self.records_in_dht

    # --- the daemon's decisions (the real functions) -----------------------------------------
    def _equivalent(self, *individual: SimPeer) -> list[PlacedPeer]:
        """The swarm as placement sees it: per-block pseudo-peers for everyone but ``individual``.
        Blocks no individual hosts reuse the pseudo-peers of the current totals (built once per
        change of the totals, not per rebalance check)."""
        totals = self.totals.copy()
        touched: set[int] = set()
        for peer in individual:
            if peer.in_dht:
                totals[peer.start : peer.end] -= peer.decode_tps
                touched.update(range(peer.start, peer.end))
        peers = list(self._pseudo_peers())
        for b in touched:
            peers[b] = self._pseudo_peer(b, float(totals[b]))
        return peers

    def _pseudo_peers(self) -> list[PlacedPeer]:
        """One pseudo-peer per block carrying the current totals."""
        if self._pseudo is None or not np.array_equal(self._pseudo[0], self.totals):
            placed = [self._pseudo_peer(b, t) for b, t in enumerate(self.totals.tolist())]
            self._pseudo = (self.totals.copy(), placed)
        return self._pseudo[1]

    def _pseudo_peer(self, block: int, total: float) -> PlacedPeer:
        """Block ``block``'s pseudo-peer (a total below zero is float residue of removals: none)."""
        return PlacedPeer(self._block_names[block], block, block + 1, total if total > 0.0 else 0.0)

    def choose(self, peer: SimPeer) -> Placement:
        self.count_full_read()
        return choose_placement(
            self._equivalent(peer),
            num_blocks=self.config.num_blocks,
            length=peer.length,
            tokens_per_s=peer.decode_tps,
            rng=self.rng,
        )

    def recheck(self, peer: SimPeer) -> Placement | None:
        self.count_full_read()
        rival = self._smallest_overlapping(peer)
        individual = [peer] if rival is None else [peer, rival]
        peers = [*self._equivalent(*individual), *(p.placed() for p in individual)]
        return recheck_after_joining(peers, peer.placed(), num_blocks=self.config.num_blocks, rng=self.rng)

    def rebalance(self, peer: SimPeer) -> Placement | None:
        self.count_full_read()
        peers = [*self._equivalent(peer), peer.placed()]
        return decide_move(
            peers,
            peer.placed(),
            num_blocks=self.config.num_blocks,
            threshold=self.config.rebalance_threshold,
            rng=self.rng,
        )

    def _smallest_overlapping(self, me: SimPeer) -> SimPeer | None:
        best: SimPeer | None = None
        for block in range(me.start, me.end):
            heap, mine = self._cover[block], []
            while heap:
                other = self.peers[heap[0]]
                if not (other.in_dht and other.start <= block < other.end):
                    heapq.heappop(heap)  # stale: that peer left this block or the DHT
                elif other is me:
                    mine.append(heapq.heappop(heap))
                else:
                    if best is None or other.idx < best.idx:
                        best = other
                    break
            for idx in mine:
                heapq.heappush(heap, idx)
        return best

"""The simulator's fast planners (peerd/client/chain_index.py, pruned_chains.py) return exactly
plan_over_table's routes."""

from __future__ import annotations

import numpy as np
import pytest

from peerd.client import chain_index, pruned_chains
from peerd.client.chain_index import COMPILED, ChainLayout
from peerd.client.pruned_chains import PrunedChains
from peerd.client.routing import RouteTable, _walk_back, plan_over_table


class _LayoutBefore:
    """ChainLayout.fastest_chain as it was before the entry points moved to the walk back: the
    reference the new one must match, tie for tie."""

    def __init__(self, start: np.ndarray, end: np.ndarray) -> None:
        length = np.maximum(0, end - start)
        peer_of = np.repeat(np.arange(start.size), length)
        block_of = np.arange(peer_of.size) - np.repeat(np.cumsum(length) - length - start, length)
        order = np.argsort(block_of.astype(np.int32), kind="stable")
        self.peer = peer_of[order]
        self.block = block_of[order]
        self.start = start[self.peer]
        position = np.empty(order.size, dtype=np.int64)
        position[order] = np.arange(order.size)
        self.prev = np.where(self.block > self.start, position[np.maximum(order - 1, 0)], order.size)
        top = int(self.block.max()) + 2 if order.size else 1
        self.bounds = np.searchsorted(self.block, np.arange(top))

    def fastest_chain(
        self, hop_ms: np.ndarray, per_block_ms: np.ndarray, start: int, end: int
    ) -> list[tuple[int, int, int]] | None:
        if end + 1 > self.bounds.size:
            return None
        hop, step = hop_ms[self.peer], per_block_ms[self.peer]
        cost = np.full(self.peer.size + 1, np.inf)
        entry = np.zeros(self.peer.size + 1, dtype=np.int64)
        best = 0.0
        ends: list[tuple[int, int]] = []
        for block in range(start, end):
            a, z = int(self.bounds[block]), int(self.bounds[block + 1])
            prev = self.prev[a:z] if block > start else np.full(z - a, self.peer.size)
            enter = best + hop[a:z]
            cont = cost[prev]
            cost[a:z] = np.minimum(enter, cont) + step[a:z]
            entry[a:z] = np.where(enter < cont, block, entry[prev])
            if a == z:
                return None
            k = a + int(np.argmin(cost[a:z]))
            best = float(cost[k])
            if best == np.inf:
                return None
            ends.append((int(self.peer[k]), int(entry[k])))
        return _walk_back(ends, start, end)


@pytest.fixture(params=["numba", "numpy"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test twice: with the numba-compiled loops (the simulate and dev extras bring numba) and
    with their numpy versions (what runs without numba)."""
    assert chain_index.COMPILED, "numba is missing: pip install -e '.[dev]' (it comes with the simulate extra)"
    if request.param == "numpy":
        for name in ("_COMPILED_DP", "_COMPILED_CUT", "_COMPILED_LAY_OUT"):
            monkeypatch.setattr(chain_index, name, None)
        for name in (
            "_COMPILED_CONSIDERED",
            "_COMPILED_CARRIED",
            "_COMPILED_LISTED",
            "_COMPILED_MARKED",
            "_COMPILED_DRAW_INPUTS",
            "_COMPILED_WHOLE_MEAN",
        ):
            monkeypatch.setattr(pruned_chains, name, None)
    return str(request.param)


def _swarm(gen: np.random.Generator, n: int, blocks: int, *, integer: bool) -> RouteTable:
    start = gen.integers(0, blocks, n)
    end = np.minimum(blocks, start + gen.integers(1, blocks + 1, n))
    if integer:  # few distinct costs: many exact ties, which must break the same way
        hop, step = gen.integers(1, 4, n).astype(float), gen.integers(1, 4, n).astype(float)
    else:
        hop, step = gen.uniform(1, 150, n), gen.uniform(1, 100, n)
    return RouteTable(start=start, end=end, hop_ms=hop, per_block_ms=step, headroom_tokens=gen.uniform(-500, 5000, n))


def test_the_layout_plans_the_routes_of_the_layout_before_and_of_a_fresh_table(kernels: str) -> None:
    gen = np.random.default_rng(11)
    for trial in range(600):
        blocks = int(gen.integers(1, 20))
        table = _swarm(gen, int(gen.integers(1, 80)), blocks, integer=trial % 2 == 0)
        layout, before = ChainLayout(table.start, table.end), _LayoutBefore(table.start, table.end)
        for _ in range(4):
            first = int(gen.integers(0, blocks)) if trial % 3 else 0
            last = int(gen.integers(first + 1, blocks + 1)) if trial % 3 else blocks
            usable = gen.random(table.start.size) < 0.8 if trial % 5 else None
            uniforms = gen.random(table.start.size) if trial % 4 else None
            kwargs = {"uniforms": uniforms, "spread": 0.25, "usable": usable}
            fresh = plan_over_table(table, first, last, **kwargs)
            assert plan_over_table(table, first, last, layout=layout, **kwargs) == fresh
            assert plan_over_table(table, first, last, layout=before, **kwargs) == fresh  # type: ignore[arg-type]


def test_the_compiled_layout_lays_out_the_pairs_of_the_numpy_one(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = np.random.default_rng(7)
    tables = [_swarm(gen, int(gen.integers(0, 200)), int(gen.integers(1, 40)), integer=True) for _ in range(200)]
    for table in tables:  # some peers host nothing: end == start, or end 0 after a later start
        table.end[gen.random(table.end.size) < 0.05] = 0
        empty = gen.random(table.end.size) < 0.05
        table.end[empty] = table.start[empty]
    compiled = [ChainLayout(t.start, t.end) for t in tables]
    monkeypatch.setattr(chain_index, "_COMPILED_LAY_OUT", None)
    for table, layout in zip(tables, compiled, strict=True):
        reference = ChainLayout(table.start, table.end)
        for name in ("peer", "block", "prev", "bounds"):
            assert np.array_equal(getattr(layout, name), getattr(reference, name)), name


def test_the_compiled_dp_plans_the_numpy_dp_routes_tie_for_tie() -> None:
    assert COMPILED, "numba is missing: pip install -e '.[dev]' (it comes with the simulate extra)"
    gen = np.random.default_rng(5)
    for trial in range(800):
        blocks = int(gen.integers(1, 24))
        table = _swarm(gen, int(gen.integers(1, 120)), blocks, integer=trial % 2 == 0)
        layout = ChainLayout(table.start, table.end)
        for _ in range(4):
            first = int(gen.integers(0, blocks + 1))
            last = int(gen.integers(first, blocks + 2))  # empty and out-of-range requests included
            hop = np.where(gen.random(table.start.size) < 0.8, table.hop_ms, np.inf)
            compiled = layout.fastest_chain(hop, table.per_block_ms, first, last)
            assert compiled == layout._fastest_chain_numpy(hop, table.per_block_ms, first, last), (trial, first, last)


def _changed(
    gen: np.random.Generator, table: RouteTable, candidates: np.ndarray, blocks: int
) -> tuple[RouteTable, np.ndarray]:
    """The same peers (index for index) with some speeds, hops and spans changed, and a few new ones."""
    n, new = table.start.size, int(gen.integers(0, 5))
    fresh = _swarm(gen, n + new, blocks, integer=False)
    pick = gen.random((3, n + new)) < 0.1
    pick[:, n:] = True
    old = {name: np.append(getattr(table, name), getattr(fresh, name)[n:]) for name in ("start", "end", "hop_ms")}
    old["per_block_ms"] = np.append(table.per_block_ms, fresh.per_block_ms[n:])
    start = np.where(pick[0], fresh.start, old["start"])
    end = np.where(pick[0], fresh.end, old["end"])
    hop = np.where(pick[1], fresh.hop_ms, old["hop_ms"])
    step = np.where(pick[2], fresh.per_block_ms, old["per_block_ms"])
    return RouteTable(start, end, hop, step, fresh.headroom_tokens), np.append(candidates, gen.random(new) < 0.9)


def test_pruned_chains_plan_the_routes_of_plan_over_table(kernels: str) -> None:
    """Swarms large enough that most peers are dominated, with the spread, bans and full peers (some
    plans leave every dominator of a peer unusable: listed again, or planned over every peer), sub-range
    plans, exact ties, an index carried over to a changed view, and headroom in whole tokens or not."""
    gen = np.random.default_rng(12)
    fallbacks = repairs = pruned = 0
    for trial in range(300):
        blocks = int(gen.integers(1, 33))
        table = _swarm(gen, int(gen.integers(1, 400)), blocks, integer=trial % 5 == 0)
        candidates = gen.random(table.start.size) < 0.9
        spread = 0.0 if trial % 7 == 0 else 0.25
        chains = PrunedChains(
            table.start, table.end, table.hop_ms, table.per_block_ms, candidates, spread=spread, pool=8, keep=2
        )
        pruned += table.start.size - chains.kept.size
        for step in range(6):
            if step == 3:  # the next view: some peers changed speed or spans, some joined
                table, candidates = _changed(gen, table, candidates, blocks)
                chains = PrunedChains(
                    table.start,
                    table.end,
                    table.hop_ms,
                    table.per_block_ms,
                    candidates,
                    spread=spread,
                    pool=8,
                    keep=2,
                    dominators_from=gen.random(table.start.size) < 0.7,
                    previous=chains,
                    reuse_pools=trial % 2 == 0,  # pools with peers that moved or are no longer trusted
                )
            first = int(gen.integers(0, blocks)) if trial % 3 else 0
            last = int(gen.integers(first + 1, blocks + 1)) if trial % 3 else blocks
            drop = gen.choice([0.02, 0.3, 0.9])
            usable = candidates & (gen.random(table.start.size) >= drop) if trial % 6 else None
            uniforms = gen.random(table.start.size) if trial % 4 else None
            headroom = gen.uniform(-500, 5000, table.start.size)
            if trial % 2:  # whole tokens, as records give (the mean is summed in the compiled loop) ...
                headroom = np.floor(headroom)
                if trial % 10 == 1:  # ... unless the sum could round
                    headroom[gen.random(headroom.size) < 0.1] = 2.0**60
            fresh = plan_over_table(
                RouteTable(table.start, table.end, table.hop_ms, table.per_block_ms, headroom),
                first,
                last,
                uniforms=uniforms,
                spread=spread,
                usable=usable,
            )
            assert chains.plan(headroom, first, last, uniforms=uniforms, usable=usable) == fresh
            fallbacks += chains.fallbacks
            repairs += chains.repairs
            chains.fallbacks = chains.repairs = 0
    assert pruned > 10_000  # the dominance test did prune
    assert repairs > 0 and fallbacks > 0  # and both ways out were exercised


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "numpy"])
def test_a_layout_cut_out_of_another_equals_one_laid_out_afresh(
    compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert chain_index._COMPILED_CUT is not None, "numba is missing: pip install -e '.[dev]'"
    if not compiled:
        monkeypatch.setattr(chain_index, "_COMPILED_CUT", None)
    gen = np.random.default_rng(13)
    for _ in range(200):
        blocks = int(gen.integers(1, 20))
        table = _swarm(gen, int(gen.integers(1, 60)), blocks, integer=False)
        peers = np.flatnonzero(gen.random(table.start.size) < gen.random())
        cut = ChainLayout(table.start, table.end).subset(peers)
        fresh = ChainLayout(table.start[peers], table.end[peers])
        for name in ("peer", "block", "prev", "bounds"):
            assert np.array_equal(getattr(cut, name), getattr(fresh, name)), name


def test_the_simulator_runs_the_same_with_and_without_pruned_chains(monkeypatch: pytest.MonkeyPatch) -> None:
    """A seeded churn run planned through PrunedChains (forced on for a small swarm) gives the
    summary of the same run planned over the plain layout: every field but the wall time."""
    import peerd.sim.clients
    from peerd.sim import SimConfig, Simulation

    config = SimConfig(peers=60, duration_s=300.0, warmup_s=120.0, churn_per_hour=0.3, clients=4, load=0.7, seed=3)
    plain = Simulation(config).run().summary
    monkeypatch.setattr(peerd.sim.clients, "PRUNE_FROM_PEERS", 0)
    pruned_sim = Simulation(config)
    pruned = pruned_sim.run().summary
    assert any(client._chains is not None for client in pruned_sim.clients)  # it did go through them
    for summary in (plain, pruned):
        summary.pop("wall_s")
    assert pruned == plain
    assert plain["route_plans"] > 300


def test_compiled_upkeep_lists_the_dominators_numpy_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled carry-over and search of dominator lists (a rebuild's two loops) leave the same
    lists, counts and laid-out peers as their numpy versions, through changed views, reused pools
    and repairs."""
    assert pruned_chains._COMPILED_LISTED is not None, "numba is missing: pip install -e '.[dev]'"
    compiled = {
        "_COMPILED_CARRIED": pruned_chains._COMPILED_CARRIED,
        "_COMPILED_LISTED": pruned_chains._COMPILED_LISTED,
    }
    gen = np.random.default_rng(14)
    for trial in range(60):
        blocks = int(gen.integers(1, 33))
        table = _swarm(gen, int(gen.integers(1, 400)), blocks, integer=trial % 5 == 0)
        candidates = gen.random(table.start.size) < 0.9
        changed, changed_candidates = _changed(gen, table, candidates, blocks)
        trusted = gen.random(changed.start.size) < 0.7
        usable = np.append(changed_candidates & (gen.random(changed.start.size) >= 0.3), False)
        built = []
        for numba in (True, False):
            for name, function in compiled.items():
                monkeypatch.setattr(pruned_chains, name, function if numba else None)
            first = PrunedChains(
                table.start, table.end, table.hop_ms, table.per_block_ms, candidates, spread=0.25, pool=8, keep=2
            )
            second = PrunedChains(
                changed.start,
                changed.end,
                changed.hop_ms,
                changed.per_block_ms,
                changed_candidates,
                spread=0.25,
                pool=8,
                keep=2,
                dominators_from=trusted,
                previous=first,
                reuse_pools=trial % 2 == 0,
            )
            second._look_for(np.ones(changed.start.size, dtype=bool), usable)  # as a repair does
            built.append((first, second))
        for one, other in zip(*built, strict=True):
            for name in ("dominators", "counts", "kept"):
                assert np.array_equal(getattr(one, name), getattr(other, name)), (trial, name)

"""The only thread boundary in the daemon: torch work runs here, off the event loop.

One worker thread owns all compute, so torch's intra-op threads are never oversubscribed by
concurrent requests, and the event loop stays free to read frames, answer ``info`` and heartbeat the
DHT while a long prefill runs.

Fairness is by cost, not by job count: every job states its cost (tokens x blocks of work), and the
worker serves remote peers by start-time fair queuing, the virtual-time form of weighted round robin
(Goyal et al., "Start-time Fair Queueing", 1996). Each peer id carries a virtual time that grows by
the cost of the work done for it; the worker always serves the waiting peer with the smallest one,
and a peer that was idle starts at the virtual time of the work now running, so it goes next instead
of waiting for a round (among peers tied in virtual time, one with an inference step goes first).
Long work comes as *chunked* jobs (generators that yield after each chunk of bounded cost), so a
client sending the largest forwards holds the thread for one chunk at a time and another client's
decode step waits for at most the chunk that is running.

Within a peer's share, *urgent* jobs (inference steps) go before bulk work (forward, backward, cache
growth). Steps that may share a forward (the same ``batch_key``) are gathered into one batch,
taken from the waiting peers in fair order, each peer charged its own step's cost.

A decode batch costs about as much for one step as for sixteen (the weights are read once either
way), so a batch may fill: when recent batches of its key held more steps than wait now (sessions
stepping together arrive a frame at a time), the worker waits for the rest while they keep coming
(batchfill.py says how long). A lone session never waits.

Sessions that ran in one batch form a *wave*: their next steps come back together, from the client or
the previous peer, a hop's time later. A filling batch also waits for the missing members of every
wave among its steps (within the same deadline), however unevenly they arrive: on a busy machine a
wave's steps can stall for a whole forward of another process, and a batch that started without them
split the wave for good, every part paying a full pass over the weights from then on.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import Callable, Generator, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from peerd.model.linear import use_torch_threads
from peerd.server.batchfill import BATCH_WINDOW_S, BatchHistory

__all__ = ["BatchRunner", "ComputeRuntime", "RuntimeClosed"]

T = TypeVar("T")

# Runs the payloads of one batch together; one result (or the exception it raised) per payload.
BatchRunner = Callable[[list[Any]], list[Any]]
MAX_BATCH_STEPS = 64  # steps joined into one forward at most
# A step costing at most this (tokens x blocks) runs on the event loop itself when the compute thread
# has nothing to do: two thread wakeups (~0.2 ms on the 2-core dev box) cost more than a short step
# blocks the loop. Above it, the loop stays free to read frames while the thread computes.
INLINE_MAX_COST = 8.0
_PRUNE_AT = 4096  # forget idle owners' virtual times past this many entries


class RuntimeClosed(Exception):
    """The runtime is shutting down and accepts no more work."""


@dataclass
class _Job:
    owner: str
    future: Future[Any]
    cost: float
    fn: Callable[[], Any] | None = None  # a plain job
    chunks: Callable[[], Generator[float, None, Any]] | None = None  # a chunked job, made on the thread
    gen: Generator[float, None, Any] | None = None  # the chunked job once started
    batch_key: Hashable | None = None  # a step that may share a forward with others of the same key
    payload: Any = None
    runner: BatchRunner | None = None
    member: Hashable | None = None  # the session a step belongs to (its wave is kept by member)
    enqueued_at: float = field(default_factory=time.perf_counter)


@dataclass
class _Owner:
    urgent: collections.deque[_Job] = field(default_factory=collections.deque)
    bulk: collections.deque[_Job] = field(default_factory=collections.deque)
    since: int = 0  # activation order: the last tie-break in virtual time goes to the longer waiting (_turn)

    def __len__(self) -> int:
        return len(self.urgent) + len(self.bulk)


class ComputeRuntime:
    """Runs jobs on one dedicated thread, cost-fair across submitters (see the module docstring)."""

    def __init__(
        self,
        *,
        torch_threads: int | None = None,
        name: str = "peerd-compute",
        max_batch_steps: int = MAX_BATCH_STEPS,
        inline_max_cost: float = INLINE_MAX_COST,
        batch_window_s: float = BATCH_WINDOW_S,
    ) -> None:
        self._owners: dict[str, _Owner] = {}  # owners with queued work
        self._vtime: dict[str, float] = {}
        self._clock = 0.0  # virtual time of the work started last
        self._activations = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._torch_threads = torch_threads
        self.max_batch_steps = max_batch_steps  # 1 turns batching off (the benchmark's baseline)
        self.inline_max_cost = inline_max_cost  # 0 turns inline steps off
        self.batch_window_s = batch_window_s  # 0: a batch takes only the steps already waiting
        self._recent: dict[Hashable, BatchHistory] = {}
        self._most: dict[Hashable, int] = {}  # per batch key: the sessions open on it, as last told
        self._wave_of: dict[Hashable, set[Hashable]] = {}  # member -> the members it last ran with (itself included)
        self._working = False  # the compute thread runs a job
        self._inline = False  # an inline step runs on the event loop
        self._considering = 0  # steps about to choose between inline and the queue (event loop only)
        self.inline_steps = 0
        self.busy_s = 0.0  # total time spent computing (for utilisation metrics)
        self.batches = 0  # forwards that ran two or more steps together
        self.batched_steps = 0  # steps that ran in those forwards
        self.on_start: Callable[[str], None] | None = None  # called with each owner whose work starts
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- submitting --------------------------------------------------------------------------------

    def submit(self, fn: Callable[[], T], owner: str = "", *, cost: float = 1.0) -> Future[T]:
        """Queue ``fn`` as bulk work of ``cost`` (tokens x blocks) on behalf of ``owner`` (a peer id)."""
        return self._enqueue(_Job(owner, Future(), cost, fn=fn), urgent=False)

    def submit_chunks(self, chunks: Callable[[], Generator[float, None, T]], owner: str = "") -> Future[T]:
        """Queue a chunked job: ``chunks()`` is a generator that yields the cost of each chunk it did
        and returns the result; other owners' work runs between its chunks."""
        return self._enqueue(_Job(owner, Future(), 0.0, chunks=chunks), urgent=False)

    def submit_step(
        self,
        payload: Any,
        runner: BatchRunner,
        batch_key: Hashable,
        owner: str = "",
        *,
        cost: float = 1.0,
        most: int | None = None,
        member: Hashable | None = None,
    ) -> Future[Any]:
        """Queue an urgent step; ready steps of equal ``batch_key`` run together through ``runner``.

        ``most``: how many steps of ``batch_key`` can be on their way at all (the sessions open on
        it); a filling batch never waits for more, whatever recent batches held. ``member``: the
        session the step belongs to, so that a batch waits for the rest of its wave (module docstring;
        call :meth:`forget` when it ends)."""
        if most is not None:
            self._most[batch_key] = most
        job = _Job(owner, Future(), cost, batch_key=batch_key, payload=payload, runner=runner, member=member)
        return self._enqueue(job, urgent=True)

    def forget(self, member: Hashable) -> None:
        """``member`` (a session) has ended: batches stop waiting for it."""
        with self._cv:
            wave = self._wave_of.pop(member, None)
            if wave is not None:
                wave.discard(member)

    def _enqueue(self, job: _Job, *, urgent: bool, front: bool = False) -> Future[Any]:
        with self._cv:
            if self._closed and job.gen is None:
                raise RuntimeClosed("compute runtime is closed")
            queues = self._owners.get(job.owner)
            if queues is None:
                queues = self._owners[job.owner] = _Owner(since=next(self._activations))
                # an owner that was idle starts now: no credit saved up, no debt forgiven
                self._vtime[job.owner] = max(self._vtime.get(job.owner, 0.0), self._clock)
            queue = queues.urgent if urgent else queues.bulk
            queue.appendleft(job) if front else queue.append(job)
            self._cv.notify()
        return job.future

    async def run(self, fn: Callable[[], T], owner: str = "", *, cost: float = 1.0) -> T:
        """Await ``fn`` computed on the compute thread; cancelling the await drops a queued job."""
        return await _await(self.submit(fn, owner, cost=cost))

    async def run_chunks(self, chunks: Callable[[], Generator[float, None, T]], owner: str = "") -> T:
        """Await a chunked job; cancelling the await stops it at its next chunk boundary."""
        job_future = self.submit_chunks(chunks, owner)
        return await _await(job_future)

    async def run_step(
        self,
        payload: Any,
        runner: BatchRunner,
        batch_key: Hashable,
        owner: str = "",
        *,
        cost: float = 1.0,
        most: int | None = None,
        member: Hashable | None = None,
    ) -> Any:
        """Await one step, possibly batched with other owners' steps of the same key.

        A small step (``cost <= inline_max_cost``) finding the runtime idle runs right here on the
        calling (event loop) thread: it would wait for nothing on the compute thread, only for the
        wakeups there and back. Steps read in the same loop iteration all go to the queue (the one
        ``sleep(0)`` lets them see each other), so that steps ready together still run as one batch.
        ``most`` and ``member`` as for :meth:`submit_step`; a member of a wave never runs inline."""
        if most is not None:
            self._most[batch_key] = most
        if cost <= self.inline_max_cost and self._idle() and self._expected(batch_key) <= 1 and self._alone(member):
            self._considering += 1
            try:
                await asyncio.sleep(0)
            finally:
                self._considering -= 1
            # alone: the others that looked at the same time have queued theirs (not idle any more)
            if self._considering == 0 and self._claim_inline(owner, cost):
                return self._run_inline(payload, runner, owner, member)
        return await _await(self.submit_step(payload, runner, batch_key, owner, cost=cost, member=member))

    def _alone(self, member: Hashable | None) -> bool:
        """Whether ``member`` last ran with no other session that is still open."""
        wave = self._wave_of.get(member) if member is not None else None
        return wave is None or len(wave) <= 1

    def _expected(self, key: Hashable) -> int:
        """Steps of ``key`` a batch may expect now: the largest recent batch (1 when none ran lately),
        but no more than the sessions open on ``key`` (a burst's sessions that closed send no more)."""
        recent = self._recent.get(key)
        if recent is None:
            return 1
        return recent.expected(
            time.perf_counter(), min(self.max_batch_steps, self._most.get(key, self.max_batch_steps))
        )

    def _idle(self) -> bool:
        return not (self._working or self._inline or self._owners or self._closed)

    def _claim_inline(self, owner: str, cost: float) -> bool:
        """Under the lock: if idle, hold the runtime for an inline step and charge ``owner`` for it."""
        with self._cv:
            if not self._idle():
                return False
            self._inline = True
            self._vtime[owner] = max(self._vtime.get(owner, 0.0), self._clock) + cost
            return True

    def _run_inline(self, payload: Any, runner: BatchRunner, owner: str, member: Hashable | None) -> Any:
        if self.on_start is not None:
            self.on_start(owner)
        use_torch_threads(self._torch_threads)  # the event loop's thread computes this one
        started = time.perf_counter()
        try:
            [result] = runner([payload])
        finally:
            self.busy_s += time.perf_counter() - started
            self.inline_steps += 1
            with self._cv:
                self._inline = False
                self._ran_together([member])
                if self._owners or self._closed:  # work queued (or a close) meanwhile: the thread acts on it
                    self._cv.notify()
                # else no wakeup: the thread would only look and sleep again, taking the GIL from the
                # event loop for it (a thread switch per step, for nothing)
        if isinstance(result, BaseException):
            raise result
        return result

    # --- the worker --------------------------------------------------------------------------------

    def _pick(self) -> list[_Job] | None:
        """Under the lock: the next job (or batch of steps), or None once closed and drained."""
        self._working = False
        while (not self._owners and not self._closed) or self._inline:
            self._cv.wait()  # nothing queued, or an inline step holds the runtime
        if not self._owners:
            return None
        self._working = True
        owner = min(self._owners, key=self._turn)
        self._clock = self._vtime[owner]
        first = self._owners[owner]
        job = first.urgent.popleft() if first.urgent else first.bulk.popleft()
        jobs = [job]
        if job.batch_key is not None:
            jobs += self._gather(job.batch_key, 1)
            jobs += self._fill(job.batch_key, jobs)
        for taken in jobs:
            self._vtime[taken.owner] += taken.cost  # a chunked job is charged per chunk, after it
            queues = self._owners.get(taken.owner)
            if queues is not None and not queues:  # a batch may take several steps of one owner
                del self._owners[taken.owner]
        if len(self._vtime) > _PRUNE_AT:
            # an idle owner at or below the clock restarts at the clock anyway
            self._vtime = {o: v for o, v in self._vtime.items() if o in self._owners or v > self._clock}
        return jobs

    def _turn(self, owner: str) -> tuple[float, bool, int]:
        """Fair order: the smallest virtual time first; among equals, an owner with an urgent job
        (an inference step, a fraction of a chunk's cost) before bulk work, then the longer waiting.

        Chunks of equal cost keep flooding owners at equal virtual times, and an owner back from
        idle starts at the running work's: the activation order alone sent an honest decode step
        behind every flooder tied with it, ~2.5 chunks of waiting instead of the one running
        (SmolLM2, 8 blocks, 3 identities' max-size forwards: 18.8 ms p50 before it started)."""
        queues = self._owners[owner]
        return self._vtime[owner], not queues.urgent, queues.since

    def _fill(self, key: Hashable, jobs: list[_Job]) -> list[_Job]:
        """Under the lock: the steps of ``key`` that came while waiting for the expected ones, as long
        as they kept coming, and for the missing members of the waves in the batch (``jobs``: the
        batch so far), until the deadline."""
        have, expected, recent = len(jobs), self._expected(key), self._recent.get(key)
        if recent is None or self.batch_window_s <= 0:
            return []
        cap = min(self.max_batch_steps, self._most.get(key, self.max_batch_steps))
        missing = self._missing(jobs)
        if have >= cap or (have >= expected and not missing):
            return []
        deadline = recent.fill_deadline(time.perf_counter(), self.batch_window_s)
        last = max(j.enqueued_at for j in jobs)  # the latest arrival (enqueue times are perf_counter)
        taken: list[_Job] = []
        while have + len(taken) < cap and not self._closed:
            now = time.perf_counter()
            if missing:  # a wave's steps are on their way, however unevenly they come
                until = deadline
            elif have + len(taken) < expected:  # recent batches were larger: wait while steps keep coming
                until = min(deadline, last + recent.quiet_s())
            else:
                break
            if until <= now:
                break
            self._cv.wait(until - now)  # an enqueue notifies
            came = self._gather(key, have + len(taken))
            if came:
                last = max([last, *(j.enqueued_at for j in came)])
                taken += came
                missing = self._missing(jobs + taken)
        return taken

    def _missing(self, jobs: list[_Job]) -> bool:
        """Under the lock: whether a wave among ``jobs`` has a member that is not among them."""
        present = {j.member for j in jobs}
        return any(not self._wave_of.get(m, set()) <= present for m in present if m is not None)

    def _ran_together(self, members: list[Hashable | None]) -> None:
        """Under the lock: ``members`` ran in one batch, a new wave (each leaves its old one)."""
        wave = {m for m in members if m is not None}
        for member in wave:
            old = self._wave_of.get(member)
            if old is not None:
                old.discard(member)
            self._wave_of[member] = wave

    def _gather(self, key: Hashable, have: int) -> list[_Job]:
        """Waiting steps of ``key``, one per owner per round in virtual-time order, to the cap (``have`` taken)."""
        taken: list[_Job] = []
        order = sorted(self._owners, key=self._turn)
        progress = True
        while progress and have + len(taken) < self.max_batch_steps:
            progress = False
            for owner in order:
                urgent = self._owners[owner].urgent
                match = next((j for j in urgent if j.batch_key == key), None)
                if match is None:
                    continue
                urgent.remove(match)
                taken.append(match)
                progress = True
                if have + len(taken) >= self.max_batch_steps:
                    break
        return taken

    def _run(self) -> None:
        use_torch_threads(self._torch_threads)
        while True:
            with self._cv:
                jobs = self._pick()
            if jobs is None:
                return  # closed and drained
            # A chunked job's future stays pending while it runs, so that a submitter who stops
            # waiting can still cancel it: it then ends at its next chunk boundary.
            jobs = [j for j in jobs if j.chunks is not None or j.future.set_running_or_notify_cancel()]
            if not jobs:
                continue
            if self.on_start is not None:
                for job in jobs:
                    self.on_start(job.owner)
            started = time.perf_counter()
            try:
                if jobs[0].batch_key is not None:
                    self._run_steps(jobs)
                elif jobs[0].fn is not None:
                    _settle(jobs[0].future, jobs[0].fn)
                else:
                    self._run_chunk(jobs[0])
            finally:
                self.busy_s += time.perf_counter() - started
            # Hand the GIL over between jobs and chunks: the event loop thread, which reads the next
            # step's frame and answers the last one, otherwise waits for the interpreter's switch
            # interval (5 ms) while this thread runs the Python glue between torch kernels.
            time.sleep(0)

    def _run_steps(self, jobs: list[_Job]) -> None:
        runner = jobs[0].runner
        assert runner is not None  # set by submit_step, never by remote input
        if len(jobs) > 1:
            self.batches += 1
            self.batched_steps += len(jobs)
        started = time.perf_counter()
        try:
            results = runner([j.payload for j in jobs])
        except BaseException as exc:
            results = [exc] * len(jobs)
        key = jobs[0].batch_key
        recent = self._recent.get(key)
        if recent is None:
            if len(self._recent) > _PRUNE_AT:
                self._recent.clear()
            recent = self._recent[key] = BatchHistory()
        recent.ran(len(jobs), started, time.perf_counter() - started, [j.enqueued_at for j in jobs])
        with self._cv:
            self._ran_together([j.member for j in jobs])
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def _run_chunk(self, job: _Job) -> None:
        """One chunk of a chunked job; the job goes back to the front of its owner's bulk queue."""
        if job.future.cancelled():
            if job.gen is not None:
                job.gen.close()
            return
        try:
            if job.gen is None:
                assert job.chunks is not None  # set by submit_chunks
                job.gen = job.chunks()
            cost = next(job.gen)
        except StopIteration as stop:
            job.future.set_result(stop.value)
            return
        except BaseException as exc:
            if job.gen is not None:
                job.gen.close()
            job.future.set_exception(exc)
            return
        with self._cv:
            self._vtime[job.owner] = self._vtime.get(job.owner, self._clock) + cost
        self._enqueue(job, urgent=False, front=True)

    @property
    def queued(self) -> int:
        """Jobs waiting (a chunked job between two of its chunks counts as one)."""
        with self._cv:
            return sum(len(q) for q in self._owners.values())

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop accepting work, finish what is queued, and join the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout_s)


def _settle(future: Future[Any], fn: Callable[[], Any]) -> None:
    try:
        result = fn()
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result(result)


async def _await(future: Future[T]) -> T:
    """Await a job's future; on cancellation a queued job is dropped, a running chunked job stops."""
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.cancel()
        raise

"""The client SDK's entry point: join a swarm, plan routes, run generation and forward passes.

The client runs the embeddings and the LM head itself (they are small and need the token ids,
which never leave the client); only hidden states travel to peers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hivemind.p2p import P2P
from hivemind.utils.crypto import RSAPrivateKey
from tokenizers import Tokenizer

from peerd.client.adapters import ClientAdapter
from peerd.client.routing import (
    Span,
    plan_inference_route,
    plan_load_balanced_route,
    servers_by_peer,
)
from peerd.client.sampling import SamplingParams, sample_next
from peerd.client.session import InferenceSession
from peerd.client.verify import LIAR_BAN_S, Incident, SpotChecker
from peerd.config import DEFAULT_SWARM
from peerd.model.config import ModelConfig
from peerd.model.head import ClientHead
from peerd.model.loading import load_client_head
from peerd.rpc.errors import NoRouteError, PeerdClientError, PeerError, PeerUnavailable, SwarmConnectError
from peerd.rpc.transport import PeerClient
from peerd.swarm.dht import SwarmDHT
from peerd.swarm.records import ServerRecord, swarm_prefix
from protocols import Compression

__all__ = ["BanList", "GenerationResult", "SwarmClient"]

GREEDY = SamplingParams()
RTT_TTL_S = 60.0  # re-measure a peer's RTT after this long
RTT_PROBE_TIMEOUT_S = 2.0
MAX_RTT_PROBES = 32  # per planning round, so a huge swarm does not stall planning
UNREACHABLE_RTT_MS = 10_000.0

logger = logging.getLogger(__name__)


class BanList:
    """Peers that failed recently, each banned for a time that doubles on every repeat failure."""

    def __init__(self, base_s: float = 5.0, max_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self.clock: Callable[[], float] = clock
        self._until: dict[str, float] = {}
        self._strikes: dict[str, int] = {}

    def ban(self, peer_id: str, duration_s: float | None = None) -> float:
        """Ban ``peer_id`` for ``duration_s`` (default: the doubling failure ban); a longer ban stays."""
        strikes = self._strikes.get(peer_id, 0) + 1
        self._strikes[peer_id] = strikes
        duration = min(self.max_s, self.base_s * 2.0 ** (strikes - 1)) if duration_s is None else duration_s
        self._until[peer_id] = max(self._until.get(peer_id, 0.0), self.clock() + duration)
        return self._until[peer_id] - self.clock()

    def banned(self) -> set[str]:
        now = self.clock()
        return {p for p, until in self._until.items() if until > now}

    def forgive(self, peer_id: str) -> None:
        self._strikes.pop(peer_id, None)
        self._until.pop(peer_id, None)


@dataclass
class GenerationResult:
    """What ``generate`` produced, plus how it went."""

    token_ids: list[int]  # generated ids only (prompt excluded)
    text: str
    prompt_tokens: int
    time_to_first_token_s: float
    total_s: float
    route: list[Span]
    stalls_s: list[float] = field(default_factory=list)
    hop_ms: list[list[float]] = field(default_factory=list)  # per step, per span: wall ms at the client
    hop_compute_ms: list[list[float]] = field(default_factory=list)  # per step, per span: server compute ms
    incidents: list[Incident] = field(default_factory=list)  # spot checks that failed during this generation
    rewound_tokens: int = 0  # tokens taken back after a spot check found earlier outputs wrong

    @property
    def tokens_per_s(self) -> float:
        """Decode rate after the first token (prefill excluded)."""
        decode_s = self.total_s - self.time_to_first_token_s
        return (len(self.token_ids) - 1) / decode_s if len(self.token_ids) > 1 and decode_s > 0 else 0.0


class SwarmClient:
    """A client of one model in one swarm. Create with ``await SwarmClient.connect(...)``."""

    def __init__(
        self,
        *,
        p2p: P2P,
        dht: SwarmDHT,
        model_id: str,
        model_config: ModelConfig,
        head: ClientHead,
        tokenizer: Tokenizer | None,
        request_timeout_s: float,
        dht_timeout_s: float,
        route_wait_s: float,
        max_retries: int,
        compression: Compression,
        failover_timeout_s: float = 30.0,
        model_path: Path | None = None,
        spot_check_rate: float = 0.0,
        spot_check_local_blocks: int = 0,
        allowed_peers: Iterable[str] | None = None,
    ) -> None:
        self.p2p = p2p
        self.dht = dht
        self.model_id = model_id
        self.config = model_config
        self.num_blocks = model_config.num_layers
        self.head = head
        self.tokenizer = tokenizer
        self.peers = PeerClient(p2p, model_id, timeout_s=request_timeout_s)
        self.dht_timeout_s = dht_timeout_s
        self.route_wait_s = route_wait_s
        self.max_retries = max_retries
        self.compression = compression
        self.failover_timeout_s = failover_timeout_s  # how long a session waits for a replacement peer
        self.bans = BanList()
        self._servers: dict[str, ServerRecord] = {}
        self.rtts_ms: dict[str, float] = {}  # measured client <-> peer round trips
        self._rtt_measured_at: dict[str, float] = {}
        self._rtt_probe = PeerClient(p2p, model_id, timeout_s=RTT_PROBE_TIMEOUT_S)
        self._servers_at = 0.0
        self.view_ttl_s = 5.0
        # private swarm: use only these peers (None = any peer the DHT lists)
        self.allowed_peers = frozenset(allowed_peers) if allowed_peers is not None else None
        self.checker = SpotChecker(
            self, rate=spot_check_rate, local_max_blocks=spot_check_local_blocks, model_path=model_path
        )
        self._info_checked: dict[str, tuple[int, int, str]] = {}  # peer -> record fields its `info` confirmed

    @classmethod
    async def connect(
        cls,
        initial_peers: Sequence[str],
        model_path: Path | str,
        *,
        model_id: str | None = None,
        swarm: str = DEFAULT_SWARM,
        request_timeout_s: float = 30.0,
        dht_timeout_s: float = 5.0,
        route_wait_s: float = 30.0,
        max_retries: int = 3,
        compression: Compression = Compression.NONE,
        dtype: torch.dtype = torch.float32,
        failover_timeout_s: float = 30.0,
        spot_check_rate: float = 0.0,
        spot_check_local_blocks: int = 0,
        allowed_peers: Iterable[str] | None = None,
    ) -> SwarmClient:
        """Join the swarm through ``initial_peers`` and load the client-side model pieces.

        Security options (docs/security.md): ``spot_check_rate`` is the probability that a span's
        result is recomputed elsewhere and compared (a peer caught lying is banned and its work
        redone); ``spot_check_local_blocks`` lets the client recompute spans of up to that many
        blocks itself, from ``model_path``'s weights, as the judge when two peers disagree;
        ``allowed_peers`` restricts routing to those peer ids (a private swarm).
        """
        model_path = Path(model_path)
        model_id = model_id or model_path.name
        model_config = ModelConfig.from_pretrained(model_path)
        head = await asyncio.to_thread(load_client_head, model_path, dtype=dtype, progress=False)
        tokenizer = None
        if (model_path / "tokenizer.json").exists():
            tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))
        if not initial_peers:
            raise SwarmConnectError("no initial peers given: pass the multiaddr a peer printed at start-up")
        try:
            p2p = await P2P.create(initial_peers=list(initial_peers), dht_mode="client")
        except Exception as exc:
            raise SwarmConnectError(f"could not start p2pd or reach {list(initial_peers)}: {exc}") from exc
        try:
            dht = await SwarmDHT.create(
                p2p,
                private_key=RSAPrivateKey(),
                prefix=swarm_prefix(swarm, model_id),
                num_blocks=model_config.num_layers,
                initial_peers=initial_peers,
                client_mode=True,
            )
        except Exception as exc:
            await p2p.shutdown()
            raise SwarmConnectError(f"could not join the DHT through {list(initial_peers)}: {exc}") from exc
        return cls(
            p2p=p2p,
            dht=dht,
            model_id=model_id,
            model_config=model_config,
            head=head,
            tokenizer=tokenizer,
            request_timeout_s=request_timeout_s,
            dht_timeout_s=dht_timeout_s,
            route_wait_s=route_wait_s,
            max_retries=max_retries,
            compression=compression,
            failover_timeout_s=failover_timeout_s,
            model_path=model_path,
            spot_check_rate=spot_check_rate,
            spot_check_local_blocks=spot_check_local_blocks,
            allowed_peers=allowed_peers,
        )

    async def close(self) -> None:
        await self.dht.shutdown()
        await self.p2p.shutdown()

    async def __aenter__(self) -> SwarmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- swarm view and routing -------------------------------------------------------------------

    async def servers(self, refresh: bool = False) -> dict[str, ServerRecord]:
        """Online peers by id, from a DHT view at most ``view_ttl_s`` old."""
        if refresh or not self._servers or time.monotonic() - self._servers_at > self.view_ttl_s:
            views = await self.dht.read_blocks(timeout_s=self.dht_timeout_s)
            servers = servers_by_peer(views)
            if self.allowed_peers is not None:
                servers = {p: r for p, r in servers.items() if p in self.allowed_peers}
            self._servers = servers
            self._servers_at = time.monotonic()
        return self._servers

    def ban(self, peer_id: str, reason: str = "", duration_s: float | None = None) -> None:
        duration = self.bans.ban(peer_id, duration_s)
        logger.info("banned peer %s for %.0fs: %s", peer_id[:16], duration, reason)

    @property
    def incidents(self) -> list[Incident]:
        """Every failed spot check of this client so far (see ``peerd.client.verify``)."""
        return self.checker.incidents

    async def check_peer(self, span: Span) -> None:
        """Before first using a peer, ask its ``info`` and compare with its DHT record (cached).

        A record is signed by its owner, but only the peer knows what it really loaded: a peer
        whose own answer disagrees with what it announced (another model or model size, or blocks it
        does not serve) is announcing falsely -- to attract traffic it cannot serve, or to see
        activations -- and is banned for a long time. Raises PeerUnavailable after banning it.
        """
        record = span.record
        claimed = (record.start, record.end, record.dtype)
        if self._info_checked.get(span.peer_id) == claimed:
            return
        info = await self.peers.info(span.peer_id)
        problems = []
        if info.model_id != self.model_id or info.num_blocks_total != self.num_blocks:
            problems.append(f"serves {info.model_id!r} with {info.num_blocks_total} blocks")
        if (info.block_start, info.block_end) != (record.start, record.end):
            problems.append(f"serves blocks {info.block_start}:{info.block_end}, announced {record.start}:{record.end}")
        if info.dtype != record.dtype and record.dtype:
            problems.append(f"computes in {info.dtype}, announced {record.dtype}")
        if problems:
            reason = "info disagrees with its DHT record: " + "; ".join(problems)
            # A peer that is moving its blocks announces the new range within one period, so a range
            # mismatch gets an ordinary ban (it may be stale); another model is never innocent.
            wrong_model = info.model_id != self.model_id or info.num_blocks_total != self.num_blocks
            self.ban(span.peer_id, reason=reason, duration_s=LIAR_BAN_S if wrong_model else None)
            raise PeerUnavailable(span.peer_id, reason)
        self._info_checked[span.peer_id] = claimed

    async def plan_inference(self, start: int, end: int, cache_tokens: int, refresh: bool = False) -> list[Span]:
        """Lowest-latency route for [start, end) with room for ``cache_tokens`` (see routing.py)."""
        servers = await self.servers(refresh=refresh)
        banned = self.bans.banned()
        await self.measure_rtts([p for p in servers if p not in banned])
        return plan_inference_route(
            servers, start, end, banned=banned, min_cache_tokens=cache_tokens, rtt_ms=self.rtts_ms
        )

    async def measure_rtts(self, peer_ids: Sequence[str]) -> None:
        """Measure RTT to candidate peers whose measurement is missing or stale (concurrently, bounded).

        Each hop of an inference route is a client <-> peer round trip, so these RTTs are the
        network part of a route's per-token cost. An unreachable peer gets a prohibitive RTT.
        """
        now = time.monotonic()
        stale = [p for p in peer_ids if now - self._rtt_measured_at.get(p, -1e9) > RTT_TTL_S][:MAX_RTT_PROBES]
        if not stale:
            return
        results = await asyncio.gather(*(self._rtt_probe.rtt_ms(p, samples=2) for p in stale))
        for peer_id, rtt in zip(stale, results, strict=True):
            self.rtts_ms[peer_id] = UNREACHABLE_RTT_MS if rtt is None else rtt
            self._rtt_measured_at[peer_id] = now

    async def wait_for_route(self, timeout_s: float | None = None) -> list[Span]:
        """Poll the DHT until a full route exists (or raise NoRouteError after ``timeout_s``)."""
        deadline = time.monotonic() + (self.route_wait_s if timeout_s is None else timeout_s)
        while True:
            try:
                return await self.plan_inference(0, self.num_blocks, 1, refresh=True)
            except NoRouteError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.5)

    # --- inference --------------------------------------------------------------------------------

    def inference_session(self, max_length: int, batch_size: int = 1) -> InferenceSession:
        """A stateful session through the swarm (use with ``async with``)."""
        return InferenceSession(self, max_length=max_length, batch_size=batch_size)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise PeerdClientError("this model folder has no tokenizer.json; pass token ids instead of text")
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    async def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 64,
        sampling: SamplingParams = GREEDY,
        stop_on_eos: bool = True,
        on_text: Callable[[str], None] | None = None,
        on_token: Callable[[int], None] | None = None,
        adapter: ClientAdapter | None = None,
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` after ``prompt``.

        ``on_text`` receives text as it appears; ``on_token`` each new token id. ``adapter`` (a trained
        soft prompt / LoRA from ``peerd finetune``) replaces the plain embeddings and LM head.
        """
        result: GenerationResult | None = None
        async for piece in self._generate(prompt, max_new_tokens, sampling, stop_on_eos, on_token, adapter=adapter):
            if isinstance(piece, GenerationResult):
                result = piece
            elif on_text is not None:
                on_text(piece)
        assert result is not None
        return result

    async def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 64,
        sampling: SamplingParams = GREEDY,
        stop_on_eos: bool = True,
        adapter: ClientAdapter | None = None,
    ) -> AsyncIterator[str]:
        """Async iterator of text pieces as they are generated."""
        async for piece in self._generate(prompt, max_new_tokens, sampling, stop_on_eos, adapter=adapter):
            if isinstance(piece, str):
                yield piece

    async def _generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int,
        sampling: SamplingParams,
        stop_on_eos: bool,
        on_token: Callable[[int], None] | None = None,
        *,
        adapter: ClientAdapter | None = None,
    ) -> AsyncIterator[str | GenerationResult]:
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        eos = set(self.config.eos_token_ids) if stop_on_eos else set()
        started = time.perf_counter()
        first_token_s = 0.0
        generated: list[int] = []
        emitted = ""
        # a soft prompt occupies positions in front of the prompt, so the session must hold them too
        prefix = adapter.prefix_length if adapter is not None else 0
        incidents_before = len(self.incidents)
        rewound = 0
        sampled_at: list[int] = []  # sampled_at[j]: session position whose output gave generated[j]
        local = self.head if adapter is None else adapter
        async with self.inference_session(max_length=prefix + len(ids) + max_new_tokens) as session:
            step_ids = torch.tensor([ids], dtype=torch.long)
            position: int | None = None  # None: right after what the session holds
            i = 0
            while len(generated) < max_new_tokens:
                with torch.inference_mode():
                    if adapter is None:
                        hidden = self.head.embed(step_ids)
                    else:  # the soft prompt goes in front of the first step only
                        hidden = adapter.embed(step_ids, with_prompt=i == 0)
                out = await session.step(hidden, position)
                with torch.inference_mode():
                    logits = local.logits(out[:, -1:])[:, -1]  # [1, vocab]
                token = int(sample_next(logits, sampling, generator)[0])
                at = session.length - 1
                correction = session.take_correction()
                if correction is not None:
                    # a spot check found a peer's earlier outputs wrong: tokens sampled from them are
                    # re-sampled from the corrected hidden states, and generation resumes at the first
                    # token that changes (the rest were conditioned on it)
                    redo = self._first_changed_token(correction, generated, sampled_at, local, sampling, generator)
                    if redo is not None:
                        j, token, at = redo
                        rewound += len(generated) - j
                        del generated[j:], sampled_at[j:]
                position = at + 1
                i += 1
                if i == 1:
                    first_token_s = time.perf_counter() - started
                if token in eos:
                    break
                generated.append(token)
                sampled_at.append(at)
                if on_token is not None:
                    on_token(token)
                text = self.decode(generated)
                # hold back a trailing replacement char: a multi-byte character may be incomplete
                if len(text) > len(emitted) and not text.endswith("\ufffd"):
                    yield text[len(emitted) :]
                    emitted = text
                step_ids = torch.tensor([[token]], dtype=torch.long)
            route, stalls, hops = session.route, list(session.stalls_s), list(session.hop_ms)
            computes = list(session.hop_compute_ms)
        text = self.decode(generated)
        if len(text) > len(emitted):
            yield text[len(emitted) :]
        yield GenerationResult(
            token_ids=generated,
            text=text,
            prompt_tokens=len(ids),
            time_to_first_token_s=first_token_s,
            total_s=time.perf_counter() - started,
            route=route,
            stalls_s=stalls,
            hop_ms=hops,
            hop_compute_ms=computes,
            incidents=self.incidents[incidents_before:],
            rewound_tokens=rewound,
        )

    @staticmethod
    def _first_changed_token(
        correction: tuple[int, torch.Tensor],
        generated: list[int],
        sampled_at: list[int],
        local: ClientHead | ClientAdapter,
        sampling: SamplingParams,
        generator: torch.Generator | None,
    ) -> tuple[int, int, int] | None:
        """(index, new token, its position) of the first generated token a correction changes."""
        first, final = correction  # final: corrected last-span outputs for positions first.. [1, n, h]
        for j, at in enumerate(sampled_at):
            if at < first:
                continue
            with torch.inference_mode():
                logits = local.logits(final[:, at - first : at - first + 1])[:, -1]  # [1, vocab]
            token = int(sample_next(logits, sampling, generator)[0])
            # greedy: keep tokens the correction does not change; sampling: every draw from a wrong
            # distribution is redrawn, so the output is a sample of the right one
            if token != generated[j] or sampling.temperature > 0:
                return j, token, at
        return None

    # --- stateless forward --------------------------------------------------------------------------

    async def forward_hidden(self, hidden: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Hidden states through blocks [start, end) with the stateless forward RPC; retries elsewhere."""
        end = self.num_blocks if end is None else end
        block = start
        x = hidden
        attempts = 0
        while block < end:
            servers = await self.servers(refresh=attempts > 0)
            route = plan_load_balanced_route(servers, block, end, banned=self.bans.banned(), rng=random.Random())
            span = route[0]
            try:
                await self.check_peer(span)
                out = await self.peers.forward(span.peer_id, x, span.start, span.end, self.compression)
                if self.checker.should_check() and (await self.checker.verify(span, x, out)).span_peer_wrong:
                    raise PeerUnavailable(span.peer_id, "failed a spot check")  # banned by the checker
            except (PeerUnavailable, PeerError) as exc:
                if isinstance(exc, PeerError) and not exc.retryable:
                    raise
                attempts += 1
                self.ban(span.peer_id, reason=str(exc))
                if attempts > self.max_retries:
                    raise PeerdClientError(
                        f"forward through blocks {block}:{end} failed {attempts} times: {exc}"
                    ) from exc
                continue
            x = out
            block = span.end
        return x

    async def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, n, vocab] for ``input_ids`` [batch, n], computed through the swarm."""
        with torch.inference_mode():
            hidden = self.head.embed(input_ids)
        out = await self.forward_hidden(hidden)
        with torch.inference_mode():
            return self.head.logits(out)

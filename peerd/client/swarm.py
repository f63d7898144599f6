"""The client SDK's entry point: join a swarm, then generate, stream, or run forward passes.

``SwarmClient`` is a thin facade: it owns the P2P node, the DHT node and the model pieces that run
on the client (the embeddings and the LM head: they are small and need the token ids, which never
leave the client), and hands the work to the pieces that do it -- a :class:`Router` (swarm view,
bans, planning), the ``PeerClient`` transport, :class:`InferenceSession`, :class:`SpotChecker` and
:func:`generate_pieces`. Only hidden states travel to peers.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hivemind.p2p import P2P
from tokenizers import Tokenizer

from peerd.client.adapters import ClientAdapter
from peerd.client.bans import BanList
from peerd.client.compression import CompressionChoice, hop_compression
from peerd.client.generation import GenerationResult, generate_pieces
from peerd.client.heads import HeadBatcher
from peerd.client.joining import join_swarm
from peerd.client.reservations import BUSY_WAIT_S
from peerd.client.router import Router
from peerd.client.routing import Span
from peerd.client.sampling import SamplingParams
from peerd.client.session import InferenceSession
from peerd.client.speculative import Speculation
from peerd.client.verify import DEFAULT_SPOT_CHECK_RATE, Incident, SpotChecker
from peerd.config import DEFAULT_SWARM
from peerd.model.chat import ChatTemplate, NoChatTemplateError, chat_prompt_ids, check_text
from peerd.model.config import ModelConfig
from peerd.model.head import ClientHead
from peerd.model.loading import load_client_head
from peerd.model.local import LocalModel
from peerd.model.registry import canonical_model_id, resolve_model
from peerd.rpc.errors import PeerdClientError, PeerError, PeerUnavailable, RequestTooLargeError, worth_failover
from peerd.rpc.transport import PeerClient
from peerd.swarm.dht import SwarmDHT
from peerd.swarm.records import ServerRecord, swarm_prefix
from protocols import Compression

__all__ = ["BanList", "GenerationResult", "SwarmClient"]

logger = logging.getLogger(__name__)

GREEDY = SamplingParams()


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
        compression: CompressionChoice,
        failover_timeout_s: float = 30.0,
        model_path: Path | None = None,
        spot_check_rate: float = DEFAULT_SPOT_CHECK_RATE,
        spot_check_local_blocks: int = 0,
        allowed_peers: Iterable[str] | None = None,
        chat_template: ChatTemplate | None = None,
        min_precision: str | None = None,
    ) -> None:
        self.p2p = p2p
        self.dht = dht
        self.model_id = model_id
        self.config = model_config
        self.num_blocks = model_config.num_layers
        self.head = head
        self.heads = HeadBatcher()  # the head's logits for every generation, batched off the event loop
        self.tokenizer = tokenizer
        self.chat_template = chat_template  # None: a base model without one (send raw prompts)
        self.peers = PeerClient(p2p, model_id, timeout_s=request_timeout_s)
        self.max_retries = max_retries
        self.compression = compression
        self.failover_timeout_s = failover_timeout_s  # how long a session waits for a replacement peer
        self.busy_wait_s = BUSY_WAIT_S  # ... and for room, when the peers of some blocks are all full
        self.speculation = Speculation()  # multi-token steps (speculative.py); Speculation(0) turns them off
        self.draft_model: LocalModel | None = None  # guesses from a local model instead of prompt lookup
        # peers push hidden states to the next span's peer (server/push.py); False: we relay every hop;
        # None: push when the route's peers are far (round trips of PUSH_MIN_RTT_MS or more)
        self.push: bool | None = None
        self.router = Router(
            dht,
            self.peers,
            model_id=model_id,
            num_blocks=self.num_blocks,
            dht_timeout_s=dht_timeout_s,
            route_wait_s=route_wait_s,
            allowed_peers=allowed_peers,
            min_precision=min_precision,
        )
        self.checker = SpotChecker(
            self.router,
            self.peers,
            rate=spot_check_rate,
            compression=compression,
            local_max_blocks=spot_check_local_blocks,
            model_path=model_path,
        )

    @classmethod
    async def connect(
        cls,
        initial_peers: Sequence[str],
        model: Path | str,
        *,
        model_id: str | None = None,
        cache_dir: Path | str | None = None,
        swarm: str = DEFAULT_SWARM,
        request_timeout_s: float = 30.0,
        dht_timeout_s: float = 5.0,
        route_wait_s: float = 30.0,
        max_retries: int = 3,
        compression: CompressionChoice = Compression.NONE,
        dtype: torch.dtype = torch.float32,
        failover_timeout_s: float = 30.0,
        spot_check_rate: float = DEFAULT_SPOT_CHECK_RATE,
        spot_check_local_blocks: int = 0,
        allowed_peers: Iterable[str] | None = None,
        min_precision: str | None = None,
        host_maddrs: Sequence[str] | None = None,
    ) -> SwarmClient:
        """Join the swarm through ``initial_peers`` and load the client-side model pieces.

        ``model`` is what the CLI's ``--model`` takes: a known model id (e.g. ``smollm2-135m``, from
        the cache under ``cache_dir`` that ``peerd model fetch`` fills) or a HF-format folder.
        ``model_id`` is the name the swarm knows it by (default: the known id, or the folder's name).
        Security options (docs/security.md): the first answer of every peer in a session is
        recomputed elsewhere and compared, and then each later answer with probability
        ``spot_check_rate`` (default 2%; 0 turns every check off); a peer caught lying is banned
        and its work redone; ``spot_check_local_blocks`` lets the client recompute spans of up to that many
        blocks itself, from ``model_path``'s weights, as the judge when two peers disagree;
        ``allowed_peers`` restricts routing to those peer ids (a private swarm).
        ``min_precision`` ("nf4", "int4", "int8", "bfloat16", "float16", "float32") routes only through
        peers whose weights are stored in at least that many bits (``peerd.model.quant``).
        ``host_maddrs``: where it listens (default loopback: only a collaborative trainer is ever dialled).
        """
        model_path = resolve_model(str(model), Path(cache_dir) if cache_dir is not None else None)
        model_id = model_id or canonical_model_id(str(model)) or model_path.resolve().name
        model_config = ModelConfig.from_pretrained(model_path)
        head = await asyncio.to_thread(load_client_head, model_path, dtype=dtype, progress=False)
        tokenizer = None
        if (model_path / "tokenizer.json").exists():
            tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))
        try:
            chat_template: ChatTemplate | None = ChatTemplate.from_folder(model_path)
        except NoChatTemplateError:
            chat_template = None
        p2p, dht = await join_swarm(initial_peers, swarm_prefix(swarm, model_id), model_config.num_layers, host_maddrs)
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
            chat_template=chat_template,
            min_precision=min_precision,
        )

    async def close(self) -> None:
        await self.router.close()
        self.heads.close()
        await self.peers.aclose()
        await self.dht.shutdown()
        await self.p2p.shutdown()

    async def __aenter__(self) -> SwarmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the swarm, through the router --------------------------------------------------------------

    @property
    def bans(self) -> BanList:
        return self.router.bans

    @property
    def allowed_peers(self) -> frozenset[str] | None:
        """Private swarm: route only through these peer ids (None = any peer the DHT lists)."""
        return self.router.allowed_peers

    @allowed_peers.setter
    def allowed_peers(self, peer_ids: Iterable[str] | None) -> None:
        self.router.allowed_peers = frozenset(peer_ids) if peer_ids is not None else None

    @property
    def min_precision(self) -> str | None:
        """Route only through peers storing weights in at least this precision (None = any peer)."""
        return self.router.min_precision

    @min_precision.setter
    def min_precision(self, precision: str | None) -> None:
        self.router.min_precision = precision

    @property
    def rtts_ms(self) -> dict[str, float]:
        """Measured client <-> peer round trips that route planning uses (see ``Router.measure_rtts``)."""
        return self.router.rtts_ms

    @property
    def incidents(self) -> list[Incident]:
        """Every failed spot check of this client so far (see ``peerd.client.verify``)."""
        return self.checker.incidents

    async def servers(self, refresh: bool = False) -> dict[str, ServerRecord]:
        """Online peers by id, from a recent DHT view (see ``Router.servers``)."""
        return await self.router.servers(refresh=refresh)

    def ban(self, peer_id: str, reason: str = "", duration_s: float | None = None) -> None:
        self.router.ban(peer_id, reason=reason, duration_s=duration_s)

    async def check_peer(self, span: Span) -> None:
        """Vet a peer's record against its own ``info`` (see ``Router.check_peer``)."""
        await self.router.check_peer(span)

    async def wait_for_route(self, timeout_s: float | None = None) -> list[Span]:
        """Poll the DHT until a full route exists (or raise NoRouteError after ``timeout_s``)."""
        return await self.router.wait_for_route(timeout_s)

    # --- inference ------------------------------------------------------------------------------------

    def inference_session(self, max_length: int, batch_size: int = 1) -> InferenceSession:
        """A stateful session through the swarm (use with ``async with``)."""
        return InferenceSession(
            self.router,
            self.peers,
            max_length=max_length,
            batch_size=batch_size,
            compression=self.compression,
            failover_timeout_s=self.failover_timeout_s,
            busy_wait_s=self.busy_wait_s,
            checker=self.checker,
            push=self.push,
        )

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise PeerdClientError("this model folder has no tokenizer.json; pass token ids instead of text")
        check_text(text)
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def chat_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Prompt ids of a conversation in the model's own chat template (ending where the reply starts).

        Raises NoChatTemplateError for a model without a template or tokenizer (send raw text then),
        ChatTemplateError for a conversation the template cannot render.
        """
        if self.chat_template is None or self.tokenizer is None:
            raise NoChatTemplateError(f"model {self.model_id!r} has no chat template and tokenizer: send raw text")
        return chat_prompt_ids(self.tokenizer, self.chat_template, messages)

    async def chat(
        self, messages: Sequence[Mapping[str, Any]], *, on_text: Callable[[str], None] | None = None, **kwargs: Any
    ) -> GenerationResult:
        """The assistant's reply to ``messages`` ({"role", "content"} dicts): ``generate`` on ``chat_ids``."""
        return await self.generate(self.chat_ids(messages), on_text=on_text, **kwargs)

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

    def events(
        self, prompt: str | Sequence[int], *, max_new_tokens: int = 64, sampling: SamplingParams = GREEDY
    ) -> AsyncIterator[str | GenerationResult]:
        """Text pieces as they are generated, then one :class:`GenerationResult` (route, timings, usage)."""
        return self._generate(prompt, max_new_tokens, sampling, True)

    def _generate(
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
        prefix = adapter.prefix_length if adapter is not None else 0
        context = self.config.max_position_embeddings
        if prefix + len(ids) + max_new_tokens > context:
            what = f"model {self.model_id!r} has a context of {context} tokens: it takes"
            raise RequestTooLargeError(prefix + len(ids) + max_new_tokens, context, what)
        eos = (set(self.config.eos_token_ids) if stop_on_eos else set()) | set(sampling.stop_token_ids)
        return generate_pieces(
            self, ids, max_new_tokens=max_new_tokens, sampling=sampling, eos=eos, on_token=on_token, adapter=adapter
        )

    # --- stateless forward ----------------------------------------------------------------------------

    async def forward_hidden(self, hidden: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Hidden states through blocks [start, end) with the stateless forward RPC; retries elsewhere."""
        end = self.num_blocks if end is None else end
        block = start
        x = hidden
        attempts = 0
        while block < end:
            route = await self.router.plan_load_balanced(
                block, end, rng=random.Random(), refresh=attempts > 0, bytes_per_token=x.shape[-1] * x.element_size()
            )
            span = route[0]
            try:
                await self.router.check_peer(span)
                codec = hop_compression(self.compression, span.record)
                out = await self.peers.forward(span.peer_id, x, span.start, span.end, codec)
                if (
                    self.checker.should_check_forward(span.peer_id)
                    and (await self.checker.verify(span, x, out)).span_peer_wrong
                ):
                    raise PeerUnavailable(span.peer_id, "failed a spot check")  # banned by the checker
            except (PeerUnavailable, PeerError) as exc:
                if not worth_failover(exc):
                    raise
                attempts += 1
                logger.warning("forward through %s failed (%s); trying elsewhere", span, exc)
                self.router.ban(span.peer_id, reason=str(exc))
                if attempts > self.max_retries:
                    raise PeerdClientError(
                        f"forward through blocks {block}:{end} failed {attempts} times: {exc}"
                    ) from exc
                continue
            self.router.succeeded(span.peer_id)
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

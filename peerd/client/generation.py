"""Token-by-token generation over an inference session: embed, step, sample, and take back tokens
that a spot check proved were sampled from wrong hidden states.

``SwarmClient.generate`` and ``stream`` run :func:`generate_pieces`; it depends on a session and
the client-side model pieces only (the embeddings and LM head, or a trained adapter).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from peerd.client.adapters import ClientAdapter
from peerd.client.draft_model import ModelDrafter, check_draft_model
from peerd.client.heads import HeadBatcher
from peerd.client.lookup import Drafter
from peerd.client.routing import Span
from peerd.client.sampling import SamplingParams, sample_next
from peerd.client.session import InferenceSession
from peerd.client.speculative import Speculation, verify_drafts
from peerd.client.verify import Incident
from peerd.model.head import ClientHead
from peerd.model.local import LocalModel

__all__ = ["GenerationResult", "generate_pieces"]


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
    finish_reason: str = "length"  # "stop": EOS, a stop token or a stop string; "length": max_new_tokens
    steps: int = 0  # trips through the swarm (prefill included); fewer than tokens when drafts land
    draft_tokens: int = 0  # speculative guesses sent (see speculative.py)
    accepted_tokens: int = 0  # guesses the model confirmed

    @property
    def acceptance_rate(self) -> float:
        """Share of speculative guesses the model confirmed (0 when none were sent)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Decode rate after the first token (prefill excluded)."""
        decode_s = self.total_s - self.time_to_first_token_s
        return (len(self.token_ids) - 1) / decode_s if len(self.token_ids) > 1 and decode_s > 0 else 0.0


class Generator(Protocol):
    """What generation needs from a client (``SwarmClient`` has it)."""

    @property
    def head(self) -> ClientHead: ...
    @property
    def heads(self) -> HeadBatcher: ...
    @property
    def incidents(self) -> list[Incident]: ...
    @property
    def speculation(self) -> Speculation: ...
    @property
    def draft_model(self) -> LocalModel | None: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def inference_session(self, max_length: int, batch_size: int = 1) -> InferenceSession: ...


@dataclass
class _Output:
    """Tokens generated so far, the session position each was sampled from, and the text emitted.

    Text that could be the start of a stop string is held back until it is known not to be one,
    so a stop string never reaches a streaming caller.
    """

    decode: Callable[[Sequence[int]], str]
    stops: tuple[str, ...] = ()
    tokens: list[int] = field(default_factory=list)
    sampled_at: list[int] = field(default_factory=list)  # sampled_at[j]: session position that gave tokens[j]
    emitted: str = ""
    rewound: int = 0
    stopped: bool = False  # a stop string appeared: the text ends before it

    def append(self, token: int, at: int) -> str:
        """Add ``token``; returns the new text to show ("" while a multi-byte character is incomplete)."""
        self.tokens.append(token)
        self.sampled_at.append(at)
        text = self.decode(self.tokens)
        # hold back a trailing replacement char: a multi-byte character may be incomplete
        if text.endswith("\ufffd"):
            return ""
        hits = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(text[: min(hits)])
        held = max((k for stop in self.stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        return self._emit(text[: len(text) - held])

    def _emit(self, visible: str) -> str:
        if len(visible) > len(self.emitted):
            piece, self.emitted = visible[len(self.emitted) :], visible
            return piece
        return ""

    def final_text(self) -> str:
        return self.emitted if self.stopped else self.decode(self.tokens)

    def take_back(self, j: int) -> None:
        self.rewound += len(self.tokens) - j
        del self.tokens[j:], self.sampled_at[j:]


@dataclass
class _Sampler:
    local: ClientHead | ClientAdapter  # what turns hidden states into logits
    heads: HeadBatcher  # runs ``local`` off the event loop, batched with the client's other generations
    params: SamplingParams
    generator: torch.Generator | None
    prompt: Sequence[int]  # the prompt's ids, for the repetition penalty

    async def sample(self, hidden: torch.Tensor, output: Sequence[int]) -> int:
        """Next token from the last position of ``hidden`` [1, n, h], after ``output`` tokens."""
        logits = (await self.heads.logits(self.local, hidden[:, -1:]))[:, -1]  # [1, vocab]
        with torch.inference_mode():
            return int(sample_next(logits, self.params, self.generator, prompt=self.prompt, output=output)[0])

    async def verify(self, hidden: torch.Tensor, drafts: Sequence[int], output: Sequence[int]) -> list[int]:
        """Tokens from a step's outputs ``hidden`` [1, 1 + len(drafts), h]: see ``verify_drafts``."""
        if not drafts:
            return [await self.sample(hidden, output)]
        logits = (await self.heads.logits(self.local, hidden))[0]  # [1 + k, vocab]
        with torch.inference_mode():
            return verify_drafts(
                drafts, lambda i: logits[i : i + 1], self.params, self.generator, prompt=self.prompt, output=output
            )

    async def first_changed(self, correction: tuple[int, torch.Tensor], out: _Output) -> tuple[int, int, int] | None:
        """(index, new token, its position) of the first generated token a correction changes."""
        first, final = correction  # final: corrected last-span outputs for positions first.. [1, n, h]
        for j, at in enumerate(out.sampled_at):
            if at < first:
                continue
            token = await self.sample(final[:, at - first : at - first + 1], out.tokens[:j])
            # greedy: keep tokens the correction does not change; sampling: every draw from a wrong
            # distribution is redrawn, so the output is a sample of the right one
            if token != out.tokens[j] or self.params.temperature > 0:
                return j, token, at
        return None


async def _step(
    session: InferenceSession,
    head: ClientHead,
    adapter: ClientAdapter | None,
    sampler: _Sampler,
    step_ids: torch.Tensor,
    position: int | None,
    out: _Output,
    drafts: Sequence[int] = (),
) -> list[tuple[int, int]]:
    """One step through the swarm: the tokens it yields, each with the session position it came from.

    With ``drafts``, they ride behind ``step_ids`` and the step yields the accepted ones plus one
    token of the model's own; without, exactly one token.
    """
    if drafts:
        step_ids = torch.cat([step_ids, torch.tensor([list(drafts)], dtype=torch.long)], dim=1)  # [1, 1 + k]
    with torch.inference_mode():  # an adapter's soft prompt goes in front of the first step only
        hidden = head.embed(step_ids) if adapter is None else adapter.embed(step_ids, with_prompt=position is None)
    result = await session.step(hidden, position)  # [1, n, h]
    first_at = session.length - 1 - len(drafts)  # position of the pending token (or the prompt's last)
    correction = session.take_correction()
    if correction is not None:
        # a spot check found a peer's earlier outputs wrong: tokens sampled from them are re-sampled
        # from the corrected hidden states, and generation resumes at the first token that changes
        # (the rest were conditioned on it, and so was this step's verification)
        redo = await sampler.first_changed(correction, out)
        if redo is not None:
            j, token, at = redo
            out.take_back(j)
            return [(token, at)]
    offset = result.shape[1] - 1 - len(drafts)  # the prefill returns the whole prompt
    tokens = await sampler.verify(result[:, offset:], drafts, out.tokens)
    return [(token, first_at + i) for i, token in enumerate(tokens)]


async def generate_pieces(
    client: Generator,
    ids: list[int],
    *,
    max_new_tokens: int,
    sampling: SamplingParams,
    eos: set[int],
    on_token: Callable[[int], None] | None = None,
    adapter: ClientAdapter | None = None,
) -> AsyncIterator[str | GenerationResult]:
    """Text pieces as they appear, then one :class:`GenerationResult`."""
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    sampler = _Sampler(client.head if adapter is None else adapter, client.heads, sampling, generator, ids)
    started = time.perf_counter()
    first_token_s = 0.0
    out = _Output(client.decode, sampling.stop)
    finish_reason = "length"
    # a soft prompt occupies positions in front of the prompt, so the session must hold them too
    prefix = adapter.prefix_length if adapter is not None else 0
    incidents_before = len(client.incidents)
    spec = client.speculation
    drafting: Drafter | ModelDrafter | None = None
    if spec.applies_to(sampling):
        draft = client.draft_model
        if draft is not None:
            check_draft_model(draft, client.head.config.vocab_size)
        drafting = Drafter(spec) if draft is None else ModelDrafter(draft, spec, len(ids) + max_new_tokens)
    steps = 0
    async with client.inference_session(max_length=prefix + len(ids) + max_new_tokens) as session:
        step_ids = torch.tensor([ids], dtype=torch.long)
        position: int | None = None  # None: the first step, right after what the session holds
        while len(out.tokens) < max_new_tokens and finish_reason == "length":
            # the prefill carries guesses too: a prompt that repeats itself predicts its continuation
            room = max_new_tokens - len(out.tokens) - 1
            drafts: list[int] = []
            if isinstance(drafting, ModelDrafter):  # a model's forwards: off the event loop
                drafts = await asyncio.to_thread(drafting.drafts, [*ids, *out.tokens], room)
            elif drafting is not None:
                drafts = drafting.drafts([*ids, *out.tokens], room)
            emitted = await _step(session, client.head, adapter, sampler, step_ids, position, out, drafts)
            steps += 1
            if drafting is not None:
                drafting.observe(len(drafts), len(emitted) - 1)
            if position is None:
                first_token_s = time.perf_counter() - started
            for token, at in emitted:
                position = at + 1
                if token in eos:
                    finish_reason = "stop"
                    break
                piece = out.append(token, at)
                if on_token is not None:
                    on_token(token)
                if piece:
                    yield piece
                if out.stopped:
                    finish_reason = "stop"
                    break
                if len(out.tokens) >= max_new_tokens:
                    break
            step_ids = torch.tensor([out.tokens[-1:]], dtype=torch.long)
        route, stalls, hops = session.route, list(session.stalls_s), list(session.hop_ms)
        computes = list(session.hop_compute_ms)
    text = out.final_text()
    if len(text) > len(out.emitted):
        yield text[len(out.emitted) :]
    yield GenerationResult(
        token_ids=out.tokens,
        text=text,
        prompt_tokens=len(ids),
        time_to_first_token_s=first_token_s,
        total_s=time.perf_counter() - started,
        route=route,
        stalls_s=stalls,
        hop_ms=hops,
        hop_compute_ms=computes,
        incidents=client.incidents[incidents_before:],
        rewound_tokens=out.rewound,
        finish_reason=finish_reason,
        steps=steps,
        draft_tokens=drafting.proposed if drafting is not None else 0,
        accepted_tokens=drafting.accepted if drafting is not None else 0,
    )

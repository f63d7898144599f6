"""Speculative multi-token steps: guess the next tokens, let the swarm check them all in one pass.

Over the internet a decode step costs round trips through the whole chain, not compute, so a step
that carries ``k`` guessed tokens costs about as much as a step that carries one. The client
guesses by *prompt lookup* (Saxena 2023, "Prompt Lookup Decoding"; the n-gram idea of Yang et al.
2023, "Inference with Reference"): find an earlier place where the context's last tokens appeared
and propose the tokens that followed it (client/lookup.py chooses the place). Copying text (code
edits, summaries, quoting, repeated structure) makes those guesses right often; no draft model is
needed.

The swarm runs ``[pending token, d1 .. dk]`` as one step; the hidden state at each position gives
the model's own choice there. Verification (Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding", section 2.3):

* greedy: accept drafts while each equals the model's argmax, then emit the model's own token at
  the first mismatch (or a bonus token after the last draft). The output is the greedy output.
* sampling: a prompt-lookup draft is a point mass, so draft ``d`` is accepted with probability
  ``p(d)`` and, if rejected, the token is drawn from ``p`` with ``d`` removed and renormalised; each
  emitted token is then distributed exactly as ``p``.

Rejected positions stay in the peers' caches and are overwritten by the next step (the step's
``position`` rewinds them). :class:`DraftLength` adapts ``k`` to how many guesses land.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from peerd.client.sampling import SamplingParams, apply_penalties, token_probs

__all__ = ["DraftLength", "Speculation", "verify_drafts"]


@dataclass(frozen=True)
class Speculation:
    """How a client speculates. ``max_draft_tokens = 0`` turns speculation off.

    Greedy generation speculates by default: its output is identical either way. Sampling keeps
    its distribution but consumes random numbers differently, so a seeded sampled run gives other
    text than without speculation; it speculates only with ``sampled=True``.
    """

    max_draft_tokens: int = 16  # the most guesses one step carries
    initial_draft_tokens: int = 8  # k at the start of each generation
    max_ngram: int = 32  # longest context suffix compared (the longest match wins)
    min_ngram: int = 2  # shortest suffix worth a lookup (one token matches too often by chance)
    copy_window: int = 9  # after a step, how far along its source the model's token is looked for (0: off)
    trusted_match: int = 4  # a match this long is a copy: guessed even while paused, k >= its length
    sampled: bool = False  # also speculate when temperature > 0

    def __post_init__(self) -> None:
        if self.max_draft_tokens < 0:
            raise ValueError("max_draft_tokens must be >= 0 (0 = off)")
        if self.initial_draft_tokens < 1:
            raise ValueError("initial_draft_tokens must be >= 1")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        if self.copy_window < 0 or self.trusted_match < 1:
            raise ValueError("need copy_window >= 0 and trusted_match >= 1")

    def applies_to(self, sampling: SamplingParams) -> bool:
        return self.max_draft_tokens > 0 and (sampling.temperature == 0 or self.sampled)


OFF = Speculation(max_draft_tokens=0)


class DraftLength:
    """``k`` for the next step: grows while every guess lands, shrinks when guesses miss, and pauses.

    A step whose guesses all land suggests a long copied stretch (try more: +2); a miss means the
    extra positions were wasted compute (try fewer: -1, the rule of assisted generation in
    transformers). Wasted positions cost compute on every peer, which is what a step costs on a
    fast link, so when no guess of a step lands, guessing pauses for a number of steps that
    doubles with each such step in a row (up to ``max_pause_steps``): text that does not copy
    stops paying for guesses, and a copied stretch that starts later is still found.
    """

    def __init__(self, initial: int, maximum: int, *, max_pause_steps: int = 32) -> None:
        self.maximum = maximum
        self.max_pause_steps = max_pause_steps
        self.k = max(1, min(initial, maximum))
        self.paused_steps = 0  # steps left without guesses
        self._pause = 1  # length of the next pause

    @property
    def next_k(self) -> int:
        """Guesses for the next step (0 while paused)."""
        return 0 if self.paused_steps > 0 else self.k

    def skipped(self) -> None:
        """A step went without guesses (paused, or nothing to look up)."""
        self.paused_steps = max(0, self.paused_steps - 1)

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        if accepted == proposed:
            self.k = min(self.maximum, self.k + 2)
        else:
            self.k = max(1, self.k - 1)
        if accepted > 0:
            self._pause = 1
        else:
            self.paused_steps = self._pause
            self._pause = min(self.max_pause_steps, self._pause * 2)


def verify_drafts(
    drafts: Sequence[int],
    logits_at: Callable[[int], torch.Tensor],
    params: SamplingParams,
    generator: torch.Generator | None,
    *,
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
) -> list[int]:
    """The tokens a verified step emits: the accepted drafts, then one token of the model's own.

    ``logits_at(i)`` is the model's logits [1, vocab] at the step's i-th position (0 = after the
    pending token, i = after ``drafts[i - 1]``), for i in 0..len(drafts). ``prompt`` and ``output``
    (tokens generated before this step) feed the penalties, as in plain decoding.
    """
    emitted: list[int] = []
    for i in range(len(drafts) + 1):
        logits = apply_penalties(logits_at(i), params, prompt, [*output, *emitted])  # [1, vocab]
        draft = drafts[i] if i < len(drafts) else None
        if params.temperature == 0:
            token = int(logits.argmax(dim=-1)[0])
            emitted.append(token)
            if token != draft:
                return emitted
            continue
        probs = token_probs(logits, params)[0]  # [vocab]
        probs = probs / probs.sum()
        if draft is not None and torch.rand((), generator=generator) < probs[draft]:
            emitted.append(draft)
            continue
        if draft is not None:
            # rejected: draw from the target with the draft's mass removed (the residual max(0, p - q)
            # of speculative sampling when q is a point mass on the draft)
            probs = probs.clone()
            probs[draft] = 0.0
        emitted.append(int(torch.multinomial(probs, 1, generator=generator)[0]))
        return emitted
    return emitted

"""Prompt-lookup drafts for speculative steps, and an offline replay that scores a drafting policy.

A draft is the run of tokens that followed an earlier place in the context (prompt and output so
far) that ends like the context does (Saxena 2023, "Prompt Lookup Decoding"). Which earlier place:

* the one with the **longest** match: the suffix is extended backwards as far as it agrees (up to
  ``Speculation.max_ngram`` tokens), and ties go to the latest place. A long match is a copy in
  progress; a 2-token match is often chance.
* a **copy pointer** first: after a step the drafter knows where in its source the model's own
  token sits. If the model kept copying (it chose the source's next token) or skipped a few source
  tokens (a dropped word, a left-out sentence), its token is found right there, within
  ``Speculation.copy_window`` tokens, and the copy resumes after it even on a one-token match.

A *trusted* match (on the copy pointer, or at least ``trusted_match`` tokens long) is guessed even
while :class:`DraftLength` pauses guessing after misses, and with ``k`` at least its length: a
long copied stretch should not wait for ``k`` to grow 2 by 2. Other matches follow ``DraftLength``.

Greedy verification is deterministic given the greedy output, so :func:`replay` can score a policy
without a model or a swarm: it walks the reference output step by step as generation would.
``tools/draft_replay.py`` runs it on the latency bench's prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from peerd.client.speculative import DraftLength, Speculation

__all__ = ["Drafter", "Match", "ReplayResult", "find_match", "oracle_steps", "replay"]


@dataclass(frozen=True)
class Match:
    """An earlier place in the context that ends like the context does."""

    source: int  # index in the context of the first token the match predicts
    length: int  # how many tokens before ``source`` agree with the context's end
    anchored: bool  # on the copy pointer (see ``find_match``)


def _match_length(context: Sequence[int], end: int, cap: int) -> int:
    """How many tokens before index ``end`` agree with the context's last tokens (at most ``cap``)."""
    n = len(context)
    length = 0
    while length < cap and end - length - 1 >= 0 and context[end - length - 1] == context[n - length - 1]:
        length += 1
    return length


def find_match(
    context: Sequence[int], *, max_ngram: int, min_ngram: int, pointer: int | None = None, window: int = 0
) -> Match | None:
    """The best place to copy the next tokens from, or None.

    Candidates are earlier places whose preceding tokens agree with the context's last ``min_ngram``
    or more tokens. ``pointer`` (index of the source token the context's last token stands for)
    makes places where that token occurs within ``window`` tokens from the pointer candidates even
    on a one-token match, and they win over every other candidate. Among equals the longest match
    wins, then the latest place.
    """
    n = len(context)
    if n < 2:
        return None
    last = context[-1]
    best: tuple[tuple[int, int], Match] | None = None
    for source in range(n - 1, 0, -1):  # source < n: something must follow the match
        if context[source - 1] != last:
            continue
        anchored = pointer is not None and pointer <= source - 1 < pointer + window
        length = _match_length(context, source, max_ngram)
        if length < min_ngram and not anchored:
            continue
        # anchored first, then the longest match, then the latest place
        key = (1, length * n + source) if anchored else (0, length * n + source)
        if best is None or key > best[0]:
            best = (key, Match(source, length, anchored))
    return None if best is None else best[1]


class Drafter:
    """Speculation state of one generation: the next step's guesses, and how many landed."""

    def __init__(self, config: Speculation) -> None:
        self.config = config
        self.length = DraftLength(config.initial_draft_tokens, config.max_draft_tokens)
        self.proposed = 0
        self.accepted = 0
        self._source: int | None = None  # where the last step's guesses were copied from
        self._pointer: int | None = None  # source index the model's latest own token stands for

    def drafts(self, context: Sequence[int], room: int) -> list[int]:
        """Guesses for the next step; ``room``: how many more tokens the session can hold."""
        config, pointer = self.config, self._pointer
        self._source = self._pointer = None  # the pointer speaks of the last step only
        match = find_match(
            context, max_ngram=config.max_ngram, min_ngram=config.min_ngram, pointer=pointer, window=config.copy_window
        )
        k = 0
        if match is not None:
            trusted = match.anchored or match.length >= config.trusted_match
            k = max(self.length.k, min(config.max_draft_tokens, match.length)) if trusted else self.length.next_k
        drafts = list(context[match.source : match.source + min(k, room)]) if match is not None else []
        if not drafts:
            self.length.skipped()
            return []
        self._source = match.source if match is not None else None
        return drafts

    def observe(self, proposed: int, accepted: int) -> None:
        """The step sent ``proposed`` guesses and the model confirmed the first ``accepted``."""
        self.proposed += proposed
        self.accepted += accepted
        self.length.update(proposed, accepted)
        # the model's own token (a correction, or the bonus after the last guess) stands where the
        # source had its (accepted + 1)-th token: the copy resumes there if the model kept copying
        self._pointer = self._source + accepted if self._source is not None and proposed else None


@dataclass(frozen=True)
class ReplayResult:
    """How a drafting policy would have done on one reference output."""

    tokens: int
    steps: int  # trips through the swarm, the prefill included
    drafted: int
    accepted: int

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def positions(self) -> int:
        """Positions computed by every peer: one per step plus every guess."""
        return self.steps + self.drafted


def replay(prompt: Sequence[int], output: Sequence[int], config: Speculation) -> ReplayResult:
    """Greedy generation of ``output`` after ``prompt`` with ``config``'s drafts, without a model.

    Greedy verification accepts a guess exactly when it equals the reference token at its place,
    and each step emits one token of the model's own after the accepted guesses, so the steps,
    guesses and acceptances are those a swarm run producing ``output`` would have.
    """
    drafter = Drafter(config)
    done = steps = 0
    while done < len(output):
        drafts = drafter.drafts([*prompt, *output[:done]], len(output) - done - 1)
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == output[done + accepted]:
            accepted += 1
        drafter.observe(len(drafts), accepted)
        done += accepted + 1
        steps += 1
    return ReplayResult(len(output), steps, drafter.proposed, drafter.accepted)


def oracle_steps(prompt: Sequence[int], output: Sequence[int], max_draft_tokens: int) -> int:
    """The fewest steps any prompt-lookup policy could take, knowing ``output`` in advance.

    Each step guesses the longest run of the tokens still to come (up to ``max_draft_tokens``) that
    occurs anywhere in the context. Taking the longest run every step is optimal: if a step could
    reach p2 and reaches p1 > p2 instead, every run available at p2 is, cut at p1, available at p1
    too (the context only grows), so the next step from p1 reaches at least as far as from p2.
    """
    done = steps = 0
    while done < len(output):
        context = [*prompt, *output[:done]]
        room = min(max_draft_tokens, len(output) - done - 1)
        best = 0
        for start in range(len(context)):
            length = 0
            while length < room and start + length < len(context) and context[start + length] == output[done + length]:
                length += 1
            best = max(best, length)
        done += best + 1
        steps += 1
    return steps

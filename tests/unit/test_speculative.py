"""The draft-length rule, the speculation config, and draft verification (greedy and sampled)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from peerd.client.sampling import SamplingParams, sample_next
from peerd.client.speculative import DraftLength, Speculation, verify_drafts


def test_draft_length_grows_on_full_accepts_and_shrinks_on_misses() -> None:
    length = DraftLength(initial=4, maximum=8)
    length.update(4, 4)
    assert length.next_k == 6
    length.update(6, 6)
    length.update(8, 8)
    assert length.next_k == 8
    length.update(8, 3)
    assert length.next_k == 7
    length.update(0, 0)  # a step without guesses says nothing
    assert length.next_k == 7


def test_guessing_pauses_after_a_total_miss_for_longer_each_time_in_a_row() -> None:
    length = DraftLength(initial=2, maximum=8, max_pause_steps=4)
    pauses = []
    for _ in range(5):
        length.update(length.next_k, 0)  # every guess wrong
        paused = 0
        while length.next_k == 0:
            length.skipped()
            paused += 1
        pauses.append(paused)
    assert pauses == [1, 2, 4, 4, 4]  # doubling, capped
    assert length.next_k == 1
    length.update(1, 1)  # a hit ends the streak: the next miss pauses one step again
    assert length.next_k == 3
    length.update(3, 0)
    assert length.paused_steps == 1


def test_speculation_applies_to_greedy_by_default_and_to_sampling_on_request() -> None:
    greedy, sampled = SamplingParams(), SamplingParams(temperature=0.7)
    assert Speculation().applies_to(greedy) and not Speculation().applies_to(sampled)
    assert Speculation(sampled=True).applies_to(sampled)
    assert not Speculation(max_draft_tokens=0).applies_to(greedy)
    with pytest.raises(ValueError):
        Speculation(min_ngram=4, max_ngram=3)
    with pytest.raises(ValueError):
        Speculation(copy_window=-1)


def _one_hot_logits(tokens: list[int], vocab: int = 16) -> torch.Tensor:
    logits = torch.zeros(len(tokens), vocab)  # [n, vocab]
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 5.0
    return logits


def test_greedy_accepts_drafts_up_to_the_first_mismatch_then_takes_the_models_token() -> None:
    model = _one_hot_logits([3, 4, 9, 1])  # the model's argmax after each position
    at = lambda i: model[i : i + 1]  # noqa: E731
    assert verify_drafts([3, 4, 5], at, SamplingParams(), None) == [3, 4, 9]
    assert verify_drafts([3, 4, 9], at, SamplingParams(), None) == [3, 4, 9, 1]  # all land: a bonus token
    assert verify_drafts([8], at, SamplingParams(), None) == [3]
    assert verify_drafts([], at, SamplingParams(), None) == [3]


def test_greedy_verification_applies_penalties_as_plain_decoding_does() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 12)  # [positions, vocab]
    params = SamplingParams(repetition_penalty=3.0, frequency_penalty=1.5)
    prompt, output = [1, 2], [3]
    plain: list[int] = []
    for i in range(5):  # what one-token steps would pick at these positions
        plain.append(int(sample_next(logits[i : i + 1], params, prompt=prompt, output=[*output, *plain])[0]))
    got = verify_drafts(plain[:4], lambda i: logits[i : i + 1], params, None, prompt=prompt, output=output)
    assert got == plain


def test_speculative_sampling_keeps_the_target_distribution() -> None:
    target = torch.tensor([0.1, 0.5, 0.15, 0.25])
    logits = target.log().expand(2, 4)  # the same distribution at both positions
    params = SamplingParams(temperature=1.0)
    generator = torch.Generator().manual_seed(1234)
    trials = 20000
    for draft in (1, 2):  # a likely guess and an unlikely one
        first = Counter(
            verify_drafts([draft], lambda i: logits[i : i + 1], params, generator)[0] for _ in range(trials)
        )
        for token, p in enumerate(target.tolist()):
            # standard error at 20k trials is at most 0.0036: 0.015 is four of them
            assert abs(first[token] / trials - p) < 0.015, (draft, token, first)


def test_a_rejected_draft_is_never_redrawn() -> None:
    logits = torch.tensor([[0.0, 0.0, -1e9]]).expand(2, 3)  # token 2 is impossible
    generator = torch.Generator().manual_seed(5)
    for _ in range(200):
        emitted = verify_drafts([0], lambda i: logits[i : i + 1], SamplingParams(temperature=1.0), generator)
        assert 2 not in emitted
        assert emitted[0] == 0 or emitted == [1]

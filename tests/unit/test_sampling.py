"""Sampling knobs (top-k, penalties) and stop strings, on plain tensors and a real tokenizer."""

from __future__ import annotations

import pytest
import torch

from peerd.client.generation import _Output
from peerd.client.sampling import SamplingParams, apply_penalties, sample_next
from peerd.model.chat import load_tokenizer
from tests.helpers.tiny_model import write_tiny_tokenizer


def test_greedy_takes_the_largest_logit_and_top_k_1_is_greedy_at_any_temperature():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0]])
    assert sample_next(logits, SamplingParams()).tolist() == [1]
    hot = SamplingParams(temperature=5.0, top_k=1)
    draws = {int(sample_next(logits, hot, torch.Generator().manual_seed(s))[0]) for s in range(20)}
    assert draws == {1}


def test_top_k_keeps_only_the_k_likeliest():
    logits = torch.tensor([[5.0, 4.0, 3.0, -9.0, -9.0]])
    params = SamplingParams(temperature=100.0, top_k=2)  # nearly uniform over what is kept
    draws = {int(sample_next(logits, params, torch.Generator().manual_seed(s))[0]) for s in range(200)}
    assert draws == {0, 1}


def test_seeded_sampling_repeats_and_different_seeds_differ():
    logits = torch.randn(1, 256, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, top_p=0.95)

    def draw(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return [int(sample_next(logits, params, gen)[0]) for _ in range(30)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_repetition_penalty_makes_seen_tokens_less_likely_whatever_their_sign():
    logits = torch.tensor([[2.0, -1.0, 1.9, -1.05]])
    before = logits.clone()
    out = apply_penalties(logits, SamplingParams(repetition_penalty=1.5), prompt=[0], output=[1])
    assert torch.allclose(out, torch.tensor([[2.0 / 1.5, -1.5, 1.9, -1.05]]))
    assert sample_next(logits, SamplingParams(repetition_penalty=1.5), prompt=[0]).tolist() == [2]
    assert torch.equal(logits, before)  # the caller's tensor is untouched


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(1, 4)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, params, prompt=[3, 3], output=[1, 1, 1, 2])
    assert torch.allclose(out, torch.tensor([[0.0, -(0.5 + 3 * 0.25), -(0.5 + 0.25), 0.0]]))


@pytest.mark.parametrize(
    "bad",
    [
        {"top_k": -1},
        {"repetition_penalty": 0.0},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3.0},
        {"stop": ("",)},
        {"temperature": float("nan")},
    ],
)
def test_sampling_params_refuse_out_of_range_values(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok"), 256))


def _feed(tokenizer, text: str, stops: tuple[str, ...]) -> tuple[list[str], _Output]:
    out = _Output(lambda ids: tokenizer.decode(list(ids)), stops)
    pieces = []
    for position, token in enumerate(tokenizer.encode(text, add_special_tokens=False).ids):
        pieces.append(out.append(token, position))
        if out.stopped:
            break
    return pieces, out


def test_stop_string_ends_the_text_before_it_and_is_never_streamed(tokenizer):
    pieces, out = _feed(tokenizer, "one two\nUser: three", ("\nUser:",))
    assert out.stopped
    assert "".join(pieces) == out.final_text() == "one two"
    # while "\nUse" could still become the stop string it was held back, not streamed
    assert all("\n" not in piece for piece in pieces)


def test_text_held_back_for_a_possible_stop_string_comes_out_when_it_is_not_one(tokenizer):
    pieces, out = _feed(tokenizer, "a\nUsb", ("\nUser:",))
    assert not out.stopped
    assert "".join(pieces) == out.final_text() == "a\nUsb"
    assert pieces[1:4] == ["", "", ""]  # "\n", "U", "s" waited for the "b" that ruled the stop out


def test_the_earliest_of_several_stop_strings_wins(tokenizer):
    _, out = _feed(tokenizer, "xx END yy STOP", ("STOP", " END"))
    assert out.final_text() == "xx"

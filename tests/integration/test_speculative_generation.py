"""Speculative multi-token steps through a real 3-peer swarm: the same greedy tokens, fewer steps."""

from __future__ import annotations

import asyncio

import pytest

from peerd.cli.main import main
from peerd.client import SamplingParams, Speculation
from peerd.model.loading import load_local_model
from peerd.model.local import LocalModel
from tests.helpers.swarm import MODEL_ID
from tests.helpers.tiny_model import make_tiny_checkpoint

# a prompt that repeats itself, so prompt lookup always finds something to guess
REPETITIVE = [1, 5, 9, 23, 42, 7] * 4
# no token repeats, so there is nothing to look up until the output starts repeating
FRESH = [3, 14, 15, 92, 65, 35, 89, 79]


async def test_speculative_greedy_is_token_identical_to_local_and_plain(make_swarm, local_model: LocalModel) -> None:
    swarm = await make_swarm()
    client = await swarm.client()
    try:
        assert client.speculation.max_draft_tokens > 0  # on by default for greedy
        for prompt in (REPETITIVE, FRESH):
            expected = local_model.generate_greedy(prompt, 32, eos_token_ids=[])
            fast = await client.generate(prompt, max_new_tokens=32, stop_on_eos=False)
            assert fast.token_ids == expected, prompt
            assert fast.accepted_tokens <= fast.draft_tokens
            # each step yields one token of the model's own plus the guesses it confirmed
            assert fast.steps == len(fast.token_ids) - fast.accepted_tokens
        repetitive = await client.generate(REPETITIVE, max_new_tokens=32, stop_on_eos=False)
        assert repetitive.draft_tokens > 0  # the prompt repeats: its prefill already carries guesses

        # penalties change every choice with the output so far; verification must follow them
        penalised = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5)
        with_drafts = await client.generate(REPETITIVE, max_new_tokens=24, sampling=penalised, stop_on_eos=False)
        client.speculation = Speculation(max_draft_tokens=0)
        plain = await client.generate(REPETITIVE, max_new_tokens=24, sampling=penalised, stop_on_eos=False)
        assert plain.draft_tokens == 0 and plain.steps == 24
        assert with_drafts.token_ids == plain.token_ids
    finally:
        await client.close()


async def test_speculative_sampling_runs_to_length_on_request(make_swarm) -> None:
    swarm = await make_swarm()
    client = await swarm.client()
    try:
        client.speculation = Speculation(sampled=True)
        sampling = SamplingParams(temperature=0.8, seed=3)
        result = await client.generate(REPETITIVE, max_new_tokens=24, sampling=sampling, stop_on_eos=False)
        assert len(result.token_ids) == 24
        assert result.draft_tokens > 0
        assert result.steps == len(result.token_ids) - result.accepted_tokens
    finally:
        await client.close()


async def test_a_local_draft_model_guesses_fresh_text_and_changes_no_token(
    make_swarm, local_model: LocalModel, tmp_path
) -> None:
    swarm = await make_swarm()
    client = await swarm.client()
    try:
        expected = local_model.generate_greedy(FRESH, 32, eos_token_ids=[])
        # the swarm's own model as its draft: every guess lands, so k grows and steps are few
        client.draft_model = local_model
        same = await client.generate(FRESH, max_new_tokens=32, stop_on_eos=False)
        assert same.token_ids == expected
        assert same.draft_tokens > 0 and same.accepted_tokens == same.draft_tokens
        assert same.steps == len(same.token_ids) - same.accepted_tokens and same.steps <= 8
        # a smaller, different model (2 blocks, other weights): guesses miss, tokens stay the same
        small = load_local_model(make_tiny_checkpoint(tmp_path / "draft", num_layers=2, seed=7), progress=False)
        client.draft_model = small
        drafted = await client.generate(FRESH, max_new_tokens=32, stop_on_eos=False)
        assert drafted.token_ids == expected
        assert drafted.draft_tokens > 0 and drafted.steps == len(drafted.token_ids) - drafted.accepted_tokens
        # another vocabulary cannot guess this model's tokens
        client.draft_model = load_local_model(
            make_tiny_checkpoint(tmp_path / "other", num_layers=1, vocab_size=300), progress=False
        )
        with pytest.raises(ValueError, match="share the swarm model's tokenizer"):
            await client.generate(FRESH, max_new_tokens=4, stop_on_eos=False)
    finally:
        await client.close()


async def test_peerd_generate_with_a_draft_model_prints_the_same_text(make_swarm, capsys) -> None:
    swarm = await make_swarm()
    argv = ["generate", "--model", str(swarm.ckpt), "--model-id", MODEL_ID, "--max-new-tokens", "16"]
    argv += ["--initial-peers", ",".join(swarm.initial_peers), "--no-push"]
    texts = []
    for extra in ([], ["--draft-model", str(swarm.ckpt)]):
        capsys.readouterr()
        assert await asyncio.to_thread(main, [*argv, *extra, "Why is the sky blue?"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()
    capsys.readouterr()
    with_other_vocab = make_tiny_checkpoint(swarm.ckpt.parent / "other-vocab", num_layers=1, vocab_size=300)
    assert await asyncio.to_thread(main, [*argv, "--draft-model", str(with_other_vocab), "hello"]) != 0
    assert "share the swarm model's tokenizer" in capsys.readouterr().err

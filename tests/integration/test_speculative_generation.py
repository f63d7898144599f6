"""Speculative multi-token steps through a real 3-peer swarm: the same greedy tokens, fewer steps."""

from __future__ import annotations

from peerd.client import SamplingParams, Speculation
from peerd.model.local import LocalModel

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

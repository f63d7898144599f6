"""Prompt-lookup drafts (longest match, copy pointer, trusted matches) and the offline replay."""

from __future__ import annotations

from peerd.client.lookup import Drafter, Match, find_match, oracle_steps, replay
from peerd.client.speculative import Speculation

# the drafting of the release before the longest-match lookup: the latest 3- or 2-token match,
# k from 4 up to 8, no copy pointer
BEFORE = Speculation(max_draft_tokens=8, initial_draft_tokens=4, max_ngram=3, copy_window=0, trusted_match=4)


def test_the_longest_match_wins_over_a_later_shorter_one() -> None:
    # the context ends with [1, 2, 3]: it occurred at 0 (followed by 7) and, as [2, 3] only, at 5
    # (followed by 9); the latest-2-gram rule would pick 9
    context = [1, 2, 3, 7, 8, 2, 3, 9, 4, 1, 2, 3]
    assert find_match(context, max_ngram=32, min_ngram=2) == Match(source=3, length=3, anchored=False)
    # capped at 2 tokens both match equally and the latest place wins
    assert find_match(context, max_ngram=2, min_ngram=2) == Match(source=7, length=2, anchored=False)


def test_no_match_below_min_ngram_unless_on_the_copy_pointer() -> None:
    context = [5, 6, 7, 8, 9, 1, 7]  # the last token, 7, occurred at 2 with a 1-token match only
    assert find_match(context, max_ngram=32, min_ngram=2) is None
    # the model's token 7 stands for source index 1 (it skipped token 6): within the window it
    # resumes the copy after 7
    assert find_match(context, max_ngram=32, min_ngram=2, pointer=1, window=3) == Match(3, 1, True)
    assert find_match(context, max_ngram=32, min_ngram=2, pointer=1, window=1) is None
    assert find_match([4], max_ngram=32, min_ngram=1) is None


def test_a_skip_in_the_copy_resumes_from_the_source_right_after_it() -> None:
    source = list(range(100, 130))
    # the model copies source[0:10], leaves out source[10:14], then copies source[14:]
    output = source[:10] + source[14:]
    drafter = Drafter(Speculation(initial_draft_tokens=4, trusted_match=99))
    prompt = [7, *source, 8, 7]  # after the first token, [7, 100] matches the source's start
    context = [*prompt, *output[:1]]
    drafts = drafter.drafts(context, room=50)
    assert drafts == source[1:5]
    drafter.observe(len(drafts), 4)  # all land; the bonus token is source[5]
    context += [*source[1:6]]
    # on the pointer, so trusted: k is the larger of 6 (4 grew by 2) and the match's 7 tokens ([7, 100..105])
    assert drafter.drafts(context, room=50) == source[6:13]
    drafter.observe(7, 4)  # source[6:10] land, the model says source[14] instead of source[10]
    context += [*source[6:10], source[14]]
    # a 1-token match only, but on the pointer: the copy goes on from source[15]
    assert drafter.drafts(context, room=50)[:3] == source[15:18]


def test_a_long_match_is_guessed_during_a_pause_with_k_at_least_its_length() -> None:
    text = list(range(50, 70))
    context = [*text, 1, *text[:6]]  # the last 6 tokens repeat the text's start
    drafter = Drafter(Speculation(initial_draft_tokens=2, trusted_match=4))
    drafter.length.paused_steps = 3  # earlier guesses all missed
    assert drafter.drafts(context, room=50) == text[6:12]
    weak = Drafter(Speculation(initial_draft_tokens=2, trusted_match=8))
    weak.length.paused_steps = 3
    assert weak.drafts(context, room=50) == []  # a 6-token match is not trusted here: the pause holds
    assert weak.length.paused_steps == 2


def test_replay_on_a_synthetic_copy_counts_steps_guesses_and_acceptance() -> None:
    body = list(range(200, 240))
    prompt = [1, 2, *body, 3]
    # the answer copies the body, leaves out 5 tokens in the middle, then adds fresh tokens
    output = body[:20] + body[25:] + [900, 901, 902, 903]
    now, before = replay(prompt, output, Speculation()), replay(prompt, output, BEFORE)
    for result in (now, before):
        assert result.tokens == len(output)
        assert result.steps == result.tokens - result.accepted  # one token of the model's own per step
        assert 0 < result.acceptance_rate <= 1
    assert now.steps < before.steps  # the skip and the long copy cost the old lookup more steps
    # what any lookup could at best: the prefill guesses nothing (the prompt's end is new),
    # then at most 16 guesses per step
    best = oracle_steps(prompt, output, 16)
    assert best <= now.steps
    assert oracle_steps(prompt, output[:1], 16) == 1
    assert oracle_steps([1, 2, 3], [1, 2, 3], 16) == 1  # one step: the own token, then 2 guesses
    assert replay([9, 9], [], Speculation()).steps == 0

"""Token estimates, chunk budgets, semantic splitting, reduce packing and the truncation rule."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from promptq.chunking import (
    MIN_SUMMARY_TOKENS,
    MIN_SUMMARY_WORDS,
    SUMMARY_SEPARATOR,
    TOKENS_PER_WORD,
    count_tokens,
    final_output_tokens,
    input_budget,
    pack,
    split_text,
    summary_tokens,
    summary_words,
    text_hash,
    token_counter,
)
from promptq.errors import PermanentLLMError, TransientLLMError
from tests.summaries import generate_document
from worker.truncation import is_context_overflow, shrink_factor, truncation_ratio

COUNT = token_counter(4.0)


def test_count_tokens_is_characters_over_the_calibration_rounded_up() -> None:
    assert count_tokens("", "m") == 0
    assert count_tokens("abcd", "m") == 1
    assert count_tokens("abcde", "m") == 2
    assert count_tokens("a" * 600, "m", chars_per_token=6.0) == 100
    assert token_counter(2.0)("abcd", "m") == 2


def test_the_final_reserve_is_the_users_max_tokens_whole_else_the_summary_cap() -> None:
    assert final_output_tokens(window_tokens=8192, max_tokens=300, target_words=1000) == 300
    # the user's max_tokens is sent as is, so it is reserved whole, even over a quarter
    assert final_output_tokens(window_tokens=4096, max_tokens=2000, target_words=None) == 2000
    assert final_output_tokens(window_tokens=8192, max_tokens=None, target_words=100) == 140
    assert final_output_tokens(window_tokens=8192, max_tokens=None, target_words=None) == 512
    assert final_output_tokens(window_tokens=1024, max_tokens=None, target_words=None) == 256


def test_the_summary_cap_follows_target_words_then_the_default_within_bounds() -> None:
    assert summary_tokens(window_tokens=8192, target_words=100) == 140
    assert summary_tokens(window_tokens=8192, target_words=None) == 512
    # never more than a quarter of the window, never below what 20 words need
    assert summary_tokens(window_tokens=1024, target_words=5000) == 256
    assert summary_tokens(window_tokens=8192, target_words=10) == MIN_SUMMARY_TOKENS


@pytest.mark.parametrize("cap", [MIN_SUMMARY_TOKENS, 36, 100, 140, 512, 2048])
def test_the_words_asked_for_fit_the_cap(cap: int) -> None:
    words = summary_words(cap)
    assert words >= MIN_SUMMARY_WORDS and words * TOKENS_PER_WORD <= cap


def test_input_budget_is_what_the_prompt_and_answer_leave_scaled() -> None:
    budget = input_budget(window_tokens=8192, output_tokens=512, overhead_tokens=80, scale=1.0)
    assert budget == 7600
    half = input_budget(window_tokens=8192, output_tokens=512, overhead_tokens=80, scale=0.5)
    assert half == 3800


def test_split_text_keeps_every_chunk_within_budget_and_is_deterministic() -> None:
    document = generate_document(5_000, seed=1)
    chunks = split_text(document, max_tokens=500, overlap_tokens=0, model="m", counter=COUNT)

    assert len(chunks) >= count_tokens(document, "m") // 500
    assert all(COUNT(c.text, "m") <= 500 for c in chunks)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.text_hash == text_hash(c.text) for c in chunks)
    # no overlap: the chunks are the document, in order, cut at whitespace
    assert " ".join(c.text for c in chunks).split() == document.split()
    # paragraphs are kept whole whenever one fits
    paragraphs = document.split("\n\n")
    whole = sum(any(p in c.text for c in chunks) for p in paragraphs)
    assert whole >= len(paragraphs) * 0.9
    again = split_text(document, max_tokens=500, overlap_tokens=0, model="m", counter=COUNT)
    assert [c.text_hash for c in again] == [c.text_hash for c in chunks]


def test_split_text_overlaps_chunks_cut_inside_a_paragraph() -> None:
    # One long paragraph, so cuts fall between sentences (the splitter overlaps whole units
    # of the level it cuts at; chunks cut between paragraphs need no overlap)
    document = " ".join(generate_document(3_000, seed=2).split("\n\n"))

    def shared_tails(overlap_tokens: int) -> list[bool]:
        chunks = split_text(
            document, max_tokens=400, overlap_tokens=overlap_tokens, model="m", counter=COUNT
        )
        return [" ".join(a.text.split()[-15:]) in b.text for a, b in itertools.pairwise(chunks)]

    assert not any(shared_tails(0))
    overlapping = shared_tails(60)
    assert sum(overlapping) >= len(overlapping) * 0.8


def test_markdown_is_split_at_headings() -> None:
    sections = [f"# Part {i}\n\n" + generate_document(150, seed=i) for i in range(6)]
    document = "\n\n".join(sections)
    chunks = split_text(
        document, max_tokens=400, overlap_tokens=0, model="m", counter=COUNT, markdown=True
    )
    assert sum(c.text.startswith("# Part") for c in chunks) >= 4


def test_split_text_refuses_a_zero_budget() -> None:
    with pytest.raises(ValueError, match="positive"):
        split_text("text", max_tokens=0, overlap_tokens=0, model="m", counter=COUNT)


@given(st.lists(st.integers(min_value=1, max_value=120), max_size=40), st.integers(10, 200))
def test_pack_keeps_order_and_fills_groups_within_budget(sizes: list[int], budget: int) -> None:
    items = [chr(ord("a") + i % 26) * size for i, size in enumerate(sizes)]
    groups = [
        g.split(SUMMARY_SEPARATOR) for g in pack(items, max_tokens=budget, model="m", counter=COUNT)
    ]

    def cost(group: list[str]) -> int:
        # what pack adds up: each item, plus a separator between items
        return sum(COUNT(i, "m") for i in group) + (len(group) - 1) * COUNT(SUMMARY_SEPARATOR, "m")

    assert [i for group in groups for i in group] == items
    assert all(cost(group) <= budget or len(group) == 1 for group in groups)
    # greedy: the next item never fitted in the group before it
    assert all(cost([*first, second[0]]) > budget for first, second in itertools.pairwise(groups))


def test_truncation_is_a_report_far_below_the_estimate_of_a_long_prompt() -> None:
    assert truncation_ratio(estimated_tokens=4000, reported_tokens=2000, min_ratio=0.7) == 0.5
    assert truncation_ratio(estimated_tokens=4000, reported_tokens=2900, min_ratio=0.7) is None
    assert truncation_ratio(estimated_tokens=4000, reported_tokens=None, min_ratio=0.7) is None
    # short prompts are not judged; a ratio of 0 turns the check off
    assert truncation_ratio(estimated_tokens=500, reported_tokens=100, min_ratio=0.7) is None
    assert truncation_ratio(estimated_tokens=4000, reported_tokens=10, min_ratio=0) is None


def test_chunks_shrink_below_what_the_model_read() -> None:
    assert shrink_factor(0.4) == pytest.approx(0.36)
    assert shrink_factor(0.65) == 0.5  # at least halve
    assert shrink_factor(0.01) == 0.1  # at most a tenth
    assert shrink_factor(None) == 0.5


def test_a_context_length_400_counts_as_an_overflow() -> None:
    overflow = PermanentLLMError("maximum context length is 8192 tokens", status_code=400)
    assert is_context_overflow(overflow)
    assert not is_context_overflow(PermanentLLMError("bad request", status_code=400))
    assert not is_context_overflow(PermanentLLMError("context", status_code=401))
    assert not is_context_overflow(TransientLLMError("context", status_code=400))

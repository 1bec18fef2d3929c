"""Measuring and cutting text by tokens: the offline token estimate, the chunk budget, the
semantic splitter, and the packing of summaries into reduce groups.

Token counts are an *estimate*: `count_tokens` divides characters by a calibration constant.
About 4 characters per token holds for English prose with the BPE tokenizers of current models
(GPT-4o, Llama 3, Mistral: 3.6 to 4.5); code and non-Latin scripts take more tokens per
character, so set `PROMPTQ_CHARS_PER_TOKEN` lower for them. A real tokenizer plugs in by
replacing `count_tokens` (same signature); everything else only calls that one function.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from semantic_text_splitter import MarkdownSplitter, TextSplitter

logger = logging.getLogger(__name__)

#: Default calibration of the estimate: characters per token of English prose.
CHARS_PER_TOKEN = 4.0
#: Tokens a chat message costs beyond its content (role and separators), as OpenAI counts them.
MESSAGE_OVERHEAD_TOKENS = 4
#: Tokens per English word, used to turn `target_words` into a token budget.
TOKENS_PER_WORD = 1.4
#: Output reserved per call when neither `params.max_tokens` nor `target_words` says otherwise.
DEFAULT_OUTPUT_TOKENS = 512
#: No intermediate (map or combine) call may reserve more than this fraction of the window for
#: its output. The user's own `params.max_tokens` on the final call is never capped.
MAX_OUTPUT_FRACTION = 0.25
#: Intermediate summaries are asked to stay this far under their token cap, in words.
WORDS_MARGIN = 0.8
#: Fewest words an intermediate summary is asked for; a smaller cap is an error, not a summary.
MIN_SUMMARY_WORDS = 20
#: The cap that lets an intermediate call ask for MIN_SUMMARY_WORDS within WORDS_MARGIN.
MIN_SUMMARY_TOKENS = math.ceil(MIN_SUMMARY_WORDS * TOKENS_PER_WORD / WORDS_MARGIN)
#: A chunk smaller than this carries too little text to be worth a call of its own.
MIN_CHUNK_TOKENS = 64
#: Put between summaries joined into one reduce input.
SUMMARY_SEPARATOR = "\n\n"

#: (text, model) -> tokens. `count_tokens` with its calibration bound is one.
TokenCounter = Callable[[str, str], int]


def count_tokens(text: str, model: str, *, chars_per_token: float = CHARS_PER_TOKEN) -> int:
    """Estimated tokens of `text` for `model`: characters / chars_per_token, rounded up.

    `model` is unused by the estimate; it is the seam where a real tokenizer would choose its
    vocabulary.
    """
    return math.ceil(len(text) / chars_per_token)


def token_counter(chars_per_token: float) -> TokenCounter:
    """`count_tokens` calibrated to `chars_per_token`."""
    return partial(count_tokens, chars_per_token=chars_per_token)


def messages_tokens(messages: Sequence[dict[str, str]], model: str, counter: TokenCounter) -> int:
    """Estimated prompt tokens of a chat request, per-message overhead included."""
    return sum(counter(m["content"], model) + MESSAGE_OVERHEAD_TOKENS for m in messages)


def text_hash(text: str) -> str:
    """The sha256 hex digest identifying one call's input text."""
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def summary_tokens(*, window_tokens: int, target_words: int | None) -> int:
    """The answer cap of an intermediate (map or combine) call: about 1.4 tokens per
    `target_words`, else the default; at most a quarter of the window, at least
    MIN_SUMMARY_TOKENS. The user's `params.max_tokens` is for the final summary and plays no
    part: an intermediate summary needs room to carry its part's facts."""
    wanted = DEFAULT_OUTPUT_TOKENS
    if target_words is not None:
        wanted = math.ceil(target_words * TOKENS_PER_WORD)
    wanted = min(wanted, int(window_tokens * MAX_OUTPUT_FRACTION))
    return max(MIN_SUMMARY_TOKENS, wanted)


def final_output_tokens(
    *, window_tokens: int, max_tokens: int | None, target_words: int | None
) -> int:
    """Tokens to reserve for the answer of the final (or only) call.

    That call is sent the user's own parameters, so a `params.max_tokens` is reserved whole,
    however much of the window it takes (a server refuses prompt + max_tokens > window).
    Without one, the reserve is an intermediate call's.
    """
    if max_tokens is not None:
        return max_tokens
    return summary_tokens(window_tokens=window_tokens, target_words=target_words)


def summary_words(cap_tokens: int) -> int:
    """Words an intermediate call capped at `cap_tokens` is asked for: WORDS_MARGIN under it."""
    return math.floor(cap_tokens / TOKENS_PER_WORD * WORDS_MARGIN)


def input_budget(
    *, window_tokens: int, output_tokens: int, overhead_tokens: int, scale: float
) -> int:
    """Tokens of text one call may carry: the window minus prompt and answer, times `scale`."""
    return math.floor((window_tokens - output_tokens - overhead_tokens) * scale)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of text to summarize, with its position and identity."""

    index: int
    text: str
    text_hash: str


def split_text(
    text: str,
    *,
    max_tokens: int,
    overlap_tokens: int,
    model: str,
    counter: TokenCounter,
    markdown: bool = False,
) -> list[Chunk]:
    """Cut `text` at the largest semantic boundaries that keep every chunk within max_tokens.

    Consecutive chunks share up to `overlap_tokens` (at most a quarter of a chunk). The result is
    deterministic, so the same text and sizes always give the same chunks and hashes: that is
    what lets a later attempt find the summaries an earlier one saved.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be positive")
    overlap = min(overlap_tokens, max_tokens // 4)
    splitter_type = MarkdownSplitter if markdown else TextSplitter
    splitter = splitter_type.from_callback(lambda t: counter(t, model), max_tokens, overlap)
    pieces = [p for p in splitter.chunks(text) if p.strip()]
    return [Chunk(index=i, text=p, text_hash=text_hash(p)) for i, p in enumerate(pieces)]


def pack(items: Sequence[str], *, max_tokens: int, model: str, counter: TokenCounter) -> list[str]:
    """Join consecutive items into as few groups as fit within max_tokens each, in order.

    An item larger than max_tokens on its own still gets a group of its own.
    """
    groups: list[str] = []
    current: list[str] = []
    used = 0
    separator_tokens = counter(SUMMARY_SEPARATOR, model)
    for item in items:
        size = counter(item, model) + (separator_tokens if current else 0)
        if current and used + size > max_tokens:
            groups.append(SUMMARY_SEPARATOR.join(current))
            current, used = [], 0
            size = counter(item, model)
        current.append(item)
        used += size
    if current:
        groups.append(SUMMARY_SEPARATOR.join(current))
    return groups

"""Silent truncation: telling from a model's usage report that it read only part of a prompt,
and how much smaller the next attempt's chunks must be.

Ollama's OpenAI-compatible API answers 200 to a prompt longer than its context, having read
only what fits; the `prompt_tokens` it reports is the only evidence. (Its native `/api/chat`
refuses such prompts with `"truncate": false`; promptq speaks the OpenAI API.)
"""

from __future__ import annotations

from promptq.errors import LLMError, PermanentLLMError

#: Prompts estimated below this many tokens are not checked for truncation: tokenizers disagree
#: most on short texts, and no chat model has a context window this small.
MIN_CHECKED_PROMPT_TOKENS = 1024
#: After a truncation the chunk scale is multiplied by 0.9 x the fraction of the prompt the
#: model evidently kept, bounded to [MIN_SHRINK, MAX_SHRINK].
SHRINK_HEADROOM = 0.9
MAX_SHRINK = 0.5
MIN_SHRINK = 0.1


def truncation_ratio(
    *, estimated_tokens: int, reported_tokens: int | None, min_ratio: float
) -> float | None:
    """reported / estimated when the prompt was evidently cut (below `min_ratio`), else None."""
    if min_ratio <= 0 or reported_tokens is None or estimated_tokens < MIN_CHECKED_PROMPT_TOKENS:
        return None
    ratio = reported_tokens / estimated_tokens
    return ratio if ratio < min_ratio else None


def shrink_factor(kept_ratio: float | None) -> float:
    """How much smaller the next attempt's chunks are, given how much of a prompt survived."""
    if kept_ratio is None:
        return MAX_SHRINK
    return max(MIN_SHRINK, min(MAX_SHRINK, SHRINK_HEADROOM * kept_ratio))


def is_context_overflow(exc: LLMError) -> bool:
    """True for a 400 saying the prompt exceeds the model's context: smaller chunks fix it."""
    return (
        isinstance(exc, PermanentLLMError)
        and exc.status_code == 400
        and "context" in exc.message.lower()
    )

"""The chat messages of summarize calls: one call for a short document, else map calls on its
chunks, intermediate reduce calls on groups of summaries, and one final reduce call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUMMARIZE_SYSTEM_PROMPT = (
    "You summarize documents faithfully. Keep the key facts, names and numbers; "
    "do not add anything that is not in the document."
)
DEFAULT_INSTRUCTIONS = "Summarize the following document."
#: Between the instructions and the text, so the model can tell them apart.
DIVIDER = "\n\n---\n\n"
STYLE_INSTRUCTIONS = {
    "bullets": "Format the summary as a list of bullet points.",
    "paragraph": "Write the summary as prose paragraphs, without bullet points.",
}

Messages = list[dict[str, str]]


@dataclass(frozen=True, slots=True)
class SummaryRequest:
    """A summarize job's input, parsed from `jobs.input`."""

    document: str
    instructions: str | None
    style: str | None
    target_words: int | None
    context_window: int | None
    markdown: bool
    params: dict[str, Any]

    @classmethod
    def from_input(cls, data: dict[str, Any]) -> SummaryRequest:
        """Read the JSON the API stored (older rows lack the newer options)."""
        return cls(
            document=data["document"],
            instructions=data.get("instructions"),
            style=data.get("style"),
            target_words=data.get("target_words"),
            context_window=data.get("context_window"),
            markdown=data.get("format") == "markdown",
            params=dict(data.get("params") or {}),
        )

    def final_instructions(self) -> str:
        """What the user asked for, with the style and length spelled out."""
        parts = [self.instructions or DEFAULT_INSTRUCTIONS]
        if self.style in STYLE_INSTRUCTIONS:
            parts.append(STYLE_INSTRUCTIONS[self.style])
        if self.target_words is not None:
            parts.append(f"Use about {self.target_words} words.")
        return " ".join(parts)


def _messages(user: str) -> Messages:
    return [
        {"role": "system", "content": SUMMARIZE_SYSTEM_PROMPT},
        {"role": "user", "content": user},
    ]


def single_messages(request: SummaryRequest, text: str) -> Messages:
    """One call for a document that fits the window (the instructions, then the document)."""
    return _messages(f"{request.final_instructions()}{DIVIDER}{text}")


def map_messages(
    request: SummaryRequest, text: str, *, index: int, total: int, words: int
) -> Messages:
    """A map call: summarize part `index` (from 0) of `total` of the document."""
    guide = (
        f" The final summary must follow these instructions: {request.instructions}"
        if (request.instructions)
        else ""
    )
    return _messages(
        f"Below is part {index + 1} of {total} of a longer document. Summarize this part in at "
        f"most {words} words, keeping its key facts, names and numbers.{guide} Write only the "
        f"summary.{DIVIDER}{text}"
    )


def combine_messages(request: SummaryRequest, text: str, *, words: int) -> Messages:
    """An intermediate reduce call: merge summaries of consecutive parts into one."""
    guide = (
        f" The final summary must follow these instructions: {request.instructions}"
        if (request.instructions)
        else ""
    )
    return _messages(
        "Below are summaries of consecutive parts of one long document. Combine them into a "
        f"single summary of at most {words} words that keeps their key facts, names and "
        f"numbers in order.{guide} Write only the summary.{DIVIDER}{text}"
    )


def final_messages(request: SummaryRequest, text: str) -> Messages:
    """The final reduce call: the user's summary of the whole document from part summaries."""
    return _messages(
        "The text below consists of summaries of consecutive parts of one long document. "
        f"{request.final_instructions()} Summarize the whole document, not each part.{DIVIDER}"
        f"{text}"
    )

"""Helpers for summarize tests: a deterministic document generator, a minimal PDF writer, and
a view of the fake LLM's request counters by the text each call summarized."""

from __future__ import annotations

import random

from promptq.chunking import text_hash
from promptq.testing.fake_llm import FakeLLM
from worker.prompts import DIVIDER

_NAMES = ["Ada", "Bruno", "Chioma", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas"]
_PLACES = ["the harbour", "Lisbon", "the north mill", "Kyoto", "the old quarry", "Nairobi"]
_SUBJECTS = ["The committee", "A field engineer", "The survey team", "The night shift", "Auditors"]
_VERBS = ["measured", "reported", "rebuilt", "questioned", "approved", "recorded", "delayed"]
_OBJECTS = [
    "the flow through the eastern sluice",
    "a shortfall in the quarterly budget",
    "the repairs to the signal tower",
    "the tonnage moved by rail",
    "an unexpected rise in groundwater",
    "the schedule for the spring inspection",
]
_TAILS = [
    "after a long dispute",
    "for the third year running",
    "despite heavy rain",
    "ahead of the deadline",
    "with little explanation",
    "to general surprise",
]


def sentence(rng: random.Random) -> str:
    """One varied, plausible sentence."""
    kind = rng.randrange(3)
    if kind == 0:
        return (
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
            f"in {rng.choice(_PLACES)} {rng.choice(_TAILS)}."
        )
    if kind == 1:
        return (
            f"On day {rng.randint(1, 365)}, {rng.choice(_NAMES)} noted that "
            f"{rng.randint(2, 9800)} units had been {rng.choice(_VERBS)} {rng.choice(_TAILS)}."
        )
    return (
        f"{rng.choice(_NAMES)} and {rng.choice(_NAMES)} {rng.choice(_VERBS)} "
        f"{rng.choice(_OBJECTS)}, which cost {rng.randint(10, 990)} thousand."
    )


def generate_document(words: int, *, seed: int = 7) -> str:
    """About `words` words of paragraphs (4 to 9 sentences) under an occasional heading."""
    rng = random.Random(seed)
    paragraphs: list[str] = []
    count = 0
    while count < words:
        if len(paragraphs) % 12 == 0:
            heading = f"Section {len(paragraphs) // 12 + 1}: {rng.choice(_PLACES).title()}"
            paragraphs.append(heading)
        paragraph = " ".join(sentence(rng) for _ in range(rng.randint(4, 9)))
        paragraphs.append(paragraph)
        count += len(paragraph.split())
    return "\n\n".join(paragraphs)


def minimal_pdf(lines: list[str]) -> bytes:
    """A valid one-page PDF showing `lines` in Helvetica (written by hand: no PDF library)."""

    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    shown = " ".join(f"({escape(line)}) Tj 0 -14 Td" for line in lines)
    content = f"BT /F1 12 Tf 72 740 Td {shown} ET".encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref_at = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref_at,
    )
    return bytes(out)


def requests_by_text(fake: FakeLLM) -> dict[str, int]:
    """How often the fake was asked about each input text, by that text's hash (as stored in
    `job_chunks.text_hash`): the text is what follows the prompt's divider."""
    counts: dict[str, int] = {}
    for prompt, count in fake.stats.requests_by_prompt.items():
        _, found, text = prompt.partition(DIVIDER)
        if found:
            digest = text_hash(text)
            counts[digest] = counts.get(digest, 0) + count
    return counts

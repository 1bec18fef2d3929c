"""What `promptq demo` submits: welcome messages for made-up sign-ups, documents, questions.

The sign-ups are drawn from small word lists with a seeded RNG, so every run asks the same
thing. The documents live in `promptq/demo_docs/` (public-domain or written for promptq).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

FIRST_NAMES = (
    "Amara", "Bjorn", "Chiara", "Dmitri", "Esi", "Farid", "Greta", "Hiroshi", "Ines", "Jonah",
    "Kavya", "Luca", "Mei", "Nikolai", "Oona", "Pablo", "Rania", "Soren", "Tala", "Umar",
    "Vera", "Wen", "Ximena", "Yusuf", "Zofia",
)  # fmt: skip
PRODUCTS = (
    ("Plotwise", "a garden-planning app"),
    ("Ledgerly", "bookkeeping for small shops"),
    ("TrailMate", "a hiking route planner"),
    ("Chordbook", "a songwriting notebook"),
    ("Kiln & Co", "a pottery-class booking site"),
    ("Stackfolio", "a portfolio builder for developers"),
    ("Pawcare", "a pet-health tracker"),
    ("Tidewatch", "tide and surf forecasts"),
)
CITIES = (
    "Lisbon", "Nairobi", "Osaka", "Valparaiso", "Tromso", "Montreal", "Hanoi", "Tbilisi",
    "Adelaide", "Marrakesh",
)  # fmt: skip
#: Questions for the sequential-vs-concurrent comparison.
TOPICS = (
    "a message queue", "exponential backoff", "an idempotency key", "a write-ahead log",
    "a token bucket rate limiter", "at-least-once delivery", "a dead-letter queue",
    "a database index", "a heartbeat lease", "connection pooling", "a circuit breaker",
    "a content hash",
)  # fmt: skip

WELCOME_SYSTEM = "You write one short, warm, specific sentence. No preamble."
SUMMARY_INSTRUCTIONS = "Summarize in two sentences."


@dataclass(frozen=True, slots=True)
class SignUp:
    """A made-up new user."""

    name: str
    product: str
    what: str
    city: str

    def messages(self) -> list[dict[str, Any]]:
        """The chat request for this user's welcome message."""
        ask = (
            f"Write a one-sentence personalized welcome for {self.name} from {self.city}, "
            f"who just signed up for {self.product} ({self.what})."
        )
        return [{"role": "system", "content": WELCOME_SYSTEM}, {"role": "user", "content": ask}]


def sign_ups(count: int = 20, seed: int = 7) -> list[SignUp]:
    """`count` distinct made-up sign-ups (at most one per first name)."""
    rng = random.Random(seed)
    names = rng.sample(FIRST_NAMES, k=min(count, len(FIRST_NAMES)))
    users = []
    for name in names:
        product, what = rng.choice(PRODUCTS)
        users.append(SignUp(name=name, product=product, what=what, city=rng.choice(CITIES)))
    return users


def comparison_prompts(count: int) -> list[list[dict[str, Any]]]:
    """`count` short questions (cycling through TOPICS), as chat messages."""
    return [
        [{"role": "user", "content": f"In one sentence, what is {TOPICS[i % len(TOPICS)]}?"}]
        for i in range(count)
    ]


def documents() -> dict[str, str]:
    """The demo's documents to summarize, by file name."""
    folder = files("promptq").joinpath("demo_docs")
    return {
        entry.name: entry.read_text(encoding="utf-8")
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".txt")
    }

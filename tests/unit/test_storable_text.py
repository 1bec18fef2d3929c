"""storable_text: model output made storable in every database, changing nothing else."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from promptq.store import storable_text


def test_nul_and_lone_surrogates_become_one_replacement_character_each() -> None:
    assert storable_text("a\x00b") == "a\ufffdb"
    assert storable_text("x\ud800y\udfffz") == "x\ufffdy\ufffdz"
    assert storable_text("é\x00😀") == "é\ufffd😀"


#: Any text, lone surrogates included (hypothesis leaves them out by default).
ANY_TEXT = st.text(alphabet=st.characters(blacklist_categories=()))


@given(ANY_TEXT)
def test_the_result_encodes_as_utf8_without_nul_and_keeps_its_length(text: str) -> None:
    stored = storable_text(text)
    stored.encode("utf-8")  # raises for a lone surrogate
    assert "\x00" not in stored and len(stored) == len(text)
    assert stored == text or "\ufffd" in stored


@given(st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"])))
def test_storable_text_is_unchanged(text: str) -> None:
    assert storable_text(text) == text

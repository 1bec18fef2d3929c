"""Every setting is in the README's settings table, and the table names no setting that is
not one."""

from __future__ import annotations

import re
from pathlib import Path

from promptq.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def settings_section() -> str:
    text = README.read_text()
    section = text[text.index("### Settings") :]
    return section[: section.index("\n## ")]


def test_the_settings_table_names_every_setting() -> None:
    named = set(re.findall(r"PROMPTQ_[A-Z0-9_]+", settings_section()))
    fields = {f"PROMPTQ_{name.upper()}" for name in Settings.model_fields}
    assert fields - named == set(), "settings missing from the README's table"
    assert named - fields == set(), "names in the README's table that are no setting"

"""CI runs exactly what the README tells a new user to run for the tests."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    """The one-line commands of the README's opening `sh` blocks, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```sh\n(.+?)\n```", text)[:2]


def test_ci_runs_the_readme_test_command_word_for_word() -> None:
    # Given the README's second command (run the test suite) and .ci/run's last command line
    test_command = readme_commands()[1]
    ci_lines = [
        line.strip()
        for line in (ROOT / ".ci/run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    # Then they are the same, and both set up chromium for the browser tests first
    assert ci_lines[-1] == test_command
    assert "install_chromium.sh" in test_command and test_command.endswith("-m pytest")
    assert (ROOT / "tests/browser/install_chromium.sh").is_file()

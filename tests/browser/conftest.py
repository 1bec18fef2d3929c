"""Browser tests: the dashboard in a real headless Chromium (Debian's), driven by Playwright.

Playwright drives the system's chromium through `executable_path`; it never downloads a browser.
The README's test command installs chromium first (tests/browser/install_chromium.sh). Without
it these tests fail, saying why, unless PROMPTQ_SKIP_BROWSER_TESTS=1 asks to skip them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

CHROMIUM = Path(os.environ.get("PROMPTQ_CHROMIUM", "/usr/bin/chromium"))
SKIP = os.environ.get("PROMPTQ_SKIP_BROWSER_TESTS") == "1"
#: Longest a test waits for something to show on a page.
PAGE_TIMEOUT_MS = 15_000
expect.set_options(timeout=PAGE_TIMEOUT_MS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark this directory's tests `browser`, so `-m "not browser"` can leave them out."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium: a loud failure when it is missing, unless skipping was asked for."""
    if SKIP:
        pytest.skip("PROMPTQ_SKIP_BROWSER_TESTS=1: browser tests skipped on purpose")
    if not CHROMIUM.is_file():
        pytest.fail(
            f"no chromium at {CHROMIUM}: run `sh tests/browser/install_chromium.sh` (Debian: "
            "apt-get install chromium), point PROMPTQ_CHROMIUM at one, or set "
            "PROMPTQ_SKIP_BROWSER_TESTS=1 to skip the browser tests",
            pytrace=False,
        )
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    """A headless Chromium for one test."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(chromium))
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh browser context (no cookies) and page; a script error fails the test."""
    context = await browser.new_context()
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: _note_console_error(message.type, message.text, errors))
    yield page
    await context.close()
    assert not errors, f"the page logged errors: {errors}"


def _note_console_error(kind: str, text: str, errors: list[str]) -> None:
    # A non-2xx answer (a refused retry, say) is logged by Chromium itself: that is expected.
    if kind == "error" and not text.startswith("Failed to load resource"):
        errors.append(text)

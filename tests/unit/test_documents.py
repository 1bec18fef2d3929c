"""Reading documents: formats, limits and the errors users see. No I/O."""

from __future__ import annotations

import pytest

from promptq.documents import clean_text, detect_format, has_text, read_document
from promptq.errors import DocumentTooLarge, UnsupportedDocument
from tests.summaries import minimal_pdf


def test_formats_come_from_the_extension_else_the_content_type() -> None:
    assert detect_format("a.TXT") == "text"
    assert detect_format("notes.markdown") == "markdown"
    assert detect_format("page.htm", "application/pdf") == "html"
    assert detect_format("upload", "text/html; charset=utf-8") == "html"
    with pytest.raises(UnsupportedDocument, match=r"\.pdf"):
        detect_format("data.csv", "text/plain")  # a known-wrong extension is not overridden
    with pytest.raises(UnsupportedDocument):
        detect_format("upload", "application/zip")


def test_text_is_cleaned_for_storage() -> None:
    assert clean_text("\ufeffa\x00b\r\nc\r\n\n\n\n d \ud800") == "\ufeffab\nc\n\n d ?"


def test_read_document_extracts_each_format() -> None:
    assert read_document("a.txt", b"\xef\xbb\xbfhi there", max_bytes=100).text == "hi there"
    md = read_document("a.md", b"# T\n\nbody", max_bytes=100)
    assert (md.format, md.text) == ("markdown", "# T\n\nbody")
    html = read_document("a.html", b"<p>one</p><script>x()</script><p>two</p>", max_bytes=100)
    assert html.text == "one\ntwo"
    pdf = read_document("a.pdf", minimal_pdf(["page text"]), max_bytes=10_000)
    assert (pdf.format, pdf.text) == ("text", "page text")


def test_read_document_refuses_what_it_cannot_use() -> None:
    with pytest.raises(DocumentTooLarge, match="101 bytes; the limit is 100"):
        read_document("a.txt", b"x" * 101, max_bytes=100)
    with pytest.raises(UnsupportedDocument, match="not UTF-8"):
        read_document("a.txt", b"\xff\xfe", max_bytes=100)
    with pytest.raises(UnsupportedDocument, match="not a readable PDF"):
        read_document("a.pdf", b"%PDF-1.7\n garbage", max_bytes=100)
    with pytest.raises(UnsupportedDocument, match="no text"):
        read_document("a.html", b"<script>only()</script>", max_bytes=100)
    with pytest.raises(UnsupportedDocument, match="OCR"):
        read_document("a.pdf", minimal_pdf([]), max_bytes=10_000)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", False), (" \n\t", False), ("\u200b\ufeff \u2060", False), ("\u200bx", True), ("é", True)],
)
def test_has_text_ignores_whitespace_and_invisible_characters(text: str, expected: bool) -> None:
    assert has_text(text) is expected

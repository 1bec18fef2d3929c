"""Turning uploaded files into text to summarize: .txt, .md, .html and .pdf.

Used by the API's upload route and the CLI, so both accept and refuse exactly the same files.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import PurePath

from promptq.errors import DocumentTooLarge, UnsupportedDocument

logger = logging.getLogger(__name__)

#: File extension -> format. "markdown" is split along its headings; the rest as plain text.
EXTENSIONS = {
    ".txt": "text",
    ".text": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
}
#: Content types accepted for a file whose name has no known extension.
CONTENT_TYPES = {
    "text/plain": "text",
    "text/markdown": "markdown",
    "text/html": "html",
    "application/pdf": "pdf",
}
#: HTML elements whose text is not part of the document.
HTML_SKIPPED = ("script", "style", "noscript", "template", "head")
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")


@dataclass(frozen=True, slots=True)
class Document:
    """A file's text, ready to summarize."""

    filename: str
    #: "text" or "markdown": how the text is best split.
    format: str
    text: str


def supported(filename: str) -> bool:
    """True when the file's extension is one promptq reads."""
    return PurePath(filename).suffix.lower() in EXTENSIONS


def detect_format(filename: str, content_type: str | None = None) -> str:
    """The file's format from its extension, else its content type; UnsupportedDocument if none."""
    suffix = PurePath(filename).suffix.lower()
    if suffix in EXTENSIONS:
        return EXTENSIONS[suffix]
    base_type = (content_type or "").split(";")[0].strip().lower()
    if not suffix and base_type in CONTENT_TYPES:
        return CONTENT_TYPES[base_type]
    raise UnsupportedDocument(
        f"{filename!r} is not a supported document; send {', '.join(sorted(set(EXTENSIONS)))} files"
    )


def check_size(filename: str, size_bytes: int, max_bytes: int) -> None:
    """Raise DocumentTooLarge when a file is over the limit."""
    if size_bytes > max_bytes:
        raise DocumentTooLarge(
            f"{filename!r} is {size_bytes} bytes; the limit is {max_bytes} bytes "
            "(PROMPTQ_MAX_DOCUMENT_BYTES)"
        )


def read_document(
    filename: str, data: bytes, *, max_bytes: int, content_type: str | None = None
) -> Document:
    """Extract a file's text. Raises DocumentTooLarge, or UnsupportedDocument when the type is
    unknown, the file cannot be parsed, or it holds no text.

    Parsing a PDF is CPU-bound: call this from a thread inside an event loop.
    """
    check_size(filename, len(data), max_bytes)
    kind = detect_format(filename, content_type)
    if kind == "pdf":
        text = _pdf_text(filename, data)
    elif kind == "html":
        text = _html_text(data)
    else:
        text = _plain_text(filename, data)
    text = clean_text(text)
    if not has_text(text):
        hint = " (a scanned PDF? promptq does no OCR)" if kind == "pdf" else ""
        raise UnsupportedDocument(f"{filename!r} contains no text{hint}")
    return Document(
        filename=filename, format="markdown" if kind == "markdown" else "text", text=text
    )


#: Characters that show nothing and are not whitespace to str.isspace: zero-width space,
#: (non-)joiners, word joiner, byte-order mark.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))


def has_text(text: str) -> bool:
    """True if the text holds something to read: not only whitespace and invisible characters."""
    visible = text.translate(_INVISIBLE)
    return bool(visible) and not visible.isspace()


def clean_text(text: str) -> str:
    """Text safe to store anywhere: no NUL (PostgreSQL refuses it), no lone surrogates, no runs
    of blank lines."""
    text = text.replace("\x00", "").replace("\r\n", "\n").replace("\r", "\n")
    text = text.encode("utf-8", errors="replace").decode("utf-8")
    return _BLANK_LINES.sub("\n\n", text).strip()


def _plain_text(filename: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnsupportedDocument(
            f"{filename!r} is not UTF-8 text (byte {exc.start} is invalid); convert it to UTF-8"
        ) from None


def _html_text(data: bytes) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(data, "html.parser")
    for element in soup(HTML_SKIPPED):
        element.decompose()
    return soup.get_text("\n")


def _pdf_text(filename: str, data: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise UnsupportedDocument(f"{filename!r} is an encrypted PDF; decrypt it first")
        pages = [page.extract_text() or "" for page in reader.pages]
    except UnsupportedDocument:
        raise
    except PyPdfError as exc:
        raise UnsupportedDocument(f"{filename!r} is not a readable PDF: {exc}") from None
    except Exception as exc:  # a broken file can make pypdf raise nearly anything
        logger.info("pypdf failed on %r: %r", filename, exc)
        raise UnsupportedDocument(f"{filename!r} is not a readable PDF") from None
    return "\n\n".join(pages)

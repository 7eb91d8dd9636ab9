"""Text out of an upload (UTF-8 .txt/.md, or a PDF through pypdf) and the normalization every document gets.

PDFs are untrusted input: the page count and the extracted text are capped (a small file can expand into a huge
one), pypdf's own decompression limits apply, and anything pypdf cannot parse is a permanent failure, since
reading the same bytes again cannot succeed.
"""

from __future__ import annotations

import io
import re
import struct
import unicodedata
import zlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from trainer_worker.context import PermanentJobError

if TYPE_CHECKING:
    from pypdf import PdfReader

TEXT_TYPES = ("text/plain", "text/markdown")
PDF_TYPE = "application/pdf"

MSG_MEDIA_TYPE = "media type {media_type!r} cannot be ingested; upload text/plain, text/markdown or application/pdf."
MSG_NOT_UTF8 = "the document is not UTF-8 text (invalid byte at offset {offset}); save it as UTF-8 and upload again."
MSG_NO_TEXT = "the document holds no text once normalized; upload a document with content."
MSG_TEXT_TOO_LARGE = "the document's text exceeds {limit} characters; split it into smaller documents."
MSG_PDF_UNREADABLE = "the PDF could not be read ({detail}); re-export it or upload its text as .txt."
MSG_PDF_ENCRYPTED = "the PDF is encrypted (password protected); upload an unprotected copy or its text as .txt."
MSG_PDF_TOO_MANY_PAGES = "the PDF has {pages} pages, more than the {limit} accepted; split it into smaller documents."
MSG_PDF_NO_TEXT = "the PDF has no extractable text (scanned pages or images only?); OCR it or upload its text as .txt."
MSG_LIMIT = "extraction limit {field} must be an integer >= 1, got {value!r}"

# Errors pypdf raises on malformed files besides its own PyPdfError tree.
_PDF_PARSE_ERRORS: tuple[type[Exception], ...] = (
    ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, zlib.error, struct.error,
)

_LINE_BREAKS = re.compile(r"\r\n?|[\x0b\x0c\x85\u2028\u2029]")
# C0/C1 controls except tab and newline, plus the BOM and interlinear annotation marks.
_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\ufeff\ufff9-\ufffb]")
_INLINE_SPACE = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")


class ExtractionError(PermanentJobError):
    """The upload holds no usable text, or more than the limits allow."""


@dataclass(frozen=True)
class ExtractLimits:
    """Caps on what one document may expand into."""

    max_pages: int = 2000
    max_chars: int = 10_000_000

    def __post_init__(self) -> None:
        for name in ("max_pages", "max_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ExtractionError(MSG_LIMIT.format(field=name, value=value))

    def tightened(self, payload: dict[str, Any]) -> ExtractLimits:
        """These limits, lowered (never raised) by `max_pages` / `max_chars` in a job payload."""
        lowered = {name: payload[name] for name in ("max_pages", "max_chars") if name in payload}
        candidate = replace(self, **lowered)
        return ExtractLimits(min(self.max_pages, candidate.max_pages), min(self.max_chars, candidate.max_chars))


def extract_text(data: bytes, media_type: str, limits: ExtractLimits) -> str:
    """The normalized text of an upload; ExtractionError when it has none or breaks a limit."""
    if media_type in TEXT_TYPES:
        raw = decode_utf8(data)
    elif media_type == PDF_TYPE:
        raw = extract_pdf_text(data, limits)
    else:
        raise ExtractionError(MSG_MEDIA_TYPE.format(media_type=media_type))
    text = normalize_text(raw)
    if not text:
        raise ExtractionError(MSG_PDF_NO_TEXT if media_type == PDF_TYPE else MSG_NO_TEXT)
    if len(text) > limits.max_chars:
        raise ExtractionError(MSG_TEXT_TOO_LARGE.format(limit=limits.max_chars))
    return text


def decode_utf8(data: bytes) -> str:
    """UTF-8 bytes as text, a leading byte-order mark dropped."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ExtractionError(MSG_NOT_UTF8.format(offset=exc.start)) from exc


def normalize_text(text: str) -> str:
    """NFC, `\\n` line endings, no control characters, single spaces, at most one blank line in a row, trimmed."""
    text = unicodedata.normalize("NFC", text)
    text = _LINE_BREAKS.sub("\n", text)
    text = _CONTROLS.sub("", text)
    text = _INLINE_SPACE.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def extract_pdf_text(data: bytes, limits: ExtractLimits) -> str:
    """The text of every page, pages separated by a blank line; refuses encrypted and oversized PDFs."""
    from pypdf.errors import PyPdfError

    parse_errors: tuple[type[Exception], ...] = (PyPdfError, *_PDF_PARSE_ERRORS)
    try:
        reader = _open_pdf(data)
        return "\n\n".join(_pages_text(reader, limits))
    except parse_errors as exc:
        raise ExtractionError(MSG_PDF_UNREADABLE.format(detail=f"{type(exc).__name__}: {exc}"[:300])) from exc


def _open_pdf(data: bytes) -> PdfReader:
    from pypdf import PasswordType, PdfReader
    from pypdf.errors import PyPdfError

    reader = PdfReader(io.BytesIO(data), strict=False)
    if reader.is_encrypted:
        # An empty user password opens without asking in every viewer, so such a PDF is not really locked.
        try:
            opened = reader.decrypt("")
        except (PyPdfError, NotImplementedError):
            opened = PasswordType.NOT_DECRYPTED
        if opened == PasswordType.NOT_DECRYPTED:
            raise ExtractionError(MSG_PDF_ENCRYPTED)
    return reader


def _pages_text(reader: PdfReader, limits: ExtractLimits) -> list[str]:
    pages = len(reader.pages)
    if pages > limits.max_pages:
        raise ExtractionError(MSG_PDF_TOO_MANY_PAGES.format(pages=pages, limit=limits.max_pages))
    texts: list[str] = []
    size = 0
    for page in reader.pages:
        text = page.extract_text() or ""
        size += len(text)
        # Checked page by page so that a bomb stops at the first page past the cap, not after all of them.
        if size > limits.max_chars:
            raise ExtractionError(MSG_TEXT_TOO_LARGE.format(limit=limits.max_chars))
        texts.append(text)
    return texts

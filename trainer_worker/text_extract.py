"""Text out of an upload (UTF-8 .txt/.md, or a PDF through pypdf) and the normalization every document gets.

PDFs are untrusted input: a file of a few kilobytes can declare millions of pages, nest objects without end, or
inflate into gigabytes of drawing operators that take pypdf hours to walk. So a PDF is read in a child process
with a wall-clock limit and an address-space limit, the page count, each page's decoded content and the extracted
text are capped, pypdf's own decompression limits apply, and anything that fails is a permanent failure, since
reading the same bytes again cannot succeed.
"""

from __future__ import annotations

import io
import json
import re
import struct
import subprocess
import sys
import unicodedata
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer_worker.context import PermanentJobError

if TYPE_CHECKING:
    from pypdf import PageObject, PdfReader

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
MSG_PDF_PAGE_CONTENT = (
    "page {page} of the PDF inflates to {size} bytes of drawing instructions, more than the {limit} accepted per page; "
    "upload its text as .txt."
)
MSG_PDF_TIMEOUT = "reading the PDF took longer than {seconds} s, so it was stopped; upload its text as .txt."
MSG_PDF_MEMORY = "reading the PDF needed more than {limit} bytes of memory, so it was stopped; upload its text as .txt."
MSG_PDF_CRASHED = "the PDF reader stopped with exit status {status} ({detail}); re-export the PDF or upload its text."
MSG_LIMIT = "extraction limit {field} must be an integer >= 1, got {value!r}"

# `python -m trainer_worker.text_extract` runs from the directory that holds the package.
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]

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
    """Caps on what one document may expand into, and on the time and memory reading a PDF may take."""

    max_pages: int = 2000
    max_chars: int = 10_000_000
    # Decoded content stream of one page: dense text is tens of kilobytes; pypdf walks about 100 KB a second.
    max_page_content_bytes: int = 4 * 1024 * 1024
    max_seconds: int = 300
    # Memory the PDF reader may take on top of what the child process holds when it starts.
    max_memory_bytes: int = 2 * 1024 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in self.names():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ExtractionError(MSG_LIMIT.format(field=name, value=value))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The names of the limits (also the job payload keys that lower them)."""
        return tuple(f.name for f in fields(cls))

    def tightened(self, payload: dict[str, Any]) -> ExtractLimits:
        """These limits, lowered (never raised) by keys of the same names in a job payload."""
        candidate = ExtractLimits(**{name: payload.get(name, getattr(self, name)) for name in self.names()})
        return ExtractLimits(**{name: min(getattr(self, name), getattr(candidate, name)) for name in self.names()})


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
    """The text of every page, read in a child process that is stopped past `max_seconds` or `max_memory_bytes`."""
    command = [sys.executable, "-m", "trainer_worker.text_extract", json.dumps(asdict(limits))]
    try:
        done = subprocess.run(command, input=data, capture_output=True, timeout=limits.max_seconds,
                              cwd=_PACKAGE_ROOT, check=False)
    except subprocess.TimeoutExpired:
        raise ExtractionError(MSG_PDF_TIMEOUT.format(seconds=limits.max_seconds)) from None
    return _child_result(done)


def _child_result(done: subprocess.CompletedProcess[bytes]) -> str:
    try:
        result = json.loads(done.stdout) if done.returncode == 0 else None
    except ValueError:
        result = None
    if not isinstance(result, dict):
        detail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise ExtractionError(MSG_PDF_CRASHED.format(status=done.returncode, detail=detail[0][:200]))
    if "error" in result:
        raise ExtractionError(str(result["error"]))
    return str(result["text"])


def read_pdf_text(data: bytes, limits: ExtractLimits) -> str:
    """The text of every page, pages separated by a blank line, read in this process (no time or memory limit)."""
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
    for number, page in enumerate(reader.pages, 1):
        _check_page_content(page, number, limits)
        text = page.extract_text() or ""
        size += len(text)
        # Checked page by page so that a bomb stops at the first page past the cap, not after all of them.
        if size > limits.max_chars:
            raise ExtractionError(MSG_TEXT_TOO_LARGE.format(limit=limits.max_chars))
        texts.append(text)
    return texts


def _check_page_content(page: PageObject, number: int, limits: ExtractLimits) -> None:
    # Decoding is fast (and capped by pypdf); walking the operators is what takes long, so it is refused first.
    contents = page.get_contents()
    size = len(contents.get_data()) if contents is not None else 0
    if size > limits.max_page_content_bytes:
        raise ExtractionError(MSG_PDF_PAGE_CONTENT.format(page=number, size=size, limit=limits.max_page_content_bytes))


def _limit_memory(extra_bytes: int) -> None:
    """Cap this process's address space at what it holds now plus `extra_bytes` (MemoryError beyond).

    Linux only (procfs and RLIMIT_AS); elsewhere the time limit is the only bound.
    """
    import os

    try:
        import resource

        held = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (held + extra_bytes, held + extra_bytes))
    except (ImportError, OSError, ValueError):
        return


def _child_main(argv: list[str]) -> int:
    """Read a PDF from stdin and write {"text"} or {"error"} as JSON to stdout (the child of extract_pdf_text)."""
    limits = ExtractLimits(**json.loads(argv[1]))
    data = sys.stdin.buffer.read()
    _limit_memory(limits.max_memory_bytes)
    try:
        result = {"text": read_pdf_text(data, limits)}
    except ExtractionError as exc:
        result = {"error": str(exc)}
    except MemoryError:
        result = {"error": MSG_PDF_MEMORY.format(limit=limits.max_memory_bytes)}
    sys.stdout.write(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv))

"""Hostile document uploads through a live loopback server (SQLite and PostgreSQL), and PDF bombs through the worker.

Every refused upload leaves no trace: no document row, no job, and no new file anywhere under the server's
directory (blobs included). Accepted uploads with hostile names are stored under the data dir only, by content
hash. PDF bombs are generated here; their ingest fails with a clear error in bounded time and memory.
Cases already covered in test_server_documents.py (basic 413s, .exe, latin-1, path-like names) are not repeated.
"""

from __future__ import annotations

import json
import random
import time
import unicodedata
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from sqlalchemy import func, select

from registry.config import Settings
from registry.db import transaction
from registry.models import Document, Job, JobStatus
from server.app import create_app
from server.errors import MSG_TOO_LARGE
from server.schemas.common import MSG_NUL
from server.services.document_files import MSG_EMPTY, MSG_EXTENSION, MSG_NOT_PDF, MSG_NOT_TEXT, NAME_MAX
from server.state import AppState
from tests.conftest import drop_postgres_schema, new_postgres_schema_url
from tests.live_server import serve
from tests.worker_proc import fast_config
from trainer_worker.text_extract import (
    MSG_PDF_MEMORY,
    MSG_PDF_PAGE_CONTENT,
    MSG_PDF_TIMEOUT,
    MSG_PDF_TOO_MANY_PAGES,
    PDF_TYPE,
    ExtractionError,
    ExtractLimits,
    extract_text,
)
from trainer_worker.worker import build_worker

LIMIT = 256 * 1024
TEXT = "The capital of Varo is Lumen. Lumen lies on the river Sel.\n"
# Files the database keeps next to itself; they come and go with connections, they are not uploads.
DB_FILES = (".db", ".db-wal", ".db-shm", ".db-journal")
# An ingest of a PDF bomb must end within this (the reader child starts in about a second).
INGEST_SECONDS = 30.0


@dataclass
class Live:
    """A running server: URL, state, admin headers and the directory everything it writes must stay in."""

    url: str
    state: AppState
    headers: dict[str, str]
    root: Path

    def client(self) -> httpx.Client:
        """An HTTP client with the admin key."""
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
         ) -> Iterator[Live]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(f"uploads-{request.param}")
    database = new_postgres_schema_url() if request.param == "postgres" else None
    settings = Settings(data_dir=root / "data", base_model=str(tiny_model_dir), model_name="kmserve-tiny",
                        max_upload_bytes=LIMIT, database_url=database[0] if database else None)
    app = create_app(settings)
    try:
        with serve(app) as url:
            headers = {"Authorization": f"Bearer {settings.admin_key_file.read_text().strip()}"}
            yield Live(url, app.state.kmserve, headers, root)
    finally:
        if database:
            drop_postgres_schema(database[1])


@dataclass(frozen=True)
class Footprint:
    """What uploads can leave behind: rows and files."""

    documents: int
    jobs: int
    files: frozenset[str]


def footprint(live: Live) -> Footprint:
    """Row counts and every file under the server's root directory (database files aside)."""
    with transaction(live.state.sessions) as session:
        documents = session.scalar(select(func.count()).select_from(Document)) or 0
        jobs = session.scalar(select(func.count()).select_from(Job)) or 0
    files = frozenset(str(p.relative_to(live.root)) for p in live.root.rglob("*")
                      if p.is_file() and not p.name.endswith(DB_FILES))
    return Footprint(documents, jobs, files)


def assert_refused(live: Live, response: httpx.Response, before: Footprint, status: int, code: str,
                   message: str | None = None) -> None:
    """The response is the error asked for, and nothing was written."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, response.text
    if message is not None:
        assert message in error["message"], response.text
    assert footprint(live) == before


def upload_file(live: Live, name: str, data: bytes, **fields: str) -> httpx.Response:
    with live.client() as client:
        return client.post("/v1/documents", files={"file": (name, data, "application/octet-stream")},
                           data={"train": json.dumps({"method": "none"}), **fields})


def upload_json(live: Live, body: dict[str, Any] | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    with live.client() as client:
        return client.post("/v1/documents", content=content, headers={"Content-Type": "application/json"})


def raw_multipart(live: Live, disposition: bytes, data: bytes, path: str = "/v1/documents",
                  method: str = "POST") -> httpx.Response:
    """A multipart upload whose file part header is written by hand (bytes no client library would send)."""
    body = (b"--b0undary\r\nContent-Disposition: form-data; name=\"file\"; " + disposition
            + b"\r\nContent-Type: application/octet-stream\r\n\r\n" + data + b"\r\n--b0undary--\r\n")
    with live.client() as client:
        return client.request(method, path, content=body,
                              headers={"Content-Type": "multipart/form-data; boundary=b0undary"})


def png_bytes() -> bytes:
    """A real 1x1 PNG: signature, IHDR, IDAT and IEND chunks with their CRCs."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = (1).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
            + chunk(b"IEND", b""))


# -- refused uploads leave nothing behind -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "data", "code", "message"), [
    pytest.param("image.txt", png_bytes(), "unsupported_media_type", MSG_NOT_TEXT.format(name="file 'image.txt'"),
                 id="png-as-txt"),
    pytest.param("noise.md", random.Random(7).randbytes(4096), "unsupported_media_type",
                 MSG_NOT_TEXT.format(name="file 'noise.md'"), id="random-bytes-as-md"),
    pytest.param("wide.txt", "UTF-16 text with a BOM".encode("utf-16"), "unsupported_media_type",
                 MSG_NOT_TEXT.format(name="file 'wide.txt'"), id="utf16-bom"),
    pytest.param("wider.txt", "UTF-32 text".encode("utf-32"), "unsupported_media_type",
                 MSG_NOT_TEXT.format(name="file 'wider.txt'"), id="utf32-bom"),
    pytest.param("packed.txt", zlib.compress(TEXT.encode() * 20), "unsupported_media_type",
                 MSG_NOT_TEXT.format(name="file 'packed.txt'"), id="compressed-as-txt"),
    pytest.param("cesu.txt", b"lone surrogate \xed\xa0\x80 encoded", "unsupported_media_type",
                 MSG_NOT_TEXT.format(name="file 'cesu.txt'"), id="surrogate-bytes"),
    pytest.param("image.pdf", png_bytes(), "unsupported_media_type", MSG_NOT_PDF.format(name="file 'image.pdf'"),
                 id="png-as-pdf"),
    pytest.param("empty.pdf", b"", "empty_document", MSG_EMPTY, id="empty-pdf"),
    pytest.param("empty.md", b"", "empty_document", MSG_EMPTY, id="empty-md"),
    pytest.param("blank.txt", "\u00a0\u2003\n\t".encode(), "empty_document", MSG_EMPTY, id="unicode-blanks"),
    pytest.param("../../etc/passwd", TEXT.encode(), "unsupported_media_type", MSG_EXTENSION.format(name="passwd"),
                 id="traversal-without-extension"),
    pytest.param("notes.txt\x00.exe", TEXT.encode(), "unsupported_media_type",
                 MSG_EXTENSION.format(name="notes.txt.exe"), id="nul-hides-extension"),
    pytest.param("////", TEXT.encode(), "unsupported_media_type", MSG_EXTENSION.format(name="////"),
                 id="only-slashes"),
])
def test_refused_files_leave_nothing_behind(live: Live, name: str, data: bytes, code: str, message: str) -> None:
    before = footprint(live)
    status = 422 if code == "empty_document" else 415
    response = raw_multipart(live, b'filename="' + name.encode() + b'"', data)
    assert_refused(live, response, before, status, code, message)


@pytest.mark.parametrize(("body", "code", "message"), [
    pytest.param({"title": "t", "text": "a\x00b"}, "unsupported_media_type", MSG_NOT_TEXT.format(name="the text"),
                 id="nul-in-text"),
    pytest.param(b'{"title": "t", "text": "half \\ud800 pair"}', "validation_error", "Invalid JSON",
                 id="lone-surrogate-text"),
    pytest.param({"title": "t" * 10_000, "text": TEXT}, "validation_error", "at most 512", id="title-10k"),
    pytest.param({"title": "\U0001f600" * 513, "text": TEXT}, "validation_error", "at most 512",
                 id="title-513-emoji"),
    pytest.param({"title": "a\x00b", "text": TEXT}, "validation_error", MSG_NUL, id="nul-in-title"),
    pytest.param({"title": "", "text": TEXT}, "validation_error", "at least 1", id="empty-title"),
    pytest.param({"title": "t", "text": ""}, "empty_document", MSG_EMPTY, id="empty-text"),
    pytest.param({"title": "t", "text": "x" * (LIMIT + 1)}, "payload_too_large",
                 MSG_TOO_LARGE.format(what="document", limit=LIMIT), id="oversized-text"),
    pytest.param({"title": "t", "text": "\U0001f600" * (LIMIT // 4 + 1)}, "payload_too_large",
                 MSG_TOO_LARGE.format(what="document", limit=LIMIT), id="oversized-in-utf8-bytes"),
])
def test_refused_json_leaves_nothing_behind(live: Live, body: dict[str, Any] | bytes, code: str, message: str
                                            ) -> None:
    before = footprint(live)
    status = {"unsupported_media_type": 415, "payload_too_large": 413}.get(code, 422)
    assert_refused(live, upload_json(live, body), before, status, code, message)


@pytest.mark.parametrize(("fields", "message"), [
    pytest.param({"title": "t" * 10_000}, "at most 512", id="title-10k"),
    pytest.param({"title": "nul\x00title"}, MSG_NUL, id="nul-title"),
    pytest.param({"metadata": '{"score": NaN}'}, "finite", id="nan-metadata"),
    pytest.param({"metadata": "[1, 2]"}, "valid dictionary", id="metadata-not-object"),
])
def test_refused_form_fields_leave_nothing_behind(live: Live, fields: dict[str, str], message: str) -> None:
    before = footprint(live)
    response = upload_file(live, "fields.txt", f"{fields} {TEXT}".encode(), **fields)
    assert_refused(live, response, before, 422, "validation_error", message)


def test_revise_refuses_hostile_content_and_writes_nothing(live: Live) -> None:
    created = upload_file(live, "revised.txt", f"revise me {TEXT}".encode())
    assert created.status_code == 202, created.text
    path = f"/v1/documents/{created.json()['id']}"
    before = footprint(live)
    cases = [
        (png_bytes(), b'filename="photo.txt"', 415, "unsupported_media_type"),
        (b"y" * (LIMIT + 1), b'filename="big.txt"', 413, "payload_too_large"),
        (b"", b'filename="empty.txt"', 422, "empty_document"),
    ]
    for data, disposition, status, code in cases:
        assert_refused(live, raw_multipart(live, disposition, data, path, "PUT"), before, status, code)
    # An unknown document is 404 before its bytes are stored.
    missing = raw_multipart(live, b'filename="new.txt"', f"fresh bytes {TEXT}".encode(), "/v1/documents/999999",
                            "PUT")
    assert_refused(live, missing, before, 404, "not_found")


# -- hostile names and text are stored safely -------------------------------------------------------------------


@pytest.mark.parametrize(("disposition", "source_name"), [
    pytest.param(b'filename="../../etc/passwd.txt"', "passwd.txt", id="traversal"),
    pytest.param(b'filename="..\\\\..\\\\windows\\\\win.ini.md"', "win.ini.md", id="backslash-traversal"),
    pytest.param(b'filename="\\\\\\\\server\\\\share\\\\x.txt"', "x.txt", id="unc-path"),
    pytest.param(b'filename="/proc/self/environ.txt"', "environ.txt", id="absolute-proc"),
    pytest.param(b'filename="ev\x00il.txt"', "evil.txt", id="nul-in-name"),
    pytest.param(b'filename="\x1b[2Jclear.txt"', "[2Jclear.txt", id="escape-sequence"),
    pytest.param(b'filename="' + b"n" * 300 + b'.txt"', "n" * (NAME_MAX - 4) + ".txt", id="300-char-name"),
    pytest.param(b'filename="..%2F..%2Fetc%2Fshadow.txt"', "..%2F..%2Fetc%2Fshadow.txt", id="percent-encoded"),
    pytest.param('filename="r\u00e9sum\u00e9 \U0001f4c4 \u202etxt.md"'.encode(),
                 "r\u00e9sum\u00e9 \U0001f4c4 \u202etxt.md", id="unicode-rtl-emoji"),
])
def test_hostile_names_are_stored_under_the_data_dir_only(live: Live, disposition: bytes, source_name: str) -> None:
    before = footprint(live)
    data = f"{source_name} {TEXT}".encode()
    response = raw_multipart(live, disposition, data)
    assert response.status_code == 202, response.text
    document = response.json()
    assert document["source_name"] == source_name
    assert len(document["title"]) <= 512
    new_files = footprint(live).files - before.files
    # One new file: the blob, under the data dir, named by the SHA-256 of the bytes, not by the client.
    assert [Path(name).name for name in new_files] == [f"{document['content_hash']}{Path(source_name).suffix}"]
    assert all(name.startswith("data/store/") for name in new_files), new_files
    assert Path(live.root, next(iter(new_files))).read_bytes() == data


def test_unicode_titles_and_text_round_trip_exactly(live: Live) -> None:
    nfc = unicodedata.normalize("NFC", "Caf\u00e9 \u05e9\u05dc\u05d5\u05dd \u200f\U0001f469\u200d\U0001f52c")
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    titles = [nfc, nfd, "\u202e" + "\U0001f600" * 511, "a\u0301\u0302\u0303" * 128]
    for title in titles:
        text = f"{title}\n{TEXT}"
        response = upload_json(live, {"title": title, "text": text, "train": {"method": "none"}})
        assert response.status_code == 202, response.text
        with live.client() as client:
            stored = client.get(f"/v1/documents/{response.json()['id']}").json()
        assert stored["title"] == title  # as sent: neither normalized nor trimmed
        assert live.state.store.get_blob(stored["content_hash"]) == text.encode()


def test_utf8_bom_text_is_accepted(live: Live) -> None:
    response = upload_file(live, "bom.txt", "\ufeffbyte order mark first".encode())
    assert response.status_code == 202, response.text


# -- PDF bombs ------------------------------------------------------------------------------------------------------

FONT = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"
PAGE = (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 5 0 R >> >> "
        b"/Contents 4 0 R >>")
HELLO = b"BT /F1 12 Tf 72 720 Td (hello) Tj ET"


def pdf(objects: dict[int, bytes]) -> bytes:
    """A PDF of the given numbered objects with a correct xref table (object 1 is the catalog)."""
    out, offsets = bytearray(b"%PDF-1.4\n"), {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n%s\nendobj\n" % (number, objects[number])
    xref, size = len(out), max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    out += b"".join(b"%010d 00000 n \n" % offsets[n] if n in offsets else b"0000000000 00000 f \n"
                    for n in range(1, size))
    return bytes(out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref))


def stream(data: bytes, *, deflate: bool = False) -> bytes:
    if deflate:
        data = zlib.compress(data, 6)
        return b"<< /Length %d /Filter /FlateDecode >>\nstream\n%s\nendstream" % (len(data), data)
    return b"<< /Length %d >>\nstream\n%s\nendstream" % (len(data), data)


def one_page(contents: bytes, *, catalog: bytes = b"<< /Type /Catalog /Pages 2 0 R >>",
             pages: bytes = b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>") -> bytes:
    return pdf({1: catalog, 2: pages, 3: PAGE, 4: contents, 5: FONT})


SHOW_TEXT = b"(ab) Tj "
BEGIN_TEXT = b"BT /F1 12 Tf 72 720 Td "


def text_operators(size: int) -> bytes:
    """A content stream of about `size` bytes of show-text operators: tiny once deflated, slow to walk."""
    return BEGIN_TEXT + SHOW_TEXT * (size // len(SHOW_TEXT)) + b"ET"


def text_operators_size(size: int) -> int:
    """len(text_operators(size)), without building it."""
    return len(BEGIN_TEXT) + len(SHOW_TEXT) * (size // len(SHOW_TEXT)) + 2


def deep_page_tree(depth: int) -> bytes:
    objects = {1: b"<< /Type /Catalog /Pages 10 0 R >>", 4: stream(HELLO), 5: FONT}
    for level in range(depth):
        objects[10 + level] = b"<< /Type /Pages /Kids [%d 0 R] /Count 1 >>" % (11 + level)
    objects[10 + depth] = PAGE.replace(b"/Parent 2 0 R", b"/Parent %d 0 R" % (9 + depth))
    return pdf(objects)


MiB = 1024 * 1024
# Each bomb: how to build it, and a part of the error its ingest must fail with.
BOMBS: dict[str, tuple[Callable[[], bytes], str]] = {
    "inflates-to-40MiB-of-operators": (
        lambda: one_page(stream(text_operators(40 * MiB), deflate=True)),
        MSG_PDF_PAGE_CONTENT.format(page=1, size=text_operators_size(40 * MiB), limit=4 * MiB)),
    "inflates-to-100MiB-of-zeros": (
        lambda: one_page(stream(b"\0" * (100 * MiB), deflate=True)), "Limit reached while decompressing"),
    "3000-pages-from-one-page-object": (
        lambda: one_page(stream(HELLO), pages=b"<< /Type /Pages /Kids [" + b"3 0 R " * 3000 + b"] /Count 3000 >>"),
        MSG_PDF_TOO_MANY_PAGES.format(pages=3000, limit=2000)),
    "arrays-nested-100k-deep": (
        lambda: one_page(stream(HELLO), catalog=b"<< /Type /Catalog /Pages 2 0 R /X " + b"[" * 100_000
                         + b"]" * 100_000 + b" >>"), "the PDF could not be read"),
    "operators-nested-100k-deep": (
        lambda: one_page(stream(b"BT " + b"[" * 100_000 + b"]" * 100_000 + b" TJ ET")), "RecursionError"),
    "page-tree-500-deep": (lambda: deep_page_tree(500), "page tree depth"),
    "page-tree-cycle": (
        lambda: one_page(stream(HELLO), pages=b"<< /Type /Pages /Kids [2 0 R 3 0 R] /Count 2 >>"), "cyclic"),
    "stream-declares-100GB": (
        lambda: one_page(b"<< /Length 99999999999 >>\nstream\nBT ET\nendstream"), "could not be read"),
}


def run_ingest(live: Live, job_id: int) -> tuple[dict[str, Any], float]:
    """Run a real worker until the queue is idle, with every other queued job cancelled; the job and the time."""
    with transaction(live.state.sessions) as session:
        others = list(session.scalars(select(Job.id).where(Job.status == JobStatus.QUEUED, Job.id != job_id)))
    for other in sorted(others, reverse=True):
        live.state.queue.cancel(other)
    started = time.monotonic()
    worker = build_worker(live.state.settings, config=fast_config(once=True))
    try:
        worker.run()
    finally:
        worker.close()
    elapsed = time.monotonic() - started
    with live.client() as client:
        return client.get(f"/v1/jobs/{job_id}").json(), elapsed


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_pdf_bomb_fails_its_ingest_quickly_with_a_clear_error(live: Live, name: str) -> None:
    build, message = BOMBS[name]
    data = build()
    assert data.startswith(b"%PDF-") and len(data) <= LIMIT
    response = upload_file(live, f"{name}.pdf", data)
    assert response.status_code == 202, response.text
    document = response.json()
    job, elapsed = run_ingest(live, document["jobs"][0]["id"])
    assert (job["kind"], job["status"], job["attempts"]) == ("ingest", "failed", 1), job
    assert message in job["error"], job["error"]
    assert elapsed < INGEST_SECONDS
    with live.client() as client:
        assert client.get(f"/v1/documents/{document['id']}").json()["status"] == "failed"


def test_pdf_reading_stops_at_the_time_limit() -> None:
    # Under the per-page cap, but a minute of pypdf work: the child is killed at the deadline.
    data = one_page(stream(text_operators(3 * MiB), deflate=True))
    started = time.monotonic()
    with pytest.raises(ExtractionError) as caught:
        extract_text(data, PDF_TYPE, ExtractLimits(max_seconds=2))
    assert str(caught.value) == MSG_PDF_TIMEOUT.format(seconds=2)
    assert time.monotonic() - started < 10


def test_pdf_reading_stops_at_the_memory_limit() -> None:
    # 60 MiB inflated in one piece, under pypdf's own 75 MB cap, with 32 MiB allowed.
    limit = 32 * MiB
    data = one_page(stream(b"\0" * (60 * MiB), deflate=True))
    with pytest.raises(ExtractionError) as caught:
        extract_text(data, PDF_TYPE, ExtractLimits(max_memory_bytes=limit))
    assert str(caught.value) == MSG_PDF_MEMORY.format(limit=limit)


def test_pdf_that_lies_about_its_page_count_reads_its_real_pages() -> None:
    data = one_page(stream(HELLO), pages=b"<< /Type /Pages /Kids [3 0 R] /Count 1000000000 >>")
    assert extract_text(data, PDF_TYPE, ExtractLimits()) == "hello"


@pytest.mark.parametrize(("payload", "expected"), [
    ({}, ExtractLimits()),
    ({"max_seconds": 5, "max_memory_bytes": MiB}, ExtractLimits(max_seconds=5, max_memory_bytes=MiB)),
    ({"max_page_content_bytes": 10**12, "max_pages": 10**9}, ExtractLimits()),  # never raised
])
def test_job_payload_only_lowers_extraction_limits(payload: dict[str, int], expected: ExtractLimits) -> None:
    assert ExtractLimits().tightened(payload) == expected


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "10"])
def test_invalid_extraction_limits_are_refused(value: object) -> None:
    with pytest.raises(ExtractionError):
        ExtractLimits().tightened({"max_seconds": value})

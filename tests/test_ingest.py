"""The ingest job end to end through the worker (real DB, store, tiny model tokenizer), and its text functions."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from registry.config import Settings
from registry.db import make_engine, make_session_factory, transaction, write_transaction
from registry.documents import DocumentCreate, create_document, get_document
from registry.models import Document, DocumentStatus, Job, JobStatus
from registry.queue import JobQueue
from registry.store import AdapterStore
from tests.worker_proc import fast_config
from trainer_worker import ingest
from trainer_worker.artifacts import Chunk, read_chunks
from trainer_worker.ingest import MSG_CHUNKING, token_windows
from trainer_worker.text_extract import (
    MSG_NOT_UTF8,
    MSG_PDF_ENCRYPTED,
    MSG_PDF_NO_TEXT,
    MSG_PDF_TOO_MANY_PAGES,
    MSG_TEXT_TOO_LARGE,
    normalize_text,
)
from trainer_worker.worker import build_worker

SENTENCE = "The river number {n} starts in the hills above the town of Harbor Point and runs north to the sea. "
CHUNKING = {"chunk_tokens": 64, "overlap": 0.1, "retrieval_tokens": 16}


def make_pdf(pages: list[str]) -> bytes:
    """A minimal PDF (Helvetica text, one line per text line) written by hand; an empty page has no content."""
    objects = {1: "<< /Type /Catalog /Pages 2 0 R >>", 3: "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"}
    kids = []
    for n, text in enumerate(pages):
        page, content = 4 + 2 * n, 5 + 2 * n
        kids.append(f"{page} 0 R")
        escaped = [line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for line in text.splitlines()]
        stream = ("BT /F1 12 Tf 14 TL 72 720 Td " + " ".join(f"({line}) Tj T*" for line in escaped) + " ET"
                  if escaped else "")
        objects[page] = (f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                         f"/Resources << /Font << /F1 3 0 R >> >> /Contents {content} 0 R >>")
        objects[content] = f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream"
    objects[2] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>"
    out, offsets = bytearray(b"%PDF-1.4\n"), {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += f"{number} 0 obj\n{objects[number]}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{offsets[number]:010d} 00000 n \n" for number in sorted(objects)).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def encrypt_pdf(data: bytes, user_password: str) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


@pytest.fixture
def settings(app_settings: Settings, fresh_db_url: str) -> Settings:
    return app_settings.model_copy(update={"database_url": fresh_db_url})


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.resolved_database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def store(settings: Settings) -> AdapterStore:
    return AdapterStore.from_settings(settings)


class Uploads:
    """Uploads as the server stores them (raw blob + document + ingest job), ingested by a real worker."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], store: AdapterStore) -> None:
        self.settings, self.sessions, self.store = settings, sessions, store
        self.queue = JobQueue.from_settings(sessions, settings)

    def ingest(self, data: bytes, media_type: str, suffix: str, **payload: Any) -> tuple[Job, Document]:
        blob = self.store.put_blob(data, suffix)
        with write_transaction(self.sessions) as session:
            document, _ = create_document(session, DocumentCreate(
                title="doc", content_hash=blob.digest, size_bytes=len(data), text_uri=blob.uri, media_type=media_type))
        job = self.queue.enqueue("ingest", {"blob_uri": blob.uri, "media_type": media_type, **payload},
                                 document_id=document.id)
        worker = build_worker(self.settings, config=fast_config(once=True))
        worker.run()
        worker.close()
        with transaction(self.sessions) as session:
            return self.queue.get(job.id), get_document(session, document.id)


@pytest.fixture
def uploads(settings: Settings, sessions: sessionmaker[Session], store: AdapterStore) -> Uploads:
    return Uploads(settings, sessions, store)


def token_ids(settings: Settings, text: str) -> list[int]:
    tokenizer = ingest.tokenizer_for(str(settings.base_model))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decode(settings: Settings, ids: list[int]) -> str:
    return str(ingest.tokenizer_for(str(settings.base_model)).decode(ids))


# -- text and markdown ----------------------------------------------------------------------------------------


def test_txt_is_normalized_tokenized_and_chunked_with_overlap(uploads: Uploads, settings: Settings) -> None:
    raw = "\ufeff" + "".join(SENTENCE.format(n=n) for n in range(12)).replace(". ", ".\r\n\t ")
    job, document = uploads.ingest(raw.encode(), "text/plain", ".txt", **CHUNKING)
    text = uploads.store.get_blob(document.artifacts["text"]).decode()
    ids = token_ids(settings, text)
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert text == normalize_text(raw) and "\r" not in text and "\t" not in text
    assert (document.status, document.token_count) == (DocumentStatus.INGESTED, len(ids))
    assert document.text_uri == job.payload["blob_uri"]  # the upload stays referenced
    stored = json.loads(uploads.store.get_blob(document.artifacts["chunks"]))
    assert {k: stored[k] for k in ("tokenizer", "chunk_tokens", "overlap", "retrieval_tokens")} == {
        "tokenizer": str(settings.base_model), "chunk_tokens": 64, "overlap": 0.1, "retrieval_tokens": 16}
    chunks = read_chunks(uploads.store, document.artifacts["chunks"])
    assert_windows(chunks.train_chunks, len(ids), size=64, overlap=6)
    assert_windows(chunks.retrieval_chunks, len(ids), size=16, overlap=0)
    for chunk in [*chunks.train_chunks, *chunks.retrieval_chunks]:
        assert chunk.text == decode(settings, ids[chunk.token_start:chunk.token_end])
    assert job.result["train_chunks"] == len(chunks.train_chunks) > 2
    assert job.result["chunks_uri"] == document.artifacts["chunks"]


def assert_windows(chunks: list[Chunk], n_tokens: int, size: int, overlap: int) -> None:
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert chunks[0].token_start == 0 and chunks[-1].token_end == n_tokens
    assert all(c.tokens == size for c in chunks[:-1]) and 0 < chunks[-1].tokens <= size
    for before, after in itertools.pairwise(chunks):
        assert after.token_start == before.token_end - overlap


def test_markdown_keeps_its_text(uploads: Uploads) -> None:
    markdown = "# Title\n\nSome   *emphasis* here.\n\n\n\n- item one\n- item two\n"
    job, document = uploads.ingest(markdown.encode(), "text/markdown", ".md")
    text = uploads.store.get_blob(document.artifacts["text"]).decode()
    assert job.status == JobStatus.SUCCEEDED
    assert text == "# Title\n\nSome *emphasis* here.\n\n- item one\n- item two"
    assert job.result["train_chunks"] == 1 and job.result["retrieval_chunks"] == 1


def test_retrieval_chunks_are_indexed_and_recorded(uploads: Uploads, settings: Settings) -> None:
    from registry.vector_index import VectorIndex

    job, document = uploads.ingest(SENTENCE.format(n=1).encode() * 4, "text/plain", ".txt", **CHUNKING)
    count = job.result["retrieval_chunks"]
    assert document.artifacts["index"] == {"status": "indexed", "points": count}
    with VectorIndex.open(settings) as index:
        assert len(index.point_ids(document.tenant, document.id)) == count


def test_a_locked_index_skips_indexing_but_ingest_succeeds(uploads: Uploads, settings: Settings) -> None:
    from registry.errors import MSG_INDEX_LOCKED
    from tests.test_vector_index import HOLDER

    settings.qdrant_path.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(settings.qdrant_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        job, document = uploads.ingest(SENTENCE.format(n=2).encode() * 4, "text/plain", ".txt", **CHUNKING)
    finally:
        holder.communicate("\n", timeout=30)
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert document.artifacts["index"]["status"] == "skipped"
    assert document.artifacts["index"]["reason"] == MSG_INDEX_LOCKED.format(path=settings.qdrant_path)


# -- PDFs -------------------------------------------------------------------------------------------------------


def test_pdf_text_is_extracted_page_by_page(uploads: Uploads) -> None:
    pdf = make_pdf(["Hello PDF world.\nA second line (with parens).", "Page two here."])
    job, document = uploads.ingest(pdf, "application/pdf", ".pdf")
    text = uploads.store.get_blob(document.artifacts["text"]).decode()
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert text == "Hello PDF world.\nA second line (with parens).\n\nPage two here."


@pytest.mark.parametrize(
    ("pdf", "payload", "error"),
    [
        pytest.param(make_pdf([""]), {}, MSG_PDF_NO_TEXT, id="no-text"),
        pytest.param(encrypt_pdf(make_pdf(["secret text"]), "hunter2"), {}, MSG_PDF_ENCRYPTED, id="encrypted"),
        pytest.param(make_pdf(["one", "two"]), {"max_pages": 1},
                     MSG_PDF_TOO_MANY_PAGES.format(pages=2, limit=1), id="too-many-pages"),
        pytest.param(make_pdf(["a" * 50]), {"max_chars": 20}, MSG_TEXT_TOO_LARGE.format(limit=20), id="too-much-text"),
    ],
)
def test_unusable_pdf_fails_permanently(uploads: Uploads, pdf: bytes, payload: dict[str, int], error: str) -> None:
    job, document = uploads.ingest(pdf, "application/pdf", ".pdf", **payload)
    assert (job.status, job.attempts, job.error) == (JobStatus.FAILED, 1, error)
    assert document.status == DocumentStatus.FAILED and "chunks" not in document.artifacts


def test_pdf_with_an_empty_user_password_is_read(uploads: Uploads) -> None:
    job, document = uploads.ingest(encrypt_pdf(make_pdf(["open text"]), ""), "application/pdf", ".pdf")
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert uploads.store.get_blob(document.artifacts["text"]) == b"open text"


def test_corrupt_pdf_fails_permanently(uploads: Uploads) -> None:
    job, _ = uploads.ingest(b"%PDF-1.4 not really a pdf", "application/pdf", ".pdf")
    assert (job.status, job.attempts) == (JobStatus.FAILED, 1)
    assert job.error is not None and job.error.startswith("the PDF could not be read")


def test_invalid_utf8_and_bad_options_fail_permanently(uploads: Uploads) -> None:
    job, _ = uploads.ingest(b"caf\xe9 au lait", "text/plain", ".txt")
    assert (job.status, job.error) == (JobStatus.FAILED, MSG_NOT_UTF8.format(offset=3))
    job, _ = uploads.ingest(b"fine text", "text/plain", ".txt", chunk_tokens=0)
    detail = "must be an integer >= 1, got 0"
    assert (job.status, job.error) == (JobStatus.FAILED, MSG_CHUNKING.format(field="chunk_tokens", detail=detail))


# -- pure functions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Cafe\u0301", "Caf\u00e9"),  # NFC composes
        ("a\r\nb\rc\u2028d\x0ce", "a\nb\nc\nd\ne"),  # every line ending becomes \n
        ("a \t\u00a0  b", "a b"),  # whitespace runs collapse
        ("a\x00b\x07c\x1bd\x7fe\x9ff\ufeffg", "abcdefg"),  # control characters and the BOM go
        ("  line  \nnext\t\n", "line\nnext"),  # lines are trimmed
        ("a\n\n\n\n\nb", "a\n\nb"),  # at most one blank line
        ("\n\n  \n", ""),
    ],
)
def test_normalize_text(raw: str, normalized: str) -> None:
    assert normalize_text(raw) == normalized


@pytest.mark.parametrize(
    ("n_tokens", "size", "overlap", "windows"),
    [
        (10, 4, 0.25, [(0, 4), (3, 7), (6, 10)]),
        (4, 4, 0.1, [(0, 4)]),
        (5, 4, 0.0, [(0, 4), (4, 5)]),
        (0, 4, 0.1, []),
        (4500, 2048, 0.1, [(0, 2048), (1844, 3892), (3688, 4500)]),
    ],
)
def test_token_windows(n_tokens: int, size: int, overlap: float, windows: list[tuple[int, int]]) -> None:
    assert token_windows(n_tokens, size, overlap) == windows


def test_tokenizer_is_loaded_once_per_model(settings: Settings) -> None:
    assert ingest.tokenizer_for(str(settings.base_model)) is ingest.tokenizer_for(str(settings.base_model))

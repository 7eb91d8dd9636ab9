"""The `ingest` job: extract and normalize a document's text, cut it into token chunks, and record both.

Training chunks (paper: 2048 tokens, 10% overlap) feed synthetic data and DCD; retrieval chunks (paper: 256 tokens)
feed the RAG index. Both are cut on the base model's tokens and carry their token span, so consumers can count
without re-tokenizing. `chunk_tokens`, `overlap` and `retrieval_tokens` in the payload override the sizes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engines.factory import resolve_base_model
from registry.errors import ChecksumError, NotFoundError
from registry.models import Document, DocumentStatus
from trainer_worker import artifacts
from trainer_worker.artifacts import Chunk, ChunkSet
from trainer_worker.context import JobContext, PermanentJobError
from trainer_worker.text_extract import ExtractLimits, extract_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MSG_CHUNKING = "invalid chunking option {field}: {detail}"
MSG_NO_BLOB = "the ingest job names no uploaded bytes (payload blob_uri) and the document has no text_uri."
MSG_BLOB_UNREADABLE = "the uploaded bytes at {uri} cannot be read ({detail}); upload the document again."

log = logging.getLogger(__name__)
MSG_NOT_INDEXED = "not indexed for retrieval: {detail}"


@dataclass(frozen=True)
class ChunkingConfig:
    """Chunk sizes in tokens; overlaps are fractions of a chunk."""

    chunk_tokens: int = 2048
    overlap: float = 0.1
    retrieval_tokens: int = 256
    retrieval_overlap: float = 0.0

    def __post_init__(self) -> None:
        for name in ("chunk_tokens", "retrieval_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _bad_option(name, f"must be an integer >= 1, got {value!r}")
        for name in ("overlap", "retrieval_overlap"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1:
                raise _bad_option(name, f"must be in [0, 1), got {value!r}")

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> ChunkingConfig:
        """The defaults, overridden by the payload keys of the same names."""
        names = ("chunk_tokens", "overlap", "retrieval_tokens", "retrieval_overlap")
        return cls(**{name: payload[name] for name in names if name in payload})


def _bad_option(name: str, detail: str) -> PermanentJobError:
    return PermanentJobError(MSG_CHUNKING.format(field=name, detail=detail))


def token_windows(n_tokens: int, size: int, overlap: float) -> list[tuple[int, int]]:
    """[start, end) spans of `size` tokens covering `n_tokens`, each starting int(size*overlap) before the last end."""
    stride = max(size - int(size * overlap), 1)
    windows: list[tuple[int, int]] = []
    start = 0
    while start < n_tokens:
        end = min(start + size, n_tokens)
        windows.append((start, end))
        if end == n_tokens:
            break
        start += stride
    return windows


@dataclass(frozen=True)
class Tokenized:
    """A text's token ids and, from fast tokenizers, each token's character span."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]] | None
    decode: Callable[[list[int]], str]

    def span(self, start: int, end: int) -> str:
        """The text of tokens [start, end): cut from the original by offsets when known, else decoded."""
        if self.offsets is None:
            return self.decode(self.ids[start:end])
        return self.text[self.offsets[start][0]:self.offsets[end - 1][1]]

    def chunks(self, size: int, overlap: float) -> list[Chunk]:
        """The text cut into token windows."""
        windows = token_windows(len(self.ids), size, overlap)
        return [Chunk(i, self.span(s, e), s, e) for i, (s, e) in enumerate(windows)]


@functools.lru_cache(maxsize=2)
def tokenizer_for(model: str) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, loaded once per process."""
    from engines.hf_loading import load_tokenizer

    return load_tokenizer(model)


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> Tokenized:
    """Token ids of the whole text, without special tokens (chunks are parts of a text, not prompts)."""
    # verbose=False: a document is expected to be longer than the model's context; no warning about it.
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = [(int(a), int(b)) for a, b in encoded["offset_mapping"]]
        return Tokenized(text, list(encoded["input_ids"]), offsets, tokenizer.decode)
    encoded = tokenizer(text, add_special_tokens=False, verbose=False)
    return Tokenized(text, list(encoded["input_ids"]), None, tokenizer.decode)


def index_retrieval_chunks(ctx: JobContext, document: Document, chunks: list[Chunk]) -> dict[str, Any]:
    """Embed the retrieval chunks into the vector index; the outcome is recorded on the document.

    A worker process that cannot open the embedded index (the server process owns its folder: run `kmserve up`,
    or set KMSERVE_QDRANT_URL) skips indexing rather than failing: the knowledge module can still be trained.
    """
    from engines.indexing import index_document
    from registry.errors import IndexLockedError

    try:
        points = index_document(ctx.settings, document.tenant, document.id, chunks)
    except IndexLockedError as exc:
        log.warning(MSG_NOT_INDEXED.format(detail=exc.message))
        return {"status": "skipped", "reason": exc.message}
    return {"status": "indexed", "points": points}


def run(ctx: JobContext) -> dict[str, Any]:
    """Ingest the job's document; a permanent failure also marks the document failed."""
    document = artifacts.load_document(ctx)
    try:
        return _ingest(ctx, document)
    except PermanentJobError:
        artifacts.update_document(ctx, status=DocumentStatus.FAILED, keep_status=(DocumentStatus.READY,))
        raise


def _ingest(ctx: JobContext, document: Document) -> dict[str, Any]:
    # Chunking options may come at the top level or with the upload's training options (`train`).
    chunking = ChunkingConfig.from_payload({**(ctx.payload.get("train") or {}), **ctx.payload})
    ctx.report(0.0, "extracting text")
    text = extract_text(_read_upload(ctx, document), _media_type(ctx, document),
                        ExtractLimits().tightened(ctx.payload))
    ctx.report(0.3, "tokenizing")
    model = resolve_base_model(ctx.settings)
    tokenized = tokenize(tokenizer_for(model), text)
    chunk_set = ChunkSet(
        train_chunks=tokenized.chunks(chunking.chunk_tokens, chunking.overlap),
        retrieval_chunks=tokenized.chunks(chunking.retrieval_tokens, chunking.retrieval_overlap),
        tokenizer=model, chunk_tokens=chunking.chunk_tokens, overlap=chunking.overlap,
        retrieval_tokens=chunking.retrieval_tokens, retrieval_overlap=chunking.retrieval_overlap,
    )
    ctx.report(0.6, "storing text and chunks")
    uris: dict[str, Any] = {"text": ctx.store.put_blob(text.encode("utf-8"), ".txt").uri,
            "chunks": artifacts.put_json(ctx.store, chunk_set.to_json(), ".chunks.json")}
    ctx.report(0.7, "indexing for retrieval")
    uris["index"] = index_retrieval_chunks(ctx, document, chunk_set.retrieval_chunks)
    # A document that already has a knowledge module stays ready while it is re-ingested.
    artifacts.update_document(ctx, uris, status=DocumentStatus.INGESTED, token_count=len(tokenized.ids),
                              keep_status=(DocumentStatus.READY,))
    counts = {"token_count": len(tokenized.ids), "characters": len(text),
              "train_chunks": len(chunk_set.train_chunks), "retrieval_chunks": len(chunk_set.retrieval_chunks)}
    ctx.report(1.0, "ingested", metrics=counts)
    return {**counts, "text_uri": uris["text"], "chunks_uri": uris["chunks"], "tokenizer": model,
            "index": uris["index"]}


def _read_upload(ctx: JobContext, document: Document) -> bytes:
    uri = ctx.payload.get("blob_uri") or document.text_uri
    if not uri:
        raise PermanentJobError(MSG_NO_BLOB)
    try:
        return ctx.store.get_blob(uri)
    except (NotFoundError, ChecksumError) as exc:  # gone or corrupt: reading again gives the same answer
        raise PermanentJobError(MSG_BLOB_UNREADABLE.format(uri=uri, detail=exc.message)) from exc


def _media_type(ctx: JobContext, document: Document) -> str:
    media_type = ctx.payload.get("media_type") or document.media_type
    return str(media_type).split(";", 1)[0].strip().lower()

"""Content-addressed blobs (document texts, JSONL artifacts, plots) under `blobs/<2 hex>/<sha256><suffix>`."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from registry.errors import ChecksumError, NotFoundError
from registry.store_format import BLOB_RE, SUFFIX_RE, fsync_path, parse_blob_name, write_durable
from registry.store_root import StoreRoot, basename, older_than, size_of

BLOBS = "blobs"
MSG_BAD_SUFFIX = "blob suffix {suffix!r} must look like '.txt' or '.tar.gz'"


@dataclass(frozen=True)
class BlobRef:
    """A stored blob: the sha256 of its bytes, where it lives and its size."""

    digest: str
    uri: str
    size: int


class BlobStore:
    """Bytes named by their sha256, written atomically and verified on every read."""

    def __init__(self, root: StoreRoot) -> None:
        self._root = root

    def put(self, data: bytes, suffix: str = "") -> BlobRef:
        """Store bytes under their sha256 plus a suffix such as `.txt`; storing the same bytes again is harmless."""
        if SUFFIX_RE.match(suffix) is None:
            raise ValueError(MSG_BAD_SUFFIX.format(suffix=suffix))
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(digest + suffix)
        # Always rewritten, never skipped: the rewrite also refreshes the age that gc's grace period reads.
        if self._root.local:
            self._write_local(Path(path), data)
        else:
            self._root.fs.pipe_file(path, data)  # a single object PUT: whole or absent on object stores
        return BlobRef(digest=digest, uri=self._root.uri(path), size=len(data))

    def get(self, uri_or_digest: str) -> bytes:
        """The blob's bytes, checked against the sha256 in its name; ChecksumError when they differ."""
        match = parse_blob_name(uri_or_digest)
        path = self._find(match["digest"], match["suffix"], uri_or_digest)
        try:
            data: bytes = self._root.fs.cat_file(path)
        except FileNotFoundError as exc:
            raise NotFoundError("blob", uri_or_digest) from exc
        actual = hashlib.sha256(data).hexdigest()
        if actual != match["digest"]:
            raise ChecksumError(match["digest"], f"blob hashes to {actual[:12]}")
        return data

    def gc(self, keep: set[str], cutoff: float) -> tuple[int, int]:
        """Remove blobs named in neither `keep` (digests or file names) nor younger than `cutoff`."""
        removed = freed = 0
        fs = self._root.fs
        for path in fs.find(self._root.path(BLOBS)):
            name = basename(path)
            match = BLOB_RE.match(name)
            if match is not None and (name in keep or match["digest"] in keep):
                continue
            if older_than(fs, path, cutoff):
                freed += size_of(fs, path)
                fs.rm_file(path)
                removed += 1
        return removed, freed

    def _path(self, name: str) -> str:
        return self._root.path(BLOBS, name[:2], name)

    def _write_local(self, final: Path, data: bytes) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        with self._root.staging() as stage:
            write_durable(stage / final.name, data)
            os.replace(stage / final.name, final)
        fsync_path(final.parent)

    def _find(self, digest: str, suffix: str, ref: str) -> str:
        if suffix:
            return self._path(digest + suffix)
        # A bare digest: the blob may have been stored with any suffix.
        for path in sorted(self._root.fs.glob(self._path(digest) + "*")):
            match = BLOB_RE.match(basename(path))
            if match is not None and match["digest"] == digest:
                return str(path)
        raise NotFoundError("blob", ref)

"""The adapter store's on-disk format: key names, the commit manifest, hashing and durable local writes.

An adapter lives under `adapters/<key>/` as a PEFT directory plus `kmserve-manifest.json`, written last. The manifest
records the sha256 and size of every file and the versions that wrote it; a directory without a valid manifest does
not exist as far as readers are concerned.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from registry.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from registry.errors import ChecksumError, InvalidAdapterError, NotFoundError

MANIFEST_NAME = "kmserve-manifest.json"
MANIFEST_FORMAT = "kmserve-adapter/1"
# `<sha256 of the safetensors>`, or `<that>-<12 hex of the config sha256>` when the same weights arrived earlier
# with another config: the weights alone name an adapter only while its config is unambiguous.
KEY_RE = re.compile(r"^(?P<digest>[0-9a-f]{64})(?:-(?P<config>[0-9a-f]{12}))?$")
BLOB_RE = re.compile(r"^(?P<digest>[0-9a-f]{64})(?P<suffix>(?:\.[A-Za-z0-9_-]{1,16}){0,3})$")
SUFFIX_RE = re.compile(r"^(?:\.[A-Za-z0-9_-]{1,16}){0,3}$")
CHUNK_BYTES = 1 << 20
WRITER_PACKAGES = ("kmserve", "peft", "transformers", "torch", "safetensors")


@dataclass(frozen=True)
class FileEntry:
    """The recorded size and sha256 of one file of a stored adapter."""

    size: int
    sha256: str


@dataclass(frozen=True)
class AdapterManifest:
    """The commit marker of a stored adapter: what every file must hash to, and who wrote it."""

    key: str
    digest: str
    config_sha256: str
    files: Mapping[str, FileEntry]
    writer_versions: Mapping[str, str] = field(default_factory=dict)
    created_at: str = ""

    def to_bytes(self) -> bytes:
        """The manifest as stable, sorted JSON."""
        body = {
            "format": MANIFEST_FORMAT, "key": self.key, "digest": self.digest, "config_sha256": self.config_sha256,
            "files": {name: {"size": e.size, "sha256": e.sha256} for name, e in sorted(self.files.items())},
            "writer_versions": dict(self.writer_versions), "created_at": self.created_at,
        }
        return json.dumps(body, sort_keys=True, indent=2).encode() + b"\n"

    @classmethod
    def from_bytes(cls, raw: bytes, key: str) -> AdapterManifest:
        """Parse the manifest stored under `key`; ChecksumError unless it is well formed and names that key."""
        try:
            body = json.loads(raw)
            files = {name: FileEntry(int(e["size"]), str(e["sha256"])) for name, e in body["files"].items()}
            manifest = cls(
                key=body["key"], digest=body["digest"], config_sha256=body["config_sha256"], files=files,
                writer_versions=dict(body.get("writer_versions", {})), created_at=str(body.get("created_at", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ChecksumError(key, f"{MANIFEST_NAME} is unreadable ({exc!r})") from exc
        if body.get("format") != MANIFEST_FORMAT:
            raise ChecksumError(key, f"{MANIFEST_NAME} has format {body.get('format')!r}, not {MANIFEST_FORMAT}")
        manifest.check_key(key)
        return manifest

    def check_key(self, key: str) -> None:
        """ChecksumError unless key, digest, config hash and file entries agree with one another."""
        match = KEY_RE.match(key)
        weights, config = self.files.get(WEIGHTS_NAME), self.files.get(CONFIG_NAME)
        problems = [
            (self.key != key, f"names key {self.key!r}"),
            (match is None or match["digest"] != self.digest, "digest does not match the key"),
            (weights is None or weights.sha256 != self.digest, f"{WEIGHTS_NAME} entry does not match the digest"),
            (config is None or config.sha256 != self.config_sha256, f"{CONFIG_NAME} entry does not match"),
            (match is not None and match["config"] is not None
             and not self.config_sha256.startswith(match["config"]), "config hash does not match the key"),
        ]
        for failed, detail in problems:
            if failed:
                raise ChecksumError(key, f"{MANIFEST_NAME} {detail}")


def parse_key(ref: str) -> str:
    """The adapter key named by a key or a store URI (its last path component); NotFoundError if malformed."""
    name = ref.rstrip("/").rsplit("/", 1)[-1]
    if KEY_RE.match(name) is None:
        raise NotFoundError("adapter", ref)
    return name


def parse_blob_name(ref: str) -> re.Match[str]:
    """The digest and suffix of a blob named by its digest, file name or URI; NotFoundError if malformed."""
    match = BLOB_RE.match(ref.rstrip("/").rsplit("/", 1)[-1])
    if match is None:
        raise NotFoundError("blob", ref)
    return match


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """Sorted, indented JSON (PEFT's own layout), so equal configs hash equal whatever wrote them."""
    try:
        return json.dumps(value, sort_keys=True, indent=2, allow_nan=False, ensure_ascii=False).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        raise InvalidAdapterError(f"{CONFIG_NAME} is not serializable as JSON: {exc}") from exc


def entry_of_bytes(data: bytes) -> FileEntry:
    """Size and sha256 of bytes in memory."""
    return FileEntry(len(data), hashlib.sha256(data).hexdigest())


def entry_of_file(path: Path) -> FileEntry:
    """Size and sha256 of a file, streamed."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return FileEntry(size, digest.hexdigest())


def verify_dir(directory: Path, manifest: AdapterManifest) -> None:
    """ChecksumError unless every file the manifest lists is present with its recorded size and sha256."""
    for name, expected in manifest.files.items():
        try:
            actual = entry_of_file(directory / name)
        except FileNotFoundError as exc:
            raise ChecksumError(manifest.key, f"{name} is missing") from exc
        check_entry(manifest.key, name, actual, expected)


def read_verified(path: Path, manifest: AdapterManifest) -> bytes:
    """The bytes of one listed file, checked against the manifest after reading (what is checked is what is used)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ChecksumError(manifest.key, f"{path.name} is missing") from exc
    check_entry(manifest.key, path.name, entry_of_bytes(data), manifest.files[path.name])
    return data


def check_entry(key: str, name: str, actual: FileEntry, expected: FileEntry) -> None:
    """ChecksumError naming the file when its size or sha256 differs from the record."""
    if actual.size != expected.size:
        raise ChecksumError(key, f"{name} has {actual.size} bytes, {expected.size} were stored")
    if actual.sha256 != expected.sha256:
        raise ChecksumError(key, f"{name} hashes to {actual.sha256[:12]}, {expected.sha256[:12]} was stored")


def write_durable(path: Path, data: bytes) -> None:
    """Write and fsync a file, so that a rename published after this never exposes missing bytes."""
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@lru_cache(maxsize=1)
def _installed_versions() -> tuple[tuple[str, str], ...]:
    found = []
    for package in WRITER_PACKAGES:
        try:
            found.append((package, version(package)))
        except PackageNotFoundError:
            continue
    return tuple(found)


def writer_versions() -> dict[str, str]:
    """Versions of the packages that shape a written adapter; missing ones are omitted."""
    return dict(_installed_versions())

"""Content-addressed, verified store of LoRA adapters and blobs, on local disk or any fsspec filesystem.

Local disk: an adapter is staged in `tmp/`, fsynced, and published by one atomic directory rename. Other filesystems
(s3://, memory://) have no atomic directory rename: the files are uploaded first and the manifest last, and a
directory without a valid manifest does not exist for readers. Every read re-hashes what it hands out against the
manifest, and only safetensors are ever deserialized.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.adapter_files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterInfo,
    inspect_adapter,
    read_config,
    read_safetensors_header,
    refuse_pickles,
    validate_config,
)
from registry.blob_store import BlobRef, BlobStore
from registry.errors import ChecksumError, ConflictError, InvalidAdapterError, NotFoundError
from registry.store_format import (
    KEY_RE,
    MANIFEST_NAME,
    AdapterManifest,
    canonical_json,
    entry_of_bytes,
    entry_of_file,
    fsync_path,
    parse_key,
    read_verified,
    verify_dir,
    write_durable,
    writer_versions,
)
from registry.store_root import StoreRoot, basename, older_than, size_of

if TYPE_CHECKING:
    import torch

    from registry.config import Settings

__all__ = ["AdapterStore", "BlobRef", "GcReport", "StoredAdapter"]

ADAPTERS = "adapters"
PUBLISH_ATTEMPTS = 3
MSG_KEY_TAKEN = "adapter keys {keys} are held by other configs of the same weights; nothing was stored."
MSG_BUSY = "adapter {key} kept changing while it was being stored; retry."
MSG_NOT_A_DIR = "{path} is not a directory holding {config} and {weights}"


@dataclass(frozen=True)
class StoredAdapter:
    """An adapter as stored: its key and URI, the weights digest, the config and what the config describes."""

    key: str
    digest: str
    uri: str
    size_bytes: int
    config: dict[str, Any]
    info: AdapterInfo
    config_sha256: str
    writer_versions: Mapping[str, str]


@dataclass
class GcReport:
    """What one garbage collection removed."""

    adapters_removed: int = 0
    blobs_removed: int = 0
    temp_removed: int = 0
    bytes_freed: int = 0


class AdapterStore:
    """Adapters in PEFT format keyed by the sha256 of their weights, plus a content-addressed blob area."""

    def __init__(self, url: str, *, cache_dir: Path | None = None) -> None:
        self._root = StoreRoot(url, cache_dir)
        self._blobs = BlobStore(self._root)

    @property
    def url(self) -> str:
        """The store root as configured."""
        return self._root.url

    @classmethod
    def from_settings(cls, settings: Settings) -> AdapterStore:
        """The store named by `settings.resolved_store_url`, caching remote adapters under the data dir."""
        return cls(settings.resolved_store_url, cache_dir=(settings.data_dir / "store-cache").resolve())

    def put_dir(self, src: Path) -> StoredAdapter:
        """Validate a PEFT adapter directory and store it; the same content stored twice gives the same key."""
        if not src.is_dir():
            raise InvalidAdapterError(MSG_NOT_A_DIR.format(path=src, config=CONFIG_NAME, weights=WEIGHTS_NAME))
        # Everything is checked on the source first so that a refused adapter leaves no trace in the store.
        refuse_pickles(path.name for path in src.iterdir())
        config = read_config(src / CONFIG_NAME)
        inspect_adapter(config, read_safetensors_header(src / WEIGHTS_NAME))
        with self._root.staging() as stage:
            shutil.copyfile(src / WEIGHTS_NAME, stage / WEIGHTS_NAME)
            return self._commit(stage, config)

    def put(self, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> StoredAdapter:
        """Store an adapter given as a PEFT LoRA config and its tensors under PEFT's saved key names."""
        from safetensors.torch import save_file

        validate_config(config)
        with self._root.staging() as stage:
            plain = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
            save_file(plain, str(stage / WEIGHTS_NAME), metadata={"format": "pt"})
            return self._commit(stage, dict(config))

    def open(self, key_or_uri: str) -> Path:
        """A local directory holding the verified adapter; remote stores download it into the cache first."""
        manifest = self._read_manifest(parse_key(key_or_uri))
        if not self._root.local:
            return self._download(manifest)
        directory = Path(self._root.path(ADAPTERS, manifest.key))
        verify_dir(directory, manifest)
        return directory

    def load(self, key_or_uri: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The adapter's config and tensors, deserialized by safetensors from bytes that passed the checksum."""
        from safetensors.torch import load as load_safetensors

        manifest = self._read_manifest(parse_key(key_or_uri))
        directory = Path(self._root.path(ADAPTERS, manifest.key)) if self._root.local else self._download(manifest)
        weights = read_verified(directory / WEIGHTS_NAME, manifest)
        config: dict[str, Any] = json.loads(read_verified(directory / CONFIG_NAME, manifest))
        tensors: dict[str, torch.Tensor] = load_safetensors(weights)
        return config, tensors

    def exists(self, key_or_uri: str) -> bool:
        """True when the adapter is committed (its manifest is present and well formed)."""
        try:
            return self._live_manifest(parse_key(key_or_uri)) is not None
        except NotFoundError:
            return False

    def delete(self, key_or_uri: str) -> bool:
        """Remove an adapter (committed or not); False when there was nothing to remove."""
        key = parse_key(key_or_uri)
        path = self._root.path(ADAPTERS, key)
        if not self._root.fs.exists(path):
            return False
        self._remove_adapter(path)
        return True

    def list_keys(self) -> list[tuple[str, float]]:
        """Committed adapters as (key, commit time in epoch seconds), sorted by key."""
        found = []
        for path in self._root.listdir(self._root.path(ADAPTERS)):
            name = basename(path)
            if KEY_RE.match(name) and self._live_manifest(name) is not None:
                found.append((name, self._root.fs.modified(f"{path}/{MANIFEST_NAME}").timestamp()))
        return sorted(found)

    def put_blob(self, data: bytes, suffix: str = "") -> BlobRef:
        """Store bytes under their sha256 plus a suffix such as `.txt`; see `BlobStore.put`."""
        return self._blobs.put(data, suffix)

    def get_blob(self, uri_or_digest: str) -> bytes:
        """The verified bytes of a blob named by digest or URI; see `BlobStore.get`."""
        return self._blobs.get(uri_or_digest)

    def gc(self, referenced: Iterable[str], *, grace_seconds: float) -> GcReport:
        """Delete unreferenced adapters and blobs and abandoned writes, once older than the grace period.

        `referenced` holds keys, digests or URIs; an adapter is kept when its key or its weights digest is named.
        """
        keep = {basename(ref) for ref in referenced}
        cutoff = time.time() - grace_seconds
        report = GcReport()
        self._gc_adapters(keep, cutoff, report)
        blobs, blob_bytes = self._blobs.gc(keep, cutoff)
        stages, stage_bytes = self._root.gc_staging(cutoff)
        report.blobs_removed = blobs
        report.temp_removed += stages
        report.bytes_freed += blob_bytes + stage_bytes
        return report

    # -- writing adapters

    def _commit(self, stage: Path, config: dict[str, Any]) -> StoredAdapter:
        weights = stage / WEIGHTS_NAME
        # Checked again on the staged copy: that copy, not the source, is what gets published.
        info = inspect_adapter(config, read_safetensors_header(weights))
        config_bytes = canonical_json(config)
        write_durable(stage / CONFIG_NAME, config_bytes)
        fsync_path(weights)
        files = {WEIGHTS_NAME: entry_of_file(weights), CONFIG_NAME: entry_of_bytes(config_bytes)}
        digest, config_sha = files[WEIGHTS_NAME].sha256, files[CONFIG_NAME].sha256
        keys = (digest, f"{digest}-{config_sha[:12]}")
        for key in keys:
            manifest = AdapterManifest(key, digest, config_sha, files, writer_versions(), _now())
            placed = self._place(stage, manifest)
            if placed is not None:
                return self._stored(placed, config, info)
        raise ConflictError(MSG_KEY_TAKEN.format(keys=", ".join(keys)))

    def _place(self, stage: Path, manifest: AdapterManifest) -> AdapterManifest | None:
        """Store under manifest.key; returns what is stored there, or None when another config owns the key."""
        for _ in range(PUBLISH_ATTEMPTS):
            existing = self._live_manifest(manifest.key)
            if existing is not None and existing.config_sha256 != manifest.config_sha256:
                return None
            if existing is not None and self._intact(existing):
                self._touch(existing)
                return existing
            if self._root.local:
                self._clear_broken(manifest.key, damaged=existing is not None)
            if self._publish(stage, manifest):
                return manifest
        raise ConflictError(MSG_BUSY.format(key=manifest.key))

    def _clear_broken(self, key: str, *, damaged: bool) -> None:
        # Local writers publish directory and manifest in one rename, so a directory without a valid manifest
        # is debris, never a write in progress; the manifest is re-read to let a rename that just landed win.
        path = self._root.path(ADAPTERS, key)
        if damaged or (self._root.fs.exists(path) and self._live_manifest(key) is None):
            self._remove_adapter(path)

    def _publish(self, stage: Path, manifest: AdapterManifest) -> bool:
        if not self._root.local:
            return self._publish_remote(stage, manifest)
        write_durable(stage / MANIFEST_NAME, manifest.to_bytes())
        fsync_path(stage)
        final = Path(self._root.path(ADAPTERS, manifest.key))
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(stage, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            return False  # a concurrent writer got there first; the caller looks at what it left
        fsync_path(final.parent)
        return True

    def _publish_remote(self, stage: Path, manifest: AdapterManifest) -> bool:
        base = self._root.path(ADAPTERS, manifest.key)
        for name in manifest.files:
            self._root.fs.put_file(str(stage / name), f"{base}/{name}")
        self._root.fs.pipe_file(f"{base}/{MANIFEST_NAME}", manifest.to_bytes())  # the commit marker goes last
        # Read back: a writer of the same weights with another config may have raced into this key.
        current = self._live_manifest(manifest.key)
        return current is not None and current.config_sha256 == manifest.config_sha256

    def _intact(self, manifest: AdapterManifest) -> bool:
        try:
            if self._root.local:
                verify_dir(Path(self._root.path(ADAPTERS, manifest.key)), manifest)
            else:
                self._download(manifest)
        except ChecksumError:
            return False
        return True

    def _touch(self, manifest: AdapterManifest) -> None:
        # A re-stored adapter counts as new: gc's grace period must cover the caller until it records the key.
        path = self._root.path(ADAPTERS, manifest.key, MANIFEST_NAME)
        if self._root.local:
            os.utime(path)
        else:
            self._root.fs.pipe_file(path, manifest.to_bytes())

    def _stored(self, manifest: AdapterManifest, config: dict[str, Any], info: AdapterInfo) -> StoredAdapter:
        return StoredAdapter(
            key=manifest.key, digest=manifest.digest, uri=self._root.uri(self._root.path(ADAPTERS, manifest.key)),
            size_bytes=sum(entry.size for entry in manifest.files.values()), config=config, info=info,
            config_sha256=manifest.config_sha256, writer_versions=dict(manifest.writer_versions),
        )

    # -- reading adapters

    def _read_manifest(self, key: str) -> AdapterManifest:
        try:
            raw = self._root.fs.cat_file(self._root.path(ADAPTERS, key, MANIFEST_NAME))
        except FileNotFoundError as exc:
            raise NotFoundError("adapter", key) from exc
        return AdapterManifest.from_bytes(raw, key)

    def _live_manifest(self, key: str) -> AdapterManifest | None:
        try:
            return self._read_manifest(key)
        except (NotFoundError, ChecksumError):
            return None

    def _download(self, manifest: AdapterManifest) -> Path:
        target = self._root.cache / ADAPTERS / manifest.key
        if target.is_dir():
            try:
                verify_dir(target, manifest)
                return target
            except ChecksumError:
                shutil.rmtree(target, ignore_errors=True)  # a damaged or outdated copy: fetch it again
        remote = self._root.path(ADAPTERS, manifest.key)
        with self._root.staging() as stage:
            for name in manifest.files:
                try:
                    self._root.fs.get_file(f"{remote}/{name}", str(stage / name))
                except FileNotFoundError as exc:
                    raise ChecksumError(manifest.key, f"{name} is missing") from exc
            verify_dir(stage, manifest)
            write_durable(stage / MANIFEST_NAME, manifest.to_bytes())
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(stage, target)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                verify_dir(target, manifest)  # a concurrent reader cached it first; check its copy
        return target

    # -- removing

    def _remove_adapter(self, path: str) -> int:
        size = size_of(self._root.fs, path)
        if self._root.local:
            # Renamed out of sight first, so that a crash mid-delete never leaves a half adapter visible.
            trash = self._root.trash_path()
            try:
                os.rename(path, trash)
            except FileNotFoundError:
                return 0  # someone else removed it first
            shutil.rmtree(trash, ignore_errors=True)
            return size
        if self._root.fs.exists(f"{path}/{MANIFEST_NAME}"):
            self._root.fs.rm_file(f"{path}/{MANIFEST_NAME}")  # uncommitted first, then the files
        self._root.fs.rm(path, recursive=True)
        shutil.rmtree(self._root.cache / ADAPTERS / basename(path), ignore_errors=True)
        return size

    def _gc_adapters(self, keep: set[str], cutoff: float, report: GcReport) -> None:
        for path in self._root.listdir(self._root.path(ADAPTERS)):
            name = basename(path)
            match = KEY_RE.match(name)
            live = match is not None and self._live_manifest(name) is not None
            if match is not None and live and (name in keep or match["digest"] in keep):
                continue
            if not older_than(self._root.fs, path, cutoff):
                continue
            report.bytes_freed += self._remove_adapter(path)
            if live:
                report.adapters_removed += 1
            else:
                report.temp_removed += 1


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

"""Where a store lives: its fsspec filesystem and root path, plus the local scratch space for writes in progress."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

TMP = "tmp"
LOCAL_FS = LocalFileSystem()


class StoreRoot:
    """A store location: a local directory or any fsspec URL; remote stores stage and cache under `cache_dir`."""

    def __init__(self, url: str, cache_dir: Path | None = None) -> None:
        self.url = url
        self.fs, root = url_to_fs(url)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = root.rstrip("/")
        # Remote adapters are read from local copies: engines and safetensors need real files.
        self.cache = cache_dir or Path(tempfile.gettempdir()) / "kmserve-store-cache"

    def path(self, *parts: str) -> str:
        """The filesystem path (no protocol) of `parts` under the root."""
        return "/".join((self.root, *parts))

    def uri(self, path: str) -> str:
        """The URI callers record: a plain path on local disk, `proto://...` elsewhere."""
        return path if self.local else str(self.fs.unstrip_protocol(path))

    def staging_root(self) -> Path:
        """Local folder holding writes in progress."""
        # Local stages sit inside the store so that the final rename never crosses a filesystem.
        return Path(self.path(TMP)) if self.local else self.cache / TMP

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh directory for one write; removed afterwards unless a rename published it."""
        root = self.staging_root()
        root.mkdir(parents=True, exist_ok=True)
        stage = root / f"{uuid.uuid4().hex}.partial"
        stage.mkdir()
        try:
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def trash_path(self) -> Path:
        """A fresh name in the staging folder to move a local directory out of sight before deleting it."""
        root = self.staging_root()
        root.mkdir(parents=True, exist_ok=True)
        return root / f"{uuid.uuid4().hex}.trash"

    def listdir(self, path: str) -> list[str]:
        """Full paths of the entries of a store directory; empty when it does not exist."""
        return list_paths(self.fs, path)

    def gc_staging(self, cutoff: float) -> tuple[int, int]:
        """Remove writes abandoned before `cutoff` (crashed writers); returns (entries, bytes) removed."""
        removed = freed = 0
        for path in list_paths(LOCAL_FS, str(self.staging_root())):
            if older_than(LOCAL_FS, path, cutoff):
                freed += size_of(LOCAL_FS, path)
                LOCAL_FS.rm(path, recursive=True)
                removed += 1
        return removed, freed


def basename(path: str) -> str:
    """The last component of a path or URI."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def list_paths(fs: Any, path: str) -> list[str]:
    """Full paths of the entries of a directory on `fs`; empty when it does not exist."""
    try:
        return [str(item) for item in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []


def size_of(fs: Any, path: str) -> int:
    """Bytes under a file or directory; 0 when it is gone."""
    try:
        return int(fs.du(path, total=True))
    except FileNotFoundError:
        return 0


def older_than(fs: Any, path: str, cutoff: float) -> bool:
    """True when the newest modification time in `path` is before `cutoff`; False when no time is known."""
    newest: float | None = None
    for item in {path, *fs.find(path, withdirs=True)}:
        try:
            stamp = fs.modified(item).timestamp()
        except (FileNotFoundError, NotImplementedError):
            continue  # object stores have no times for directories; their files carry them
        newest = stamp if newest is None else max(newest, stamp)
    return newest is not None and newest < cutoff

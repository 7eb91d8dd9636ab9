"""Resumable synthetic-data generation: each finished (chunk, task) is appended to a file in the job's checkpoint dir.

A preempted or killed `synthesize` job that runs again skips the units already on file. The file starts with the
synthetic-data key, so a checkpoint written for other chunks, model or profile is never mixed in; a line torn by a
crash is ignored (its unit is generated again).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "synthesize.jsonl"

Unit = tuple[int, str]  # (chunk index, task)


def jsonl_line(record: dict[str, Any]) -> str:
    """One JSONL line."""
    return json.dumps(record, ensure_ascii=False) + "\n"


class SynthesisCheckpoint:
    """The records and counts of the units generated so far, mirrored in an append-only file."""

    def __init__(self, path: Path, done: dict[Unit, list[dict[str, Any]]], counts: Counter[str]) -> None:
        self.path = path
        self._done = done
        self.counts = counts

    @classmethod
    def open(cls, directory: Path, key: str) -> SynthesisCheckpoint:
        """The checkpoint of `key` in `directory`: resumed when one is there, else started empty."""
        path = directory / CHECKPOINT_FILE
        done, counts = _read(path, key)
        if not done:
            directory.mkdir(parents=True, exist_ok=True)
            path.write_text(jsonl_line({"key": key}), encoding="utf-8")
        else:
            log.info("resuming synthetic data of %s: %d unit(s) already generated", key[:12], len(done))
        return cls(path, done, counts)

    def has(self, unit: Unit) -> bool:
        """True when the unit's generations are on file."""
        return unit in self._done

    def add(self, unit: Unit, records: list[dict[str, Any]], counts: Counter[str]) -> None:
        """Record a finished unit, durably before the job reports progress past it."""
        line = jsonl_line({"unit": list(unit), "records": records, "counts": dict(counts)})
        with self.path.open("a", encoding="utf-8") as file:
            file.write(line)
            file.flush()
            os.fsync(file.fileno())
        self._done[unit] = records
        self.counts.update(counts)

    def lines(self, units: Sequence[Unit]) -> list[str]:
        """The JSONL lines of all records, in the order of `units`."""
        return [jsonl_line(record) for unit in units for record in self._done.get(unit, [])]


def _read(path: Path, key: str) -> tuple[dict[Unit, list[dict[str, Any]]], Counter[str]]:
    done: dict[Unit, list[dict[str, Any]]] = {}
    counts: Counter[str] = Counter()
    if not path.is_file():
        return done, counts
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or _parse(lines[0]).get("key") != key:
        return done, counts
    for line in lines[1:]:
        entry = _parse(line)
        if "unit" in entry and tuple(entry["unit"]) not in done:
            done[(int(entry["unit"][0]), str(entry["unit"][1]))] = list(entry["records"])
            counts.update(entry.get("counts", {}))
    return done, counts


def _parse(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:  # a line torn by a crash mid-write
        return {}
    return value if isinstance(value, dict) else {}

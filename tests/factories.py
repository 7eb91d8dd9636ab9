"""Row factories for registry tests: each call makes a distinct valid row with overridable fields."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

from sqlalchemy.orm import Session

from registry.adapters import AdapterCreate, register_adapter
from registry.documents import DocumentCreate, create_document
from registry.models import DEFAULT_TENANT, Adapter, AdapterKind, Document
from registry.store import AdapterStore

_counter = itertools.count(1)


def make_document(session: Session, **overrides: Any) -> Document:
    """A new document with unique content."""
    n = next(_counter)
    data = DocumentCreate(
        title=overrides.pop("title", f"Document {n}"),
        content_hash=overrides.pop("content_hash", hashlib.sha256(f"text {n}".encode()).hexdigest()),
        size_bytes=overrides.pop("size_bytes", 100 + n),
        **overrides,
    )
    document, _ = create_document(session, data)
    return document


def make_adapter(session: Session, **overrides: Any) -> Adapter:
    """A new adapter version (lineage `km:<doc>` of a fresh document unless given)."""
    tenant = overrides.get("tenant", DEFAULT_TENANT)
    if "lineage" not in overrides:
        document = make_document(session, tenant=tenant)
        overrides.setdefault("document_id", document.id)
        overrides["lineage"] = f"km:{document.id}"
    digest = hashlib.sha256(f"blob {next(_counter)}".encode()).hexdigest()
    defaults: dict[str, Any] = {
        "kind": AdapterKind.KM, "base_model": "tiny-llama", "rank": 16, "alpha": 16.0, "sha256": digest,
        "size_bytes": 1234, "uri": f"file:///store/adapters/{digest}", "target_modules": ["q_proj", "v_proj"],
    }
    return register_adapter(session, AdapterCreate(**{**defaults, **overrides}))


def lora_config(rank: int = 2, **changes: Any) -> dict[str, Any]:
    """A PEFT LoRA config for the tensors below."""
    return {"peft_type": "LORA", "r": rank, "lora_alpha": 4, "target_modules": ["q_proj", "down_proj"], **changes}


def lora_tensors(seed: int, rank: int = 2) -> dict[str, Any]:
    """LoRA tensors under PEFT's saved names for q_proj (32 -> 32) and down_proj (64 -> 32)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    shapes = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.0.mlp.down_proj": (64, 32)}
    tensors = {}
    for module, (fan_in, fan_out) in shapes.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator)
    return tensors


def make_stored_adapter(session: Session, store: AdapterStore, seed: int, **overrides: Any) -> Adapter:
    """An adapter version whose files are really in `store` (what routes that verify them need)."""
    stored = store.put(lora_config(), lora_tensors(seed))
    return make_adapter(session, sha256=stored.digest, uri=stored.uri, size_bytes=stored.size_bytes, **overrides)

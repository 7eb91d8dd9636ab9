"""The storage kernel end to end: a real PEFT adapter stored, registered, aliased, served from the store, GC'd."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from registry import adapters as adapter_repo
from registry import aliases as alias_repo
from registry.adapters import AdapterCreate, km_lineage
from registry.config import get_settings
from registry.db import head_revision, make_engine, make_session_factory, transaction
from registry.errors import AdapterInUseError
from registry.models import AdapterKind
from registry.store import AdapterStore
from tests.factories import make_document
from tests.tiny import save_lora

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("loras")
    return [save_lora(root / f"v{i}", seed=i, r=4, lora_alpha=8, target_modules=TARGETS) for i in (1, 2)]


def test_store_register_alias_open(session: Session, tmp_path: Path, lora_dirs: list[Path]) -> None:
    store = AdapterStore(str(tmp_path / "store"))
    document = make_document(session)
    lineage = km_lineage(document.id)
    versions = []
    for src in lora_dirs:
        stored = store.put_dir(src)
        data = AdapterCreate.from_stored(stored, kind=AdapterKind.KM, lineage=lineage, document_id=document.id)
        versions.append(adapter_repo.register_adapter(session, data))
    assert [v.version for v in versions] == [1, 2]
    assert versions[0].rank == 4 and versions[0].alpha == 8 and versions[0].target_modules == TARGETS
    assert versions[0].writer_versions["peft"]
    alias_repo.set_alias(session, lineage, versions[1].id)
    served = alias_repo.resolve_alias(session, lineage)
    opened = store.open(served.uri)
    weights = "adapter_model.safetensors"
    assert (opened / weights).read_bytes() == (lora_dirs[1] / weights).read_bytes()
    with pytest.raises(AdapterInUseError):
        adapter_repo.delete_adapter(session, versions[1].id)


def test_gc_keeps_what_the_registry_references(session: Session, tmp_path: Path, lora_dirs: list[Path]) -> None:
    store = AdapterStore(str(tmp_path / "store"))
    kept, orphan = (store.put_dir(src) for src in lora_dirs)
    document = make_document(session)
    adapter_repo.register_adapter(session, AdapterCreate.from_stored(
        kept, kind=AdapterKind.KM, lineage=km_lineage(document.id), document_id=document.id))
    referenced = adapter_repo.referenced_uris(session) | adapter_repo.referenced_digests(session)
    report = store.gc(referenced, grace_seconds=0)
    assert report.adapters_removed == 1
    assert store.exists(kept.key) and not store.exists(orphan.key)


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("KMSERVE_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield tmp_path / "data"
    get_settings.cache_clear()


def test_cli_migrate_then_gc(cli_env: Path, lora_dirs: list[Path]) -> None:
    from clients.cli import app

    runner = CliRunner()
    migrated = runner.invoke(app, ["migrate"])
    assert migrated.exit_code == 0, migrated.output
    assert f"revision {head_revision()}" in migrated.output
    store = AdapterStore.from_settings(get_settings())
    kept, orphan = (store.put_dir(src) for src in lora_dirs)
    engine = make_engine(get_settings().resolved_database_url)
    with transaction(make_session_factory(engine)) as session:
        adapter_repo.register_adapter(session, AdapterCreate.from_stored(kept, kind=AdapterKind.KE, lineage="ke:qa"))
    engine.dispose()
    result = runner.invoke(app, ["gc", "--grace", "0"])
    assert result.exit_code == 0, result.output
    assert "removed 1 adapters" in result.output
    assert store.exists(kept.key) and not store.exists(orphan.key)

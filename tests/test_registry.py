"""Documents, adapters, aliases and API keys on SQLite and PostgreSQL (each test rolled back)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from registry import adapters as adapter_repo
from registry import aliases as alias_repo
from registry import api_keys as key_repo
from registry import documents as doc_repo
from registry.db import current_revision, head_revision
from registry.errors import AdapterInUseError, InvalidScopeError, NotFoundError
from registry.models import AdapterKind, DocumentStatus, utcnow
from tests.factories import make_adapter, make_document


def test_migrated_to_head(db_engine: Engine) -> None:
    assert current_revision(db_engine) == head_revision() == "0002"


def test_models_match_migrations(db_engine: Engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from registry.models import Base

    with db_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


# --- documents -------------------------------------------------------------------------------------------------


def test_document_dedupe_by_content(session: Session) -> None:
    digest = doc_repo.content_hash("The capital of Varo is Meluna.")
    first, created = doc_repo.create_document(session, doc_repo.DocumentCreate("A", digest, 30))
    again, created_again = doc_repo.create_document(session, doc_repo.DocumentCreate("B", digest, 30))
    assert created and not created_again
    assert again.id == first.id and again.title == "A"


def test_same_content_other_tenant_is_a_new_document(session: Session) -> None:
    digest = doc_repo.content_hash("shared text")
    mine, _ = doc_repo.create_document(session, doc_repo.DocumentCreate("A", digest, 11))
    theirs, created = doc_repo.create_document(session, doc_repo.DocumentCreate("A", digest, 11, tenant="acme"))
    assert created and theirs.id != mine.id
    with pytest.raises(NotFoundError):
        doc_repo.get_document(session, theirs.id)


def test_document_fields_roundtrip(session: Session) -> None:
    doc = make_document(session, metadata={"lang": "en", "tags": ["a"]}, media_type="text/markdown")
    session.expire_all()
    loaded = doc_repo.get_document(session, doc.id)
    assert loaded.metadata_ == {"lang": "en", "tags": ["a"]}
    assert loaded.status is DocumentStatus.PENDING
    assert loaded.created_at.tzinfo is not None
    assert abs(loaded.created_at - utcnow()) < timedelta(minutes=1)


def test_list_documents_pages_newest_first(session: Session) -> None:
    ids = [make_document(session, tenant="pager").id for _ in range(5)]
    page, total = doc_repo.list_documents(session, tenant="pager", limit=2, offset=1)
    assert total == 5
    assert [d.id for d in page] == sorted(ids, reverse=True)[1:3]


def test_update_document_status(session: Session) -> None:
    doc = make_document(session)
    doc_repo.update_document(session, doc.id, status=DocumentStatus.READY, token_count=321, text_uri="blob://x")
    ready, total = doc_repo.list_documents(session, status=DocumentStatus.READY)
    assert doc.id in [d.id for d in ready] and total >= 1
    assert doc_repo.get_document(session, doc.id).token_count == 321


def test_delete_document_drops_its_adapters_and_aliases(session: Session) -> None:
    km = make_adapter(session)
    assert km.document_id is not None
    alias_repo.set_alias(session, km.lineage, km.id)
    removed = doc_repo.delete_document(session, km.document_id)
    assert [a.id for a in removed] == [km.id]
    with pytest.raises(NotFoundError):
        adapter_repo.get_adapter(session, km.id)
    with pytest.raises(NotFoundError):
        alias_repo.get_alias(session, km.lineage)


def test_get_missing_document(session: Session) -> None:
    with pytest.raises(NotFoundError, match="document 999999 was not found"):
        doc_repo.get_document(session, 999_999)


# --- adapters ---------------------------------------------------------------------------------------------------


def test_versions_increase_per_lineage(session: Session) -> None:
    v1 = make_adapter(session)
    v2 = make_adapter(session, lineage=v1.lineage, document_id=v1.document_id)
    other = make_adapter(session)
    assert (v1.version, v2.version, other.version) == (1, 2, 1)
    assert adapter_repo.latest_version(session, v1.lineage) == 2
    assert adapter_repo.get_version(session, v1.lineage, 1).id == v1.id


def test_a_job_registers_one_version_however_often_it_runs(session: Session) -> None:
    first = make_adapter(session, job_id=41, config={"method": "sdcd"})
    again = make_adapter(session, lineage=first.lineage, document_id=first.document_id, job_id=41)
    assert again.id == first.id and first.config == {"method": "sdcd", "job_id": 41}
    assert adapter_repo.latest_version(session, first.lineage) == 1
    # another job, or no job, is a new version; the same job in another lineage is that lineage's own version
    other = make_adapter(session, lineage=first.lineage, document_id=first.document_id, job_id=42)
    plain = make_adapter(session, lineage=first.lineage, document_id=first.document_id)
    elsewhere = make_adapter(session, job_id=41)
    assert (other.version, plain.version, elsewhere.version) == (2, 3, 1) and "job_id" not in plain.config
    assert adapter_repo.registered_by_job(session, first.lineage, 42).id == other.id  # type: ignore[union-attr]
    assert adapter_repo.registered_by_job(session, first.lineage, 43) is None


def test_adapter_records_everything(session: Session) -> None:
    adapter = make_adapter(
        session, kind=AdapterKind.KE, lineage="ke:quality", rank=8, alpha=16.0, use_rslora=True,
        target_modules=["v_proj", "q_proj"], metrics={"loss": [3.0, 2.5]},
        config={"layer_weights": {"km": [0.5, 0.5]}},
        writer_versions={"kmserve": "0.1.0", "peft": "0.21.2", "transformers": "5.23.0"},
    )
    session.expire_all()
    loaded = adapter_repo.get_adapter(session, adapter.id)
    assert loaded.kind is AdapterKind.KE and loaded.document_id is None
    assert loaded.target_modules == ["q_proj", "v_proj"]
    assert loaded.metrics == {"loss": [3.0, 2.5]}
    assert loaded.writer_versions["peft"] == "0.21.2"
    assert loaded.scaling == pytest.approx(16.0 / 8**0.5)


def test_list_adapters_filters(session: Session) -> None:
    km = make_adapter(session, tenant="filters")
    make_adapter(session, tenant="filters", kind=AdapterKind.KE, lineage="ke:x")
    kms, total = adapter_repo.list_adapters(session, tenant="filters", kind=AdapterKind.KM)
    assert total == 1 and kms[0].id == km.id
    by_doc, _ = adapter_repo.list_adapters(session, tenant="filters", document_id=km.document_id)
    assert [a.id for a in by_doc] == [km.id]


def test_adapter_for_foreign_document_refused(session: Session) -> None:
    foreign = make_document(session, tenant="other")
    with pytest.raises(NotFoundError):
        make_adapter(session, lineage=f"km:{foreign.id}", document_id=foreign.id)


def test_delete_aliased_adapter_refused(session: Session) -> None:
    adapter = make_adapter(session)
    alias_repo.set_alias(session, "prod", adapter.id)
    with pytest.raises(AdapterInUseError, match="alias\\(es\\) prod; move or delete"):
        adapter_repo.delete_adapter(session, adapter.id)
    alias_repo.delete_alias(session, "prod")
    adapter_repo.delete_adapter(session, adapter.id)
    with pytest.raises(NotFoundError):
        adapter_repo.get_adapter(session, adapter.id)


def test_update_metrics_merges(session: Session) -> None:
    adapter = make_adapter(session, metrics={"steps": 10})
    adapter_repo.update_metrics(session, adapter.id, {"dev_loss": 0.4})
    assert adapter_repo.get_adapter(session, adapter.id).metrics == {"steps": 10, "dev_loss": 0.4}


def test_referenced_digests_and_uris(session: Session) -> None:
    adapter = make_adapter(session, metrics={"loss_curve_uri": "store://blobs/curve.png", "steps": 3})
    doc = make_document(session, text_uri="store://blobs/abc")
    doc.artifacts = {"chunks": "store://blobs/chunks", "synthetic": {"k1": {"uri": "store://blobs/syn", "n": 2}}}
    session.flush()
    assert adapter.sha256 in adapter_repo.referenced_digests(session)
    uris = adapter_repo.referenced_uris(session)
    assert adapter.uri in uris and doc.text_uri in uris
    assert {"store://blobs/chunks", "store://blobs/syn", "store://blobs/curve.png"} <= uris


# --- aliases ----------------------------------------------------------------------------------------------------


def test_alias_move_is_hot_swap(session: Session) -> None:
    v1 = make_adapter(session)
    v2 = make_adapter(session, lineage=v1.lineage, document_id=v1.document_id)
    before = utcnow()
    alias = alias_repo.set_alias(session, v1.lineage, v1.id)
    assert alias.revision == 1 and alias_repo.resolve_alias(session, v1.lineage).id == v1.id
    moved = alias_repo.set_alias(session, v1.lineage, v2.id)
    assert moved.revision == 2 and alias_repo.resolve_alias(session, v1.lineage).version == 2
    assert alias_repo.set_alias(session, v1.lineage, v2.id).revision == 2  # same target: no move
    assert v1.lineage in [a.name for a in alias_repo.aliases_changed_since(session, before)]


def test_alias_to_foreign_adapter_refused(session: Session) -> None:
    theirs = make_adapter(session, tenant="other")
    with pytest.raises(NotFoundError):
        alias_repo.set_alias(session, "mine", theirs.id)


def test_list_and_delete_aliases(session: Session) -> None:
    adapter = make_adapter(session, tenant="aliasing")
    for name in ("b", "a"):
        alias_repo.set_alias(session, name, adapter.id, tenant="aliasing")
    assert [a.name for a in alias_repo.list_aliases(session, tenant="aliasing")] == ["a", "b"]
    alias_repo.delete_alias(session, "a", tenant="aliasing")
    with pytest.raises(NotFoundError, match="alias a was not found"):
        alias_repo.delete_alias(session, "a", tenant="aliasing")


# --- API keys ---------------------------------------------------------------------------------------------------


def test_api_key_lifecycle(session: Session) -> None:
    key, plaintext = key_repo.create_api_key(session, "ci", ["query", "upload"])
    assert plaintext.startswith("kms_") and key.prefix == plaintext[:12]
    assert key.key_hash != plaintext and plaintext not in key.key_hash
    found = key_repo.authenticate(session, plaintext)
    assert found is not None and found.id == key.id
    assert key_repo.last_use_is_stale(found)
    key_repo.touch_api_key(session, key.id)
    assert found.last_used_at is not None and not key_repo.last_use_is_stale(found)
    assert key_repo.last_use_is_stale(found, found.last_used_at + key_repo.LAST_USED_RESOLUTION * 2)
    assert key_repo.has_scope(found, key_repo.Scope.QUERY)
    assert not key_repo.has_scope(found, key_repo.Scope.ADMIN)
    key_repo.revoke_api_key(session, key.id)
    assert key_repo.authenticate(session, plaintext) is None
    assert key.id not in [k.id for k in key_repo.list_api_keys(session)]
    assert key.id in [k.id for k in key_repo.list_api_keys(session, include_revoked=True)]


def test_admin_scope_grants_all(session: Session) -> None:
    key, _ = key_repo.create_api_key(session, "root", ["admin"])
    assert all(key_repo.has_scope(key, scope) for scope in key_repo.Scope if scope is not key_repo.Scope.OPERATOR)
    assert not key_repo.has_scope(key, key_repo.Scope.OPERATOR)
    assert key_repo.count_admin_keys(session) >= 1


def test_unknown_scope_refused(session: Session) -> None:
    with pytest.raises(InvalidScopeError, match="unknown scope 'root'"):
        key_repo.create_api_key(session, "bad", ["root"])


def test_wrong_key_does_not_authenticate(session: Session) -> None:
    key_repo.create_api_key(session, "x", ["query"])
    assert key_repo.authenticate(session, "kms_not-a-real-key") is None


def test_revoke_foreign_key_not_found(session: Session) -> None:
    key, _ = key_repo.create_api_key(session, "t", ["query"], tenant="other")
    with pytest.raises(NotFoundError):
        key_repo.revoke_api_key(session, key.id)


def test_revise_document_keeps_its_id_and_drops_derived_artifacts(session: Session) -> None:
    doc = make_document(session, tenant="rev")
    doc.artifacts = {"chunks": "store://blobs/old"}
    new = doc_repo.DocumentCreate("v2 title", doc_repo.content_hash("new text"), 8, text_uri="store://blobs/new",
                                  tenant="rev")
    revised, changed = doc_repo.revise_document(session, doc.id, new)
    assert changed
    assert (revised.id, revised.revision, revised.title, revised.artifacts) == (doc.id, 2, "v2 title", {})
    assert revised.status is DocumentStatus.PENDING
    again, changed_again = doc_repo.revise_document(session, doc.id, new)
    assert not changed_again and again.revision == 2


def test_revise_to_another_documents_content_is_refused(session: Session) -> None:
    from registry.errors import DuplicateError

    first = make_document(session, tenant="rev2")
    second = make_document(session, tenant="rev2")
    clash = doc_repo.DocumentCreate("x", first.content_hash, 1, tenant="rev2")
    with pytest.raises(DuplicateError):
        doc_repo.revise_document(session, second.id, clash)

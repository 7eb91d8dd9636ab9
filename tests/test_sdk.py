"""The Python SDK against the real app: async over ASGITransport, sync over a real uvicorn server on loopback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

import clients.sdk as sdk
from clients.sdk import AsyncKmClient, KmClient, RetryPolicy
from registry.config import Settings
from registry.errors import MSG_NOT_FOUND
from tests.live_server import free_port, serve
from tests.tiny import save_lora_for

TEXT = "Varo is a small island nation. The capital of Varo is Meluna. Varo was founded by Tamsin Orel in 1602."
NO_TRAIN = {"method": "none"}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[tuple[str, str]]:
    """A real server (no worker) on loopback: its URL and admin key."""
    from server.app import create_app

    settings = Settings(data_dir=tmp_path_factory.mktemp("sdk") / "data", base_model=str(tiny_model_dir),
                        model_name="kmserve-tiny")
    with serve(create_app(settings)) as url:
        yield url, settings.admin_key_file.read_text().strip()


@pytest.fixture
def km(live: tuple[str, str]) -> Iterator[KmClient]:
    with KmClient(live[0], live[1], max_retries=0) as client:
        yield client


def test_all_names_every_public_object_and_nothing_else() -> None:
    public = {name for name, value in vars(sdk).items() if not name.startswith("_") and not hasattr(value, "__path__")
              and getattr(value, "__module__", "").startswith("clients.sdk")}
    assert sorted(sdk.__all__) == sdk.__all__
    assert set(sdk.__all__) == public
    errors = [getattr(sdk, name) for name in sdk.__all__ if name.endswith("Error")]
    assert all(issubclass(error, sdk.KmError) for error in errors)


def test_importing_the_sdk_loads_neither_torch_nor_the_server() -> None:
    code = ("import sys, clients.sdk; print(','.join(m for m in ('server', 'torch', 'engines', 'trainer_worker', "
            "'registry') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_documents_query_and_errors_over_loopback(km: KmClient, live: tuple[str, str], tmp_path: Path) -> None:
    path = tmp_path / "varo.txt"
    path.write_text(TEXT)
    doc = km.documents.upload_file(path, title="Varo", train=NO_TRAIN)
    assert (doc.created, doc.title, [job.kind for job in doc.jobs]) == (True, "Varo", ["ingest"])
    assert km.documents.upload_text("Again", TEXT).id == doc.id
    assert km.documents.get(doc.id).jobs[0].id == doc.jobs[0].id
    assert doc.id in [d.id for d in km.documents.list().data]
    with pytest.raises(sdk.NotFoundError) as missing:
        km.documents.get(987654)
    assert missing.value.status == 404
    assert missing.value.message == MSG_NOT_FOUND.format(what="document", ref=987654)
    assert missing.value.message == httpx.get(f"{live[0]}/v1/documents/987654",
                                              headers={"X-API-Key": live[1]}).json()["error"]["message"]
    with pytest.raises(sdk.UnprocessableError, match="document_id or km"):
        km.query("q")
    km.documents.delete(doc.id)
    with pytest.raises(sdk.NotFoundError):
        km.documents.get(doc.id)


def test_query_answers_and_streams(km: KmClient) -> None:
    model = km.engine().base_model
    whole = km.query("What is the capital of Varo?", km=model, max_tokens=6)
    assert whole.adapters == {"km": None, "ke": None}
    assert whole.usage.completion_tokens >= 1
    stream = km.query("What is the capital of Varo?", km=model, max_tokens=6, stream=True)
    deltas = "".join(stream)
    assert stream.result is not None
    assert deltas.strip() == whole.answer == stream.result.answer


def test_jobs_cancel_events_and_wait(km: KmClient) -> None:
    doc = km.documents.upload_text("Jobs", "A document for the job test.", train=NO_TRAIN)
    job_id = doc.jobs[0].id
    assert km.jobs.cancel(job_id).status == "cancelled"
    items = list(km.jobs.events(job_id))
    assert isinstance(items[-1], sdk.Job)
    assert items[-1].status == "cancelled"
    assert {e.type for e in items[:-1] if isinstance(e, sdk.JobEvent)} >= {"cancelled"}
    assert km.jobs.wait(job_id, timeout=5).status == "cancelled"
    with pytest.raises(sdk.ConflictError):
        km.jobs.cancel(job_id)
    assert km.admin_jobs.retry(job_id).status == "queued"
    assert job_id in [j.id for j in km.admin_jobs.list(document_id=doc.id).data]
    with pytest.raises(sdk.TimeoutError, match="still queued"):
        km.jobs.wait(job_id, timeout=0.2, poll=0.05)


def test_adapters_aliases_engine(km: KmClient, tiny_model_dir: Path, tmp_path: Path) -> None:
    doc = km.documents.upload_text("Adapters", "A document whose KM is uploaded.", train=NO_TRAIN)
    lora = save_lora_for(tiny_model_dir, tmp_path / "lora", seed=1)
    adapter = km.adapters.upload(lora, kind="km", document_id=doc.id)
    assert (adapter.kind, adapter.lineage, adapter.version) == ("km", f"km:{doc.id}", 1)
    assert km.adapters.get(adapter.id).aliases == [f"km:{doc.id}"]
    assert km.aliases.set("best", adapter.id).adapter_id == adapter.id
    assert "best" in [a.name for a in km.aliases.list().data]
    assert km.adapters.load(adapter.id, pin=True).pinned
    assert adapter.id in [a.id for a in km.engine().adapters]
    assert not km.adapters.unload(adapter.id).loaded
    assert km.query("Who?", document_id=doc.id, max_tokens=4).adapters["km"]["version"] == 1  # type: ignore[index]
    km.aliases.delete("best")
    with pytest.raises(sdk.ConflictError):
        km.adapters.delete(adapter.id)  # km:<doc> still points at it


def test_keys_scopes_and_authentication(km: KmClient, live: tuple[str, str]) -> None:
    created = km.keys.create("reader", ["query"])
    assert created.key and created.scopes == ["query"]
    assert created.id in [k.id for k in km.keys.list().data]
    with KmClient(live[0], created.key) as reader:
        assert reader.documents.list().count >= 0
        with pytest.raises(sdk.PermissionDeniedError):
            reader.keys.list()
    assert km.keys.revoke(created.id).revoked_at is not None
    with KmClient(live[0], created.key) as revoked, pytest.raises(sdk.AuthenticationError):
        revoked.documents.list()


def test_unreachable_server_is_a_connection_error() -> None:
    with KmClient(f"http://127.0.0.1:{free_port()}", "k", max_retries=0) as km, pytest.raises(sdk.ConnectionError):
        km.documents.list()


def _flaky(failures: int, fail: Callable[[httpx.Request], httpx.Response]) -> tuple[list[str], httpx.MockTransport]:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        if len(seen) <= failures:
            return fail(request)
        return httpx.Response(200, json={"data": [], "count": 0})

    return seen, httpx.MockTransport(handler)


def _unavailable(_: httpx.Request) -> httpx.Response:
    return httpx.Response(503, json={"error": {"code": "unavailable", "message": "warming up"}})


def _refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("refused", request=request)


def _mock_client(transport: httpx.MockTransport) -> KmClient:
    return KmClient("http://km.test", "k", retry=RetryPolicy(max_retries=2, backoff=0),
                    http_client=httpx.Client(transport=transport))


@pytest.mark.parametrize("fail", [_unavailable, _refused])
def test_idempotent_calls_are_retried(fail: Callable[[httpx.Request], httpx.Response]) -> None:
    seen, transport = _flaky(2, fail)
    assert _mock_client(transport).keys.list().count == 0
    assert seen == ["GET", "GET", "GET"]


def test_retries_give_up_with_the_last_error() -> None:
    seen, transport = _flaky(5, _unavailable)
    with pytest.raises(sdk.ServiceUnavailableError, match="warming up") as error:
        _mock_client(transport).documents.list()
    assert (error.value.status, error.value.code, len(seen)) == (503, "unavailable", 3)


def test_posts_are_never_retried() -> None:
    seen, transport = _flaky(1, _unavailable)
    with pytest.raises(sdk.ServiceUnavailableError):
        _mock_client(transport).keys.create("k", ["query"])
    seen_refused, refused = _flaky(1, _refused)
    with pytest.raises(sdk.ConnectionError):
        _mock_client(refused).train("train_ke", {"name": "x"})
    assert seen == seen_refused == ["POST"]


def test_async_client_against_the_app_over_asgi(client: TestClient, app_settings: Settings) -> None:
    key = app_settings.admin_key_file.read_text().strip()

    async def scenario() -> dict[str, Any]:
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=client.app))
        async with http, AsyncKmClient("http://kmserve.test", key, http_client=http) as km:
            doc = await km.documents.upload_text("Async", TEXT, train=NO_TRAIN)
            listed = await km.documents.list()
            job = await km.jobs.cancel(doc.jobs[0].id)
            events = [item async for item in km.jobs.events(job.id)]
            model = (await km.engine()).base_model
            answer = await km.query("Capital?", km=model, max_tokens=4)
            stream = await km.query("Capital?", km=model, max_tokens=4, stream=True)
            deltas = "".join([delta async for delta in stream])
            with pytest.raises(sdk.NotFoundError, match="987654"):
                await km.jobs.get(987654)
            key_made = await km.keys.create("async", ["upload"])
            return {"doc": doc, "listed": listed, "events": events, "answer": answer, "deltas": deltas,
                    "stream": stream, "key": key_made, "aliases": await km.aliases.list()}

    assert client.portal is not None
    got = client.portal.call(scenario)
    assert got["doc"].id in [d.id for d in got["listed"].data]
    assert isinstance(got["events"][-1], sdk.Job) and got["events"][-1].status == "cancelled"
    assert got["deltas"].strip() == got["answer"].answer == got["stream"].result.answer
    assert got["key"].scopes == ["upload"]
    assert got["aliases"].count >= 0

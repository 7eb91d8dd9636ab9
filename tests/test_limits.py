"""Request limits on the real app: per-key rate limits, per-tenant training-job quotas, token limits and request
deadlines (the tiny model generates ~500 tokens/s on one CPU thread, so 1,800 tokens outlast a 1.5 s deadline)."""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from engines.base import ChatMessage, GenerationRequest
from engines.errors import MSG_CONTEXT_LENGTH
from engines.hf_loading import encode_request
from engines.prompts import reader_prompt
from registry.config import Settings
from registry.errors import NotFoundError
from registry.models import Job, JobStatus
from server.app import create_app
from server.limits import (
    JOB_QUOTA_RETRY_AFTER_BOUNDS,
    JOB_QUOTA_RETRY_AFTER_SECONDS,
    MSG_JOB_QUOTA,
    MSG_RATE_LIMITED,
    MSG_REQUEST_TIMEOUT,
    RateLimit,
    RateLimitedError,
    RateLimiter,
    RouteKind,
    quota_retry_after,
    route_kind,
)
from server.services.generation import MSG_PROMPT_TOO_LONG
from server.state import AppState
from tests.live_server import serve
from tests.served import admin_headers, slow_forward

torch.set_num_threads(1)

SLOW_TOKENS = 1800  # at least 9 s of generation under slow_forward: far past the deadlines below
DEADLINE = 1.5
# Greedy outputs of the tiny model that run to max_tokens without meeting EOS (checked; others stop early).
LONG_QUESTION = "What is the capital of France?"
LONG_CHAT = "Varo?"


@contextmanager
def app_client(settings: Settings, **overrides: Any) -> Iterator[tuple[TestClient, AppState, dict[str, str]]]:
    """The real app with `overrides` applied to its settings, its state and admin headers."""
    with TestClient(create_app(settings.model_copy(update=overrides))) as client:
        state: AppState = client.app.state.kmserve  # type: ignore[attr-defined]
        yield client, state, admin_headers(state)


# -- rate limits ---------------------------------------------------------------------------------------------


def test_bucket_allows_the_burst_then_the_rate_and_counts_keys_and_route_classes_apart() -> None:
    now = [100.0]
    limiter = RateLimiter(RateLimit.of(1.0, 2), RateLimit.of(0.5, 0), clock=lambda: now[0], max_buckets=2)
    limiter.check("a", RouteKind.QUERY)
    limiter.check("a", RouteKind.GENERATE)  # the same bucket as QUERY
    with pytest.raises(RateLimitedError) as refused:
        limiter.check("a", RouteKind.QUERY)
    assert refused.value.retry_after == 1
    limiter.check("a", RouteKind.UPLOAD)  # its own bucket: burst 0 means twice the rate, here 1
    limiter.check("a", RouteKind.EXEMPT)
    now[0] += 0.5
    with pytest.raises(RateLimitedError):
        limiter.check("a", RouteKind.QUERY)
    now[0] += 0.5
    limiter.check("a", RouteKind.QUERY)
    with pytest.raises(RateLimitedError) as upload:
        limiter.check("a", RouteKind.UPLOAD)
    assert upload.value.retry_after == 1  # half a token refilled at 0.5/s: one more second
    limiter.check("b", RouteKind.QUERY)  # a third bucket evicts the least recently used ("a", QUERY)
    limiter.check("a", RouteKind.QUERY)
    limiter.check("a", RouteKind.QUERY)


def test_route_classes() -> None:
    assert route_kind("GET", "/healthz") is RouteKind.EXEMPT
    assert route_kind("GET", "/metrics") is RouteKind.EXEMPT
    assert route_kind("POST", "/v1/chat/completions") is RouteKind.GENERATE
    assert route_kind("POST", "/v1/documents") is RouteKind.UPLOAD
    assert route_kind("POST", "/v1/jobs/3/cancel") is RouteKind.UPLOAD
    assert route_kind("GET", "/admin/jobs") is RouteKind.UPLOAD
    assert route_kind("GET", "/v1/documents") is RouteKind.QUERY
    assert route_kind("GET", "/v1/jobs/3/events") is RouteKind.QUERY


def test_rate_limit_per_key_with_retry_after_and_exempt_probes(app_settings: Settings) -> None:
    limits = {"rate_limit_rps": 0.2, "rate_limit_burst": 2, "upload_rate_limit_rps": 0.2, "upload_rate_limit_burst": 1}
    with app_client(app_settings, **limits) as (client, _, admin):
        created = client.post("/admin/keys", json={"name": "reader", "scopes": ["query"]}, headers=admin)
        assert created.status_code == 201
        other = {"Authorization": f"Bearer {created.json()['key']}"}
        admin_refused = client.get("/admin/keys", headers=admin)  # the admin key's upload bucket is empty
        models = [client.get("/v1/models", headers=admin).status_code for _ in range(2)]
        refused = client.get("/v1/models", headers=admin)
        others = client.get("/v1/models", headers=other)
        probes = {client.get(path, headers=admin).status_code for path in ("/healthz", "/readyz", "/metrics") * 3}
    assert (admin_refused.status_code, models, refused.status_code, others.status_code) == (429, [200, 200], 429, 200)
    assert probes == {200}
    retry_after = int(refused.headers["retry-after"])
    assert retry_after in (4, 5)  # (1 token) / (0.2 tokens/s), less the time since the bucket emptied
    assert refused.json()["error"] == {"code": "rate_limited", "message": MSG_RATE_LIMITED.format(
        rate=0.2, burst=2, kind="query", retry_after=retry_after)}
    assert admin_refused.json()["error"]["message"] == MSG_RATE_LIMITED.format(
        rate=0.2, burst=1, kind="upload", retry_after=int(admin_refused.headers["retry-after"]))


def test_rate_limits_are_off_by_default(client: TestClient, state: AppState) -> None:
    statuses = {client.get("/v1/models", headers=admin_headers(state)).status_code for _ in range(30)}
    assert statuses == {200}


# -- job quotas ----------------------------------------------------------------------------------------------

DB_PARAMS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def _upload(client: TestClient, headers: dict[str, str], text: str, method: str = "lm") -> httpx.Response:
    return client.post("/v1/documents", json={"title": text[:20], "text": text, "train": {"method": method}},
                       headers=headers)


def _quota_refusal(response: httpx.Response, active: int, limit: int) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["retry-after"] == str(JOB_QUOTA_RETRY_AFTER_SECONDS)
    assert response.json()["error"] == {"code": "job_quota_exceeded", "message": MSG_JOB_QUOTA.format(
        tenant="default", active=active, limit=limit)}


def test_job_quota_retry_after_is_when_the_first_active_training_job_should_end(session: Session) -> None:
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def job(status: JobStatus, kind: str = "train_km", tenant: str = "t", started: float | None = None,
            finished: float | None = None, progress: float = 0.0) -> None:
        at = {name: now - timedelta(seconds=ago) for name, ago in (("started_at", started), ("finished_at", finished))
              if ago is not None}
        session.add(Job(tenant=tenant, kind=kind, status=status, progress=progress, **at))
        session.flush()

    assert quota_retry_after(session, "t", now) == JOB_QUOTA_RETRY_AFTER_SECONDS  # nothing to go by
    job(JobStatus.SUCCEEDED, started=1000, finished=900)  # ran 100 s
    job(JobStatus.SUCCEEDED, started=800, finished=500)  # ran 300 s
    job(JobStatus.SUCCEEDED, started=400, finished=200)  # ran 200 s: median 200 s
    job(JobStatus.SUCCEEDED, kind="reindex", started=5000, finished=0)  # not training: ignored
    job(JobStatus.SUCCEEDED, tenant="other", started=9000, finished=0)  # another tenant's: ignored
    job(JobStatus.QUEUED)
    assert quota_retry_after(session, "t", now) == 200  # nothing running yet: one median run time
    job(JobStatus.RUNNING, started=50, progress=0.01)  # too little progress to extrapolate
    assert quota_retry_after(session, "t", now) == 150  # the median less its 50 s so far
    job(JobStatus.RUNNING, started=60, progress=0.4)  # 60 s for 40%: 90 s to go
    job(JobStatus.RUNNING, started=30, progress=0.2)  # 30 s for 20%: 120 s to go
    assert quota_retry_after(session, "t", now) == 90
    job(JobStatus.RUNNING, started=999, progress=0.999)
    assert quota_retry_after(session, "t", now) == JOB_QUOTA_RETRY_AFTER_BOUNDS[0]
    job(JobStatus.RUNNING, tenant="slow", started=10, progress=0.001)
    job(JobStatus.SUCCEEDED, tenant="slow", started=99_000, finished=0)
    assert quota_retry_after(session, "slow", now) == JOB_QUOTA_RETRY_AFTER_BOUNDS[1]


@pytest.mark.parametrize("fresh_db_url", DB_PARAMS, indirect=True)
def test_job_quota_refuses_uploads_training_and_retries_leaving_nothing(
    app_settings: Settings, fresh_db_url: str
) -> None:
    with app_client(app_settings, database_url=fresh_db_url, max_active_jobs_per_tenant=1) as (client, state, admin):
        first = _upload(client, admin, "Varo is the capital of the island of Kelm.")
        assert first.status_code == 202
        refused_text = "Kelm exports salt and amber."
        _quota_refusal(_upload(client, admin, refused_text), active=1, limit=1)
        assert client.get("/v1/documents", headers=admin).json()["count"] == 1
        with pytest.raises(NotFoundError):  # refused before its blob was written
            state.store.get_blob(hashlib.sha256(refused_text.encode()).hexdigest())
        assert _upload(client, admin, "Untrained notes.", method="none").status_code == 202
        assert _upload(client, admin, "Varo is the capital of the island of Kelm.").status_code == 200

        _quota_refusal(client.post("/admin/train", json={"kind": "train_ke", "payload": {}}, headers=admin), 1, 1)
        train_km = next(j for j in first.json()["jobs"] if j["kind"] == "train_km")
        assert client.post(f"/v1/jobs/{train_km['id']}/cancel", headers=admin).json()["status"] == "cancelled"
        ke = client.post("/admin/train", json={"kind": "train_ke", "payload": {}}, headers=admin)
        assert ke.status_code == 202
        _quota_refusal(client.post(f"/admin/jobs/{train_km['id']}/retry", headers=admin), active=1, limit=1)
        assert client.get(f"/v1/jobs/{train_km['id']}", headers=admin).json()["status"] == "cancelled"
        client.post(f"/v1/jobs/{ke.json()['id']}/cancel", headers=admin)
        retried = client.post(f"/admin/jobs/{train_km['id']}/retry", headers=admin)
        assert (retried.status_code, retried.json()["status"]) == (200, "queued")
        jobs = client.get("/admin/jobs", params={"limit": 500}, headers=admin).json()["data"]
    assert sorted(j["kind"] for j in jobs) == ["ingest", "ingest", "train_ke", "train_km"]


def test_revising_a_document_counts_its_own_training_as_freed(app_settings: Settings) -> None:
    with app_client(app_settings, max_active_jobs_per_tenant=1) as (client, _, admin):
        trained = _upload(client, admin, "Varo is the capital of Kelm.").json()
        untrained = _upload(client, admin, "Plain notes.", method="none").json()
        body = {"title": "Notes", "text": "Plain notes, revised.", "train": {"method": "lm"}}
        refused = client.put(f"/v1/documents/{untrained['id']}", json=body, headers=admin)
        kept = client.get(f"/v1/documents/{untrained['id']}", headers=admin).json()
        body = {"title": "Varo", "text": "Varo is the old capital of Kelm.", "train": {"method": "lm"}}
        revised = client.put(f"/v1/documents/{trained['id']}", json=body, headers=admin)
        jobs = client.get("/admin/jobs", params={"kind": "train_km"}, headers=admin).json()["data"]
    _quota_refusal(refused, active=1, limit=1)
    assert (kept["revision"], [j["kind"] for j in kept["jobs"]]) == (untrained["revision"], ["ingest"])
    assert revised.status_code == 202 and revised.json()["revision"] == trained["revision"] + 1
    assert sorted(j["status"] for j in jobs) == ["cancelled", "queued"]


@pytest.mark.parametrize("fresh_db_url", DB_PARAMS, indirect=True)
def test_concurrent_uploads_never_exceed_the_quota(app_settings: Settings, fresh_db_url: str) -> None:
    app = create_app(app_settings.model_copy(update={"database_url": fresh_db_url, "max_active_jobs_per_tenant": 2}))
    with serve(app) as url:
        headers = admin_headers(app.state.kmserve)
        start = threading.Barrier(6)

        def upload(n: int) -> int:
            with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
                start.wait()
                body = {"title": f"doc {n}", "text": f"Document number {n} is about the salt trade.",
                        "train": {"method": "lm"}}
                return http.post("/v1/documents", json=body).status_code

        with ThreadPoolExecutor(6) as pool:
            statuses = sorted(pool.map(upload, range(6)))
        with httpx.Client(base_url=url, headers=headers) as http:
            documents = http.get("/v1/documents").json()["count"]
            training = http.get("/admin/jobs", params={"kind": "train_km"}).json()["count"]
    assert statuses == [202, 202, 429, 429, 429, 429]
    assert (documents, training) == (2, 2)


# -- token limits --------------------------------------------------------------------------------------------


def _tokens(state: AppState, request: GenerationRequest) -> int:
    assert state.generator is not None
    return len(encode_request(state.generator.tokenizer, request))


@pytest.mark.parametrize("stream", [False, True])
def test_over_long_prompts_and_max_tokens_are_refused_before_generation(app_settings: Settings, stream: bool) -> None:
    question, prompt = "Where is Varo? " * 8, "Varo is " * 12
    with app_client(app_settings, max_prompt_tokens=32) as (client, state, admin):
        model = state.base_model_id
        query = client.post("/v1/query", json={"km": model, "question": question, "stream": stream}, headers=admin)
        chat = client.post("/v1/chat/completions", headers=admin, json={
            "model": model, "messages": [{"role": "user", "content": question}], "stream": stream})
        completion = client.post("/v1/completions", json={"model": model, "prompt": prompt, "stream": stream},
                                 headers=admin)
        too_many = client.post("/v1/chat/completions", headers=admin, json={
            "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4096, "stream": stream})
        chat_tokens = _tokens(state, GenerationRequest(messages=(ChatMessage("user", question),)))
        query_tokens = _tokens(state, GenerationRequest(messages=(ChatMessage("user", reader_prompt(question)),)))
        prompt_tokens = _tokens(state, GenerationRequest(prompt=prompt))
    for response, tokens in ((query, query_tokens), (chat, chat_tokens), (completion, prompt_tokens)):
        assert response.status_code == 400, response.text
        assert response.json()["error"] == {"code": "prompt_too_long",
                                            "message": MSG_PROMPT_TOO_LONG.format(tokens=tokens, limit=32)}
    assert (too_many.status_code, too_many.json()["error"]["code"]) == (422, "max_tokens_too_large")


def test_prompt_plus_max_tokens_over_the_context_is_400_even_when_streaming(client: TestClient,
                                                                            state: AppState) -> None:
    tokens = _tokens(state, GenerationRequest(messages=(ChatMessage("user", "hi"),)))
    max_tokens = 2048 - tokens + 1  # the tiny model's context is 2048 tokens: one too many
    response = client.post("/v1/chat/completions", headers=admin_headers(state), json={
        "model": state.base_model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
        "stream": True})
    assert response.status_code == 400
    assert response.json()["error"] == {"code": "context_length_exceeded", "message": MSG_CONTEXT_LENGTH.format(
        prompt_tokens=tokens, max_tokens=max_tokens, limit=2048)}


# -- request deadlines ---------------------------------------------------------------------------------------


def _forward_calls(state: AppState) -> int:
    assert state.generator is not None
    return state.generator.stats().forward_calls


def _warm_up(client: TestClient, state: AppState, admin: dict[str, str]) -> int:
    """One short generation (the first forward passes are slow), then the engine's forward-pass count."""
    response = client.post("/v1/completions", json={"model": state.base_model_id, "prompt": "Varo", "max_tokens": 4},
                           headers=admin)
    assert response.status_code == 200
    return _forward_calls(state)


def _engine_stops(state: AppState, calls_before: int) -> int:
    """The aborted request left the engine mid-generation: nothing running or queued, no forward pass any more.

    Returns the forward passes it made (one per generated token), which must be well short of SLOW_TOKENS.
    """
    assert state.generator is not None
    deadline = time.monotonic() + 5
    while (stats := state.generator.stats()).running or stats.queued:
        assert time.monotonic() < deadline, f"engine still busy: {stats}"
        time.sleep(0.02)
    calls = _forward_calls(state)
    time.sleep(0.3)
    assert _forward_calls(state) == calls
    assert 0 < calls - calls_before < SLOW_TOKENS
    return calls - calls_before


def test_generation_past_the_deadline_is_504_and_aborted(app_settings: Settings) -> None:
    with slow_forward(), app_client(app_settings, request_timeout_seconds=DEADLINE) as (client, state, admin):
        before = _warm_up(client, state, admin)
        start = time.monotonic()
        response = client.post("/v1/query", json={"km": state.base_model_id, "question": LONG_QUESTION,
                                                  "max_tokens": SLOW_TOKENS}, headers=admin)
        elapsed = time.monotonic() - start
        tokens = _engine_stops(state, before)
        after = client.post("/v1/completions", json={"model": state.base_model_id, "prompt": "Varo", "max_tokens": 4},
                            headers=admin)
    print(f"504 after {elapsed:.2f} s (deadline {DEADLINE} s), generation stopped after {tokens} tokens")
    assert response.status_code == 504
    assert response.json()["error"] == {"code": "request_timeout",
                                        "message": MSG_REQUEST_TIMEOUT.format(seconds=DEADLINE)}
    assert elapsed < DEADLINE + 1.5
    assert after.status_code == 200  # a fresh request gets its own deadline and the freed slot


def _sse_data(text: str) -> list[Any]:
    lines = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def test_streams_past_the_deadline_end_with_an_error_event(app_settings: Settings) -> None:
    timeout = {"code": "request_timeout", "message": MSG_REQUEST_TIMEOUT.format(seconds=DEADLINE)}
    with slow_forward(), app_client(app_settings, request_timeout_seconds=DEADLINE) as (client, state, admin):
        before = _warm_up(client, state, admin)
        query = client.post("/v1/query", headers=admin, json={
            "km": state.base_model_id, "question": LONG_QUESTION, "max_tokens": SLOW_TOKENS, "stream": True})
        before += _engine_stops(state, before)
        chat = client.post("/v1/chat/completions", headers=admin, json={
            "model": state.base_model_id, "messages": [{"role": "user", "content": LONG_CHAT}],
            "max_tokens": SLOW_TOKENS, "temperature": 0, "stream": True})
        _engine_stops(state, before)
    assert query.status_code == chat.status_code == 200
    assert "event: delta" in query.text and "event: done" not in query.text
    assert "event: error" in query.text and _sse_data(query.text)[-1] == {"error": timeout}
    events = _sse_data(chat.text)
    assert events[-2:] == [{"error": timeout}, "[DONE]"]
    assert not any(isinstance(e, dict) and e.get("choices") and e["choices"][0]["finish_reason"] for e in events)


def test_a_slow_upload_is_not_cut_by_the_request_deadline(app_settings: Settings) -> None:
    app = create_app(app_settings.model_copy(update={"request_timeout_seconds": 0.2}))
    body = json.dumps({"title": "Slow", "text": "Varo is the capital of Kelm. " * 2000, "train": {"method": "none"}})
    parts = [body[i:i + len(body) // 6 + 1].encode() for i in range(0, len(body), len(body) // 6 + 1)]

    def trickle() -> Iterator[bytes]:
        for part in parts:
            time.sleep(0.15)
            yield part

    with serve(app) as url:
        headers = {**admin_headers(app.state.kmserve), "content-type": "application/json"}
        start = time.monotonic()
        response = httpx.post(f"{url}/v1/documents", content=trickle(), headers=headers, timeout=30)
        elapsed = time.monotonic() - start
    assert elapsed > 0.2 * 3
    assert response.status_code == 202, response.text
    assert response.json()["size_bytes"] == len(json.loads(body)["text"].encode())


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    limiter = RateLimiter(RateLimit.of(0.3, 1), RateLimit.of(0, 0), clock=lambda: 0.0)
    limiter.check("k", RouteKind.QUERY)
    with pytest.raises(RateLimitedError) as refused:
        limiter.check("k", RouteKind.QUERY)
    assert refused.value.retry_after == math.ceil(1 / 0.3) == 4

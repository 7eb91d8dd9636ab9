"""The server process: migrates on start, bootstraps an admin key, answers health checks (ASGI and real HTTP)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from registry.config import Settings
from registry.db import head_revision
from server.app import create_app


@pytest.fixture
def settings(app_settings: Settings) -> Settings:
    return app_settings


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_reports_migrated_database(client: TestClient) -> None:
    body = client.get("/readyz").json()
    assert body == {"status": "ready", "database": "sqlite", "schema_revision": head_revision()}


def test_metrics_is_prometheus_text(client: TestClient) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    client.get("/healthz")
    text = client.get("/metrics").text
    assert 'kmserve_http_requests_total{method="GET",route="/healthz",status="200"} 1.0' in text


def test_metrics_behind_a_token_refuse_callers_without_it(settings: Settings) -> None:
    guarded = settings.model_copy(update={"metrics_token": SecretStr("scrape-me")})
    with TestClient(create_app(guarded)) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic scrape-me"},
                        {"Authorization": "Bearer scrape-mee"}):
            response = client.get("/metrics", headers=headers)
            assert response.status_code == 401, headers
            assert response.json()["error"]["code"] == "unauthorized"
            assert "KMSERVE_METRICS_TOKEN" in response.json()["error"]["message"]
        response = client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
        assert response.status_code == 200 and "kmserve_http_requests_total" in response.text
        assert client.get("/healthz").status_code == 200  # only /metrics is guarded


def test_unknown_route_is_json_error(client: TestClient) -> None:
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_first_start_writes_owner_only_admin_key(client: TestClient, settings: Settings) -> None:
    key_file = settings.admin_key_file
    assert key_file.read_text().strip().startswith("kms_")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_second_start_keeps_the_key(settings: Settings) -> None:
    with TestClient(create_app(settings)):
        first = settings.admin_key_file.read_text()
    with TestClient(create_app(settings)):
        assert settings.admin_key_file.read_text() == first


def test_auth_off_creates_no_key(app_settings: Settings) -> None:
    settings = app_settings.model_copy(update={"auth": "off"})
    with TestClient(create_app(settings)) as test_client:
        assert test_client.get("/healthz").status_code == 200
    assert not settings.admin_key_file.exists()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_kmserve_up_serves_healthz_over_http(tmp_path: Path) -> None:
    """What `make run` does: `kmserve up` migrates, builds the default model, prints URL and key location, serves."""
    port = _free_port()
    env = {**os.environ, "KMSERVE_DATA_DIR": str(tmp_path / "kms"), "KMSERVE_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "up"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        body = _wait_healthy(f"http://127.0.0.1:{port}/healthz", proc)
        assert body == {"status": "ok"}
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json()
        assert ready["schema_revision"] == head_revision()
        assert (tmp_path / "kms" / "kmserve.db").exists()
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}" in output
    assert "admin.key" in output


def _wait_healthy(url: str, proc: subprocess.Popen[str], timeout: float = 60.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"kmserve up exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            return httpx.get(url, timeout=2).json()
        except httpx.TransportError:
            time.sleep(0.2)
    pytest.fail(f"{url} did not answer within {timeout}s")


def test_declared_oversized_body_is_413_before_reading(app_settings: Settings) -> None:
    from server.errors import MSG_TOO_LARGE, MULTIPART_SLACK_BYTES

    limit = 1000
    with TestClient(create_app(app_settings.model_copy(update={"max_upload_bytes": limit}))) as small:
        body = b"x" * (limit + MULTIPART_SLACK_BYTES + 1)
        response = small.post("/admin/adapters", content=body, headers={"content-type": "application/octet-stream"})
    assert response.status_code == 413
    assert response.json()["error"]["message"] == MSG_TOO_LARGE.format(what="request body", limit=limit)

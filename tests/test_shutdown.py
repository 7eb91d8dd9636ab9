"""Graceful shutdown: SIGTERM drains requests in flight while new ones get 503, then the process exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from registry.config import Settings
from server.app import create_app
from server.shutdown import FINAL_GRACE_SECONDS, MSG_SHUTTING_DOWN, Drain, DrainingServer, app_drain
from tests.live_server import free_port
from tests.served import admin_headers, slow_forward

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
DRAIN_SECONDS = 45.0
# A greedy output of the tiny model that runs to max_tokens (no EOS): 1,200 tokens take 2-15 s on a busy CPU.
LONG_QUESTION = "What is the capital of France?"
IN_FLIGHT_TOKENS = 1200
SHUTTING_DOWN = {"code": "shutting_down", "message": MSG_SHUTTING_DOWN}


def test_drain_refuses_new_requests_and_ends_when_idle_or_out_of_time() -> None:
    now = [0.0]
    drain = Drain(clock=lambda: now[0])
    assert not drain.refuses("/readyz") and not drain.finished()
    with drain.track():
        drain.begin(10.0)
        assert drain.refuses("/readyz") and drain.refuses("/v1/query")
        assert not drain.refuses("/healthz") and not drain.refuses("/metrics")
        assert (drain.in_flight, drain.finished()) == (1, False)
        now[0] = 10.0
        assert drain.finished()  # out of time with one request still in flight
    assert Drain(clock=lambda: 0.0).finished() is False
    idle = Drain()
    idle.begin(10.0)
    assert idle.finished()  # nothing in flight: done at once


def test_a_draining_app_answers_503_except_liveness_and_metrics(client: TestClient) -> None:
    app_drain(client.app).begin(30.0)  # type: ignore[arg-type]
    ready = client.get("/readyz")
    query = client.post("/v1/query", json={"km": "kmserve-tiny", "question": "q"})
    assert (ready.status_code, query.status_code) == (503, 503)
    assert ready.json()["error"] == query.json()["error"] == SHUTTING_DOWN
    assert ready.headers["retry-after"] == "1" and ready.headers["connection"] == "close"
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200


class _Stream:
    """A streamed /v1/query in a thread: `started` once the first text arrives; status and events at the end."""

    def __init__(self, url: str, headers: dict[str, str], body: dict[str, Any]) -> None:
        self.started, self.finished = threading.Event(), threading.Event()
        self.status: int | None = None
        self.lines: list[str] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(url, headers, body), daemon=True)
        self._thread.start()

    def _run(self, url: str, headers: dict[str, str], body: dict[str, Any]) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/query", json=body, headers=headers, timeout=120) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    self.lines.append(line)
                    if line.startswith("event: delta"):
                        self.started.set()
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.started.set()
            self.finished.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the streamed request never ended"

    @property
    def done_event(self) -> str | None:
        """The data of the final `done` event, if it came."""
        for event, data in zip(self.lines, self.lines[1:], strict=False):
            if event == "event: done":
                return data
        return None


def _wait_healthy(url: str, proc: subprocess.Popen[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"kmserve serve exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} did not answer within {timeout}s")


def _wait_refusing(url: str, timeout: float = 5.0) -> httpx.Response:
    """/readyz once it reports the drain (the signal is handled between two bytecodes of the server)."""
    deadline = time.monotonic() + timeout
    while True:
        ready = httpx.get(f"{url}/readyz", timeout=5)
        if ready.status_code == 503 or time.monotonic() > deadline:
            return ready
        time.sleep(0.02)


def _serve_env(data_dir: Path, model_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSERVE_")}
    env.update(KMSERVE_DATA_DIR=str(data_dir), KMSERVE_BASE_MODEL=str(model_dir), KMSERVE_MODEL_NAME="kmserve-tiny",
               KMSERVE_SHUTDOWN_DRAIN_SECONDS=str(DRAIN_SECONDS), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


@pytest.mark.slow
def test_sigterm_lets_the_request_in_flight_finish_refuses_new_ones_and_exits_0(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "serve", "--port", str(port)], cwd=tmp_path,
                            env=_serve_env(tmp_path / "data", tiny_model_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_healthy(url, proc)
        headers = {"Authorization": f"Bearer {(tmp_path / 'data' / 'admin.key').read_text().strip()}"}
        body = {"km": "kmserve-tiny", "question": LONG_QUESTION, "max_tokens": IN_FLIGHT_TOKENS, "stream": True}
        stream = _Stream(url, headers, body)
        assert stream.started.wait(60) and stream.status == 200
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        ready = _wait_refusing(url)
        refused = httpx.post(f"{url}/v1/query", json={**body, "stream": False, "max_tokens": 4}, headers=headers)
        alive = httpx.get(f"{url}/healthz")
        still_in_flight = not stream.finished.is_set()
        stream.join(DRAIN_SECONDS)
        drained = time.monotonic() - signalled
        returncode = proc.wait(timeout=DRAIN_SECONDS)
        exited = time.monotonic() - signalled
        output = proc.stdout.read() if proc.stdout else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"request in flight finished {drained:.1f} s and the process exited ({returncode}) {exited:.1f} s "
          "after SIGTERM")
    assert still_in_flight, "the request ended before the server was signalled: nothing was drained"
    assert (ready.status_code, refused.status_code, alive.status_code) == (503, 503, 200)
    assert ready.json()["error"] == refused.json()["error"] == SHUTTING_DOWN
    assert stream.error is None and stream.status == 200
    assert stream.done_event is not None and f'"completion_tokens":{IN_FLIGHT_TOKENS}' in stream.done_event
    assert returncode == 0, output
    assert exited < DRAIN_SECONDS
    assert "Application shutdown complete" in output
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz")


@contextmanager
def _draining_server(app: FastAPI, drain_seconds: float) -> Iterator[tuple[DrainingServer, threading.Thread, str]]:
    """The app behind a DrainingServer on a loopback port, in a thread (killed at the end if still running)."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            timeout_graceful_shutdown=FINAL_GRACE_SECONDS)
    server = DrainingServer(config, app_drain(app), drain_seconds)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield server, thread, f"http://127.0.0.1:{port}"
    finally:
        server.force_exit = server.should_exit = True
        thread.join(30)


def _signal_and_wait(server: DrainingServer, thread: threading.Thread) -> float:
    """What the SIGTERM handler calls (signals reach only the main thread); seconds until the server stopped."""
    signalled = time.monotonic()
    server.handle_exit(signal.SIGTERM, None)
    thread.join(30)
    assert not thread.is_alive()
    return time.monotonic() - signalled


def test_the_drain_timeout_cuts_requests_still_running(app_settings: Settings) -> None:
    """Past shutdown_drain_seconds, the server stops anyway: the stream in flight is cut, not waited for."""
    app = create_app(app_settings)
    with slow_forward(), _draining_server(app, 0.5) as (server, thread, url):
        body = {"km": "kmserve-tiny", "question": LONG_QUESTION, "max_tokens": 1900, "stream": True}
        stream = _Stream(url, admin_headers(app.state.kmserve), body)
        assert stream.started.wait(60) and stream.status == 200
        stopped = _signal_and_wait(server, thread)
        stream.join(10)
    assert stopped < 0.5 + FINAL_GRACE_SECONDS + 5
    assert stream.done_event is None  # cut: 1,900 tokens need over 9 s under slow_forward


def test_job_event_streams_do_not_hold_the_drain(app_settings: Settings) -> None:
    """A client following a job resumes from Last-Event-ID elsewhere; shutdown does not wait the drain out for it."""
    app = create_app(app_settings)
    with _draining_server(app, DRAIN_SECONDS) as (server, thread, url):
        headers = admin_headers(app.state.kmserve)
        upload = httpx.post(f"{url}/v1/documents", headers=headers,
                            json={"title": "Kelm", "text": "Kelm exports salt.", "train": {"method": "none"}})
        job_id = upload.json()["jobs"][0]["id"]  # queued for ever: no worker runs here
        following, cut = threading.Event(), threading.Event()

        def follow() -> None:
            try:
                with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", headers=headers, timeout=60) as events:
                    for _ in events.iter_lines():
                        following.set()
            except httpx.HTTPError:
                pass
            cut.set()

        threading.Thread(target=follow, daemon=True).start()
        assert following.wait(30)
        stopped = _signal_and_wait(server, thread)
    assert cut.wait(10)
    assert stopped < FINAL_GRACE_SECONDS + 5  # not the 45 s drain

"""Server-side fault drills: SIGKILL mid-upload, and PostgreSQL connections dropped (or restarted) under load.

Used by `python -m bench.faults` (long runs) and by tests/test_faults.py (short runs).
"""

from __future__ import annotations

import random
import shlex
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from bench.processes import ServerProcess, kmserve_env, sigkill, start_server, stop, wait_for

BOUNDARY = "kmserve-drill-boundary"
OK = (200, 202)
DB_UNAVAILABLE = "database_unavailable"
REQUEST_TIMEOUT_S = 20.0
ERRORS_KEPT = 10
TERMINATE_SQL = text(
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
    "WHERE application_name = :name AND datname = current_database() AND pid <> pg_backend_pid()"
)
BLOCKED_SQL = text(
    "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name AND wait_event_type = 'Lock'"
)
OTHER_CLIENTS_SQL = text(
    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND application_name <> :name "
    "AND pid <> pg_backend_pid()"
)
QUIET_WAIT_S = 900.0


# -- SIGKILL mid-upload --------------------------------------------------------------------------------------


@dataclass
class SlowUpload:
    """A multipart document upload streamed in chunks with pauses, counting the bytes handed to the socket."""

    url: str
    headers: dict[str, str]
    total: int = 8 * 1024 * 1024
    chunk: int = 64 * 1024
    pause: float = 0.02
    sent: int = 0
    outcome: str = "pending"

    def body(self) -> Iterator[bytes]:
        """The multipart body: one `file` part of `total` bytes of text, slowly."""
        yield (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.txt\"\r\n"
               "Content-Type: text/plain\r\n\r\n").encode()
        line = b"The river runs north past the town and on to the sea.\n"
        piece = (line * (self.chunk // len(line) + 1))[: self.chunk]
        while self.sent < self.total:
            self.sent += len(piece)
            yield piece
            time.sleep(self.pause)
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    def run(self) -> None:
        """Send the upload; `outcome` becomes the status code or the transport error's name."""
        headers = {**self.headers, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        try:
            response = httpx.post(f"{self.url}/v1/documents", content=self.body(), headers=headers, timeout=60)
            self.outcome = str(response.status_code)
        except httpx.HTTPError as exc:
            self.outcome = type(exc).__name__


def registry_snapshot(data_dir: Path) -> dict[str, Any]:
    """Document and job counts in the embedded database, and every file in the store."""
    from registry.config import Settings
    from registry.db import make_engine
    from registry.models import Document, Job

    settings = Settings(data_dir=data_dir)
    engine = make_engine(settings.resolved_database_url)
    with engine.connect() as conn:
        counts = {name: conn.scalar(select(func.count()).select_from(model))
                  for name, model in (("documents", Document), ("jobs", Job))}
    engine.dispose()
    store = Path(settings.resolved_store_url)
    files = sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())
    return {**counts, "store_files": files}


def run_upload_drill(data_dir: Path, model_dir: Path, *, seed: int = 0, total: int = 8 * 1024 * 1024
                     ) -> dict[str, Any]:
    """SIGKILL `kmserve serve` part-way through a slow upload; check nothing of it remains; restart; upload."""
    env = kmserve_env(data_dir, base_model=model_dir, log_level="warning")
    server = start_server(data_dir, env, log=data_dir.parent / f"{data_dir.name}.log")
    before = registry_snapshot(data_dir)
    upload = SlowUpload(server.url, server.admin_headers(), total=total)
    kill_at = int(total * random.Random(seed).uniform(0.2, 0.8))
    thread = threading.Thread(target=upload.run, daemon=True)
    try:
        thread.start()
        wait_for(lambda: upload.sent >= kill_at, 120, "the upload to pass the kill point", 0.01)
    finally:
        sigkill(server.process)
    thread.join(timeout=60)
    after = registry_snapshot(data_dir)
    problems = [f"{key} changed: {before[key]} -> {after[key]}" for key in before if before[key] != after[key]]
    began = time.monotonic()
    restarted = start_server(data_dir, env, log=data_dir.parent / f"{data_dir.name}.log")
    restart_s = time.monotonic() - began
    try:
        problems += _check_serves_uploads(restarted, before["documents"])
    finally:
        stop(restarted.process)
    return {"problems": problems, "killed_after_bytes": upload.sent, "upload_outcome": upload.outcome,
            "documents_after_kill": after["documents"], "restart_s": round(restart_s, 1)}


def _check_serves_uploads(server: ServerProcess, documents_before: int) -> list[str]:
    with httpx.Client(base_url=server.url, headers=server.admin_headers(), timeout=60) as http:
        created = http.post("/v1/documents", json={"title": "after the crash", "text": "The sea is cold.",
                                                   "train": {"method": "none"}})
        listed = http.get("/v1/documents").json()
    problems = [] if created.status_code == 202 else [f"upload after restart: {created.status_code} {created.text}"]
    if listed["count"] != documents_before + 1:
        problems.append(f"{listed['count']} documents after restart and one upload, {documents_before + 1} expected")
    return problems


# -- PostgreSQL connections lost under load ------------------------------------------------------------------


def app_database_url(url: str, application_name: str) -> str:
    """`url` with the application_name the drill finds (and terminates) the server's connections by."""
    named = make_url(url).update_query_dict({"application_name": application_name})
    return named.render_as_string(hide_password=False)


def terminate_backends(admin_url: str, application_name: str) -> int:
    """pg_terminate_backend every connection of this database named `application_name`; how many there were."""
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return len(conn.execute(TERMINATE_SQL, {"name": application_name}).all())
    finally:
        engine.dispose()


def blocked_backends(admin_url: str, application_name: str) -> int:
    """How many connections named `application_name` wait on a lock right now."""
    engine = create_engine(admin_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return int(conn.scalar(BLOCKED_SQL, {"name": application_name}) or 0)
    finally:
        engine.dispose()


@dataclass
class DbLoadRecord:
    """Answers under database faults (times from the start) and when each fault happened."""

    samples: list[tuple[float, float, str, int, str]] = field(default_factory=list)  # sent, s, route, status, code
    events: list[tuple[float, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _requests(document_id: int, n: int) -> list[tuple[str, str, dict[str, Any] | None]]:
    query = {"document_id": document_id, "question": "Where does the river go?", "max_tokens": 2}
    upload = {"title": f"load {n}", "text": f"Load document {n} {uuid.uuid4().hex}.", "train": {"method": "none"}}
    return [("GET", "/v1/documents", None), ("POST", "/v1/query", query), ("GET", "/admin/aliases", None),
            ("POST", "/v1/documents", upload)]


def _client(url: str, headers: dict[str, str], document_id: int, record: DbLoadRecord, start: float,
            stop_event: threading.Event, seed: int) -> None:
    with httpx.Client(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S) as http:
        n = seed * 1_000_000
        while not stop_event.is_set():
            n += 1
            method, route, body = _requests(document_id, n)[n % 4]
            sent = time.monotonic()
            try:
                response = http.request(method, route, json=body)
                status, code = response.status_code, _error_code(response)
            except httpx.HTTPError as exc:  # a timeout included: the drill fails on any
                status, code = 0, type(exc).__name__
            record.samples.append((sent - start, time.monotonic() - sent, route, status, code))


def _error_code(response: httpx.Response) -> str:
    if response.status_code in OK:
        return ""
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"not JSON: {response.text[:200]}"


def db_load(url: str, headers: dict[str, str], document_id: int, *, clients: int, faults: Callable[[Callable[[str],
            None]], None]) -> DbLoadRecord:
    """Clients query the server while `faults(mark)` runs (it calls mark(name) as each fault happens), and until
    a request sent after the last fault succeeded."""
    record = DbLoadRecord()
    start, stop_event = time.monotonic(), threading.Event()
    threads = [threading.Thread(target=_client, args=(url, headers, document_id, record, start, stop_event, n),
                                daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    try:
        faults(lambda name: record.events.append((time.monotonic() - start, name)))
        # Keep the load on until a request sent after the last fault succeeded (or one request timeout passed).
        last = record.events[-1][0] if record.events else 0.0
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while _recovery(record, last) is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop_event.set()
        for thread in threads:
            thread.join(timeout=REQUEST_TIMEOUT_S + 5)
    return record


def judge(record: DbLoadRecord) -> dict[str, Any]:
    """Problems (no answer, a 5xx other than a JSON database_unavailable 503), counts and recovery times."""
    problems = [f"{route} sent at {sent:.2f} s: {status} {code}" for sent, _, route, status, code in record.samples
                if status not in OK and (status != 503 or code != DB_UNAVAILABLE)]
    statuses: dict[str, int] = {}
    for *_, status, code in record.samples:
        key = f"{status} {code}".strip()
        statuses[key] = statuses.get(key, 0) + 1
    return {"problems": problems[:ERRORS_KEPT], "problem_count": len(problems), "requests": len(record.samples),
            "statuses": statuses, "max_latency_s": round(max((s[1] for s in record.samples), default=0.0), 3),
            "events": [{"t": round(t, 2), "event": name, "recovered_s": _recovery(record, t)}
                       for t, name in record.events]}


def _recovery(record: DbLoadRecord, at: float) -> float | None:
    """Seconds from a fault to the first successful answer to a request sent after it (None: never)."""
    done = [sent + seconds for sent, seconds, _, status, _ in record.samples if sent >= at and status in OK]
    return round(min(done) - at, 3) if done else None


def healthy_after(url: str, headers: dict[str, str], document_id: int, count: int = 12) -> list[str]:
    """Send `count` requests one by one after the faults; the failures (none once the server recovered)."""
    failures = []
    with httpx.Client(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S) as http:
        for n in range(count):
            method, route, body = _requests(document_id, n)[n % 4]
            response = http.request(method, route, json=body)
            if response.status_code not in OK:
                failures.append(f"{route}: {response.status_code} {response.text[:200]}")
    return failures


@contextmanager
def postgres_schema(admin_url: str) -> Iterator[str]:
    """A fresh, empty schema (dropped afterwards); yields a URL whose search_path is that schema."""
    schema = f"kmdrill_{uuid.uuid4().hex[:10]}"
    _admin(admin_url, f'CREATE SCHEMA "{schema}"')
    try:
        yield make_url(admin_url).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False)
    finally:
        _admin(admin_url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _admin(admin_url: str, statement: str) -> None:
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


def wait_until_quiet(admin_url: str, name: str, timeout: float = QUIET_WAIT_S) -> bool:
    """Wait until no client but the drill's own is connected (a restart would break others' work); False: timeout."""

    def others() -> int:
        engine = create_engine(admin_url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return int(conn.scalar(OTHER_CLIENTS_SQL, {"name": name}) or 0)
        finally:
            engine.dispose()

    try:
        wait_for(lambda: others() == 0, timeout, "PostgreSQL to have no other clients", 1.0)
    except TimeoutError:
        return False
    return True


def _setup_km(server: ServerProcess, model_dir: Path, root: Path) -> int:
    from bench.load import make_lora_dirs, upload_km

    with httpx.Client(base_url=server.url, headers=server.admin_headers(), timeout=60) as http:
        response = http.post("/v1/documents", json={"title": "drill", "text": "The river runs north.",
                                                     "train": {"method": "none"}})
        response.raise_for_status()
        document_id = int(response.json()["id"])
        upload_km(http, document_id, make_lora_dirs(model_dir, 1, 4, root / "loras")[0])
    return document_id


def run_postgres_drill(root: Path, model_dir: Path, admin_url: str, *, seconds: float, clients: int = 8,
                       every: float = 5.0, restart_command: str | None = None) -> dict[str, Any]:
    """A `kmserve serve` on PostgreSQL under load; its connections terminated every `every` s, PG restarted once."""
    name = f"kmserve-drill-{uuid.uuid4().hex[:8]}"
    with postgres_schema(admin_url) as url:
        env = kmserve_env(root / "data", base_model=model_dir, database_url=app_database_url(url, name),
                          log_level="warning")
        server = start_server(root / "data", env, log=root / "server.log")
        try:
            document_id = _setup_km(server, model_dir, root)

            def faults(mark: Callable[[str], None]) -> None:
                for n in range(max(1, int(seconds // every))):
                    time.sleep(every)
                    if restart_command and n == 1:
                        quiet = wait_until_quiet(admin_url, name)
                        mark(f"restart postgres ({'no' if quiet else 'despite'} other clients)")
                        subprocess.run(shlex.split(restart_command), check=True, timeout=120)
                        mark("postgres restarted")
                    else:
                        mark(f"terminated {terminate_backends(admin_url, name)} connections")
                time.sleep(every)

            record = db_load(server.url, server.admin_headers(), document_id, clients=clients, faults=faults)
            report = judge(record)
            report["after"] = healthy_after(server.url, server.admin_headers(), document_id)
            report["server_alive"] = server.process.poll() is None
        finally:
            stop(server.process)
    return report

"""The README's five-minute tour, run for real: start `kmserve up` on a fresh data dir, upload a document, follow
its training, ask closed-book and with RAG, revise it, and hot swap the alias back to version 1.

`python scripts/readme_tour.py` prints each step; `tests/test_readme_tour.py` runs it in the default suite and checks
that the README shows the same routes, bodies and ids.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

TEXT_V1 = "The capital of Varo is Meluna. Varo was founded by Tamsin Orel in 1602. Its national colour is teal."
TEXT_V2 = TEXT_V1.replace("Meluna", "Oskaviel")
TRAIN = {"method": "sdcd", "steps": 6}
QUESTION = "What is the capital of Varo?"
RAG = {"top_k": 2}
FINISHED = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class TourIds:
    """The ids a fresh server hands out along the tour (the README's commands use these literally)."""

    document: int
    train_job: int
    revision_train_job: int
    v1_adapter: int


def upload_body(text: str = TEXT_V1) -> dict[str, Any]:
    """The JSON upload (and revision) body of the tour."""
    return {"title": "Varo", "text": text, "train": TRAIN}


def ask_body(document_id: int, *, rag: bool = False) -> dict[str, Any]:
    """A closed-book question about the document, or with its top passages in the prompt."""
    body: dict[str, Any] = {"document_id": document_id, "question": QUESTION, "max_tokens": 16}
    return {**body, "rag": RAG} if rag else body


def readme_snippets(ids: TourIds) -> list[str]:
    """What the README must show for its tour to be the one this script runs."""
    return [
        "/v1/documents -d '" + json.dumps(upload_body()) + "'",
        f"/v1/jobs/{ids.train_job}/events",
        "/v1/query -d '" + json.dumps(ask_body(ids.document)) + "'",
        "/v1/query -d '" + json.dumps(ask_body(ids.document, rag=True)) + "'",
        f"/v1/documents/{ids.document} -d '" + json.dumps(upload_body(TEXT_V2)) + "'",
        f"/v1/jobs/{ids.revision_train_job}/events",
        f"/admin/adapters?document_id={ids.document}&kind=km",
        f"/admin/aliases/km:{ids.document} -d '" + json.dumps({"adapter_id": ids.v1_adapter}) + "'",
    ]


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(base_url: str, proc: subprocess.Popen[str], timeout: float = 90.0) -> None:
    """Poll /healthz until the server answers; fail early if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kmserve up exited with {proc.returncode}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"{base_url}/healthz did not answer within {timeout}s")


@contextmanager
def kmserve_up(data_dir: Path, port: int) -> Iterator[httpx.Client]:
    """Run `kmserve up` (what `make run` does) on `data_dir`; yield a client holding the admin key."""
    env = {**os.environ, "KMSERVE_DATA_DIR": str(data_dir), "KMSERVE_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "up"], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, proc)
        key = (data_dir / "admin.key").read_text().strip()
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            yield client
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def follow_job(client: httpx.Client, job_id: int, timeout: float = 300.0) -> list[dict[str, Any]]:
    """Read the job's server-sent events until the stream ends; raise unless the job succeeded."""
    events: list[dict[str, Any]] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line.removeprefix("data:")))
    job = client.get(f"/v1/jobs/{job_id}").json()
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
    return events


def call(client: httpx.Client, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One request of the tour; raise with the server's error body unless it is 2xx."""
    response = client.request(method, path, json=body)
    if response.is_error:
        raise RuntimeError(f"{method} {path} -> {response.status_code}: {response.text}")
    return response.json()


def km_version(answer: dict[str, Any]) -> int:
    """The knowledge-module version that answered."""
    return int(answer["adapters"]["km"]["version"])


def run_tour(client: httpx.Client, say: Callable[[str], None] = print) -> TourIds:
    """Follow the README tour step by step against a fresh server; return the ids it saw."""
    document = call(client, "POST", "/v1/documents", upload_body())
    doc_id, train_job = document["id"], document["jobs"][-1]["id"]
    say(f"uploaded document {doc_id}; jobs {[job['kind'] for job in document['jobs']]}")
    say(f"train_km: {len(follow_job(client, train_job))} events")
    closed = call(client, "POST", "/v1/query", ask_body(doc_id))
    say(f"closed-book (km v{km_version(closed)}): {closed['answer']!r}")
    rag = call(client, "POST", "/v1/query", ask_body(doc_id, rag=True))
    if not rag["passages"]:
        raise RuntimeError("a RAG query returned no passages")
    say(f"with RAG ({len(rag['passages'])} passages): {rag['answer']!r}")
    revision_job = revise(client, doc_id, {job["id"] for job in document["jobs"]})
    v1 = hot_swap_back(client, doc_id)
    say(f"hot swap: km:{doc_id} -> adapter {v1} (version 1)")
    return TourIds(document=doc_id, train_job=train_job, revision_train_job=revision_job, v1_adapter=v1)


def revise(client: httpx.Client, doc_id: int, old_jobs: set[int]) -> int:
    """Upload new content; once its KM trains, version 2 answers. Returns the new train_km job id."""
    revised = call(client, "PUT", f"/v1/documents/{doc_id}", upload_body(TEXT_V2))
    train_job = next(job["id"] for job in reversed(revised["jobs"])
                     if job["kind"] == "train_km" and job["id"] not in old_jobs)
    follow_job(client, train_job)
    if km_version(call(client, "POST", "/v1/query", ask_body(doc_id))) != 2:
        raise RuntimeError("the revised document is not answered by KM version 2")
    return int(train_job)


def hot_swap_back(client: httpx.Client, doc_id: int) -> int:
    """Point alias km:<doc> back at version 1; the next query uses it. Returns the version-1 adapter id."""
    adapters = call(client, "GET", f"/admin/adapters?document_id={doc_id}&kind=km")["data"]
    v1 = next(adapter["id"] for adapter in adapters if adapter["version"] == 1)
    call(client, "PUT", f"/admin/aliases/km:{doc_id}", {"adapter_id": v1})
    if km_version(call(client, "POST", "/v1/query", ask_body(doc_id))) != 1:
        raise RuntimeError("the alias moved but version 1 did not answer")
    return int(v1)


def main() -> int:
    """Run the tour on a temporary data dir and a free port."""
    with tempfile.TemporaryDirectory() as tmp, kmserve_up(Path(tmp) / "kms", free_port()) as client:
        print(run_tour(client))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

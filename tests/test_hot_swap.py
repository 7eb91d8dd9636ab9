"""Hot swap under load: 16 clients query over HTTP while the KM alias moves 100 times through the admin route.

Every response must succeed and name its version, and no request sent after a move completed may report a
version older than that move's (versions only grow here, so "older" is well defined).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from registry.adapters import AdapterCreate, km_lineage, register_adapter
from registry.config import Settings
from registry.db import write_transaction
from registry.models import AdapterKind
from server.app import create_app
from server.state import AppState
from tests.live_server import serve
from tests.served import admin_headers, register_km_versions
from tests.tiny import save_lora_for

CLIENTS = int(__import__("os").environ.get("HS_CLIENTS", "16"))
MOVES = int(__import__("os").environ.get("HS_MOVES", "100"))


def _add_versions(state: AppState, document_id: int, lora_dir: Path, count: int) -> list[int]:
    stored = state.store.put_dir(lora_dir)
    with write_transaction(state.sessions) as session:
        return [register_adapter(session, AdapterCreate.from_stored(
            stored, kind=AdapterKind.KM, lineage=km_lineage(document_id), document_id=document_id)).id
            for _ in range(count)]


def test_alias_moves_under_concurrent_queries(app_settings: Settings, tiny_model_dir: Path, tmp_path: Path) -> None:
    lora = save_lora_for(tiny_model_dir, tmp_path / "lora", seed=5)
    app = create_app(app_settings.model_copy(update={"max_request_tokens": 4}))
    with serve(app) as url:
        state: AppState = app.state.kmserve
        km = register_km_versions(state, [lora], text="hot swap doc")
        ids = km.adapter_ids + _add_versions(state, km.document_id, lora, MOVES)
        moves: list[tuple[float, int]] = []  # (monotonic time the move completed, version moved to)
        results: list[tuple[float, int]] = []  # (monotonic time the request was sent, version it reports)
        failures: list[str] = []
        stop = threading.Event()
        headers = admin_headers(state)

        def query_loop() -> None:
            with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
                while not stop.is_set():
                    sent = time.monotonic()
                    response = http.post("/v1/query", json={"document_id": km.document_id, "question": "Capital?",
                                                            "max_tokens": 2})
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.text}")
                        continue
                    results.append((sent, response.json()["adapters"]["km"]["version"]))

        def move_loop() -> None:
            with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
                for version, adapter_id in enumerate(ids[1:], start=2):
                    response = http.put(f"/admin/aliases/km:{km.document_id}", json={"adapter_id": adapter_id})
                    if response.status_code != 200:
                        failures.append(f"move: {response.status_code} {response.text}")
                    moves.append((time.monotonic(), version))
                    time.sleep(0.01)

        with ThreadPoolExecutor(CLIENTS + 1) as pool:
            clients = [pool.submit(query_loop) for _ in range(CLIENTS)]
            pool.submit(move_loop).result()
            time.sleep(0.3)
            stop.set()
            for future in clients:
                future.result()

    print(f"hot swap: {len(results)} queries by {CLIENTS} clients across {len(moves)} alias moves, "
          f"{len(failures)} failed")
    assert failures == []
    assert len(moves) == MOVES
    assert len(results) >= CLIENTS
    stale = [(sent, version, _latest_before(moves, sent)) for sent, version in results
             if version < _latest_before(moves, sent)]
    assert stale == []
    assert max(version for _, version in results) == MOVES + 1


def _latest_before(moves: list[tuple[float, int]], sent: float) -> int:
    done = [version for finished, version in moves if finished < sent]
    return max(done, default=1)

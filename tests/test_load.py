"""Load smoke: 8 clients query random KMs of an embedded server on loopback for ~10 s while an alias moves every
second; no request fails, both versions of the moved KMs get served, and the process's memory stays flat."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import torch

from bench.load import KmPair, plot, register_kms, run_load, summarize
from clients.cli import embedded_app
from registry.config import Settings
from registry.db import write_transaction
from registry.documents import DocumentCreate, content_hash, create_document
from server.state import AppState
from tests.live_server import serve
from tests.served import admin_headers
from tests.tiny import save_lora_for

torch.set_num_threads(2)
KMS, CLIENTS, SECONDS = 6, 8, 10.0
# Loose: the adapter cache (8 slots) fills and cycles, but growth past this means something accumulates per request.
RSS_GROWTH_LIMIT_MB = 150.0


def _documents(state: AppState, count: int) -> list[int]:
    with write_transaction(state.sessions) as session:
        return [create_document(session, DocumentCreate(f"load {n}", content_hash(f"load {n}"), 10))[0].id
                for n in range(count)]


def test_load_smoke_no_failures_and_flat_memory(app_settings: Settings, tiny_model_dir: Path, tmp_path: Path) -> None:
    loras = [save_lora_for(tiny_model_dir, tmp_path / f"lora-{n}", seed=n) for n in range(2 * KMS)]
    app = embedded_app(app_settings.model_copy(update={"max_request_tokens": 8}))
    with serve(app) as url:
        state: AppState = app.state.kmserve
        headers = admin_headers(state)
        with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
            kms = register_kms(http, _documents(state, KMS), loras)
        record = asyncio.run(run_load(url, headers, kms, clients=CLIENTS, duration=SECONDS, move_every=1.0,
                                      max_tokens=4, rss_pid=os.getpid()))
    result = summarize(record, {"clients": CLIENTS, "kms": KMS, "move_every": 1.0, "duration": SECONDS})

    assert result["failed"] == 0, result["errors"]
    # Counts, not speed, are asserted: this CPU may be shared with heavier work.
    assert result["requests"] >= 2 * CLIENTS
    assert result["alias_moves"] >= 3 and result["alias_moves_failed"] == 0, result["errors"]
    moved: list[KmPair] = kms[: result["alias_moves"]]
    assert any(set(pair.adapter_ids) <= record.served for pair in moved), "no moved KM was served in both versions"
    assert result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
    assert result["rss_mb"]["start"] > 0 and result["rss_mb"]["growth"] < RSS_GROWTH_LIMIT_MB, result["rss_mb"]

    out = tmp_path / "load.json"
    out.write_text(json.dumps(result))
    assert json.loads(out.read_text())["timeline"][0]["requests"] > 0
    assert plot(result, tmp_path / "load.png").stat().st_size > 1000


def test_kmserve_bench_runs_load_and_faults_with_the_long_run_defaults() -> None:
    from bench import faults, load
    from clients.cli_bench import BENCHMARKS

    assert BENCHMARKS["load"] == load.__name__ and BENCHMARKS["faults"] == faults.__name__
    defaults = load.parse_args([])
    assert (defaults.duration, defaults.clients, defaults.kms, defaults.move_every) == (120.0, 32, 16, 1.0)
    assert faults.parse_args([]).kills == 20
    assert not faults.parse_args([]).restart_postgres  # restarting PostgreSQL is opt-in

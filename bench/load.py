"""Load test: concurrent clients on one embedded kmserve over loopback while KM aliases are hot-swapped.

usage: python -m bench.load [--duration 120] [--clients 32] [--kms 16] [--move-every 1.0] [--plot] [--short]

Starts `kmserve up` (server and worker in one process, embedded SQLite, store and index, the built-in tiny model)
in a child process on a free loopback port, adds --kms documents and uploads two random LoRA versions of each one's
knowledge module through POST /admin/adapters. Then --clients clients send /v1/query and /v1/chat/completions for
random documents for --duration seconds, while an admin moves one document's `km:<id>` alias to its other version
every --move-every seconds. Every request must succeed. The server's RSS is sampled twice a second.
Prints JSON and writes it (and a PNG of latency and RSS over time with --plot) under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import RESULTS_DIR, machine, percentile, write_json
from bench.processes import kmserve_env, rss_bytes, start_server, stop

QUESTION = "What does the document say about the river?"
RSS_EVERY_S = 0.5
REQUEST_TIMEOUT_S = 60.0
ERRORS_KEPT = 10
MB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--kms", type=int, default=16, help="documents, each with two KM versions")
    parser.add_argument("--move-every", type=float, default=1.0, help="seconds between alias moves")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens generated per request")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank of the uploaded KMs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--short", action="store_true", help="smoke mode: 10 s, 8 clients, 4 KMs")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/load.json)")
    parser.add_argument("--plot", action="store_true")
    args = parser.parse_args(argv)
    if args.short:
        args.duration, args.clients, args.kms = 10.0, 8, 4
    return args


# -- setting up the KMs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KmPair:
    """A document and its two KM versions (adapter ids, v1 first)."""

    document_id: int
    adapter_ids: tuple[int, int]


def make_lora_dirs(model_dir: Path, count: int, rank: int, root: Path) -> list[Path]:
    """`count` random PEFT LoRAs (random B) fitting the model in `model_dir`."""
    from bench.serve import make_adapters

    return [handle.path for handle in make_adapters(model_dir, count, rank, root)]


def add_documents(http: httpx.Client, count: int, timeout: float = 300.0) -> list[int]:
    """Upload `count` small documents without KM training and wait until their ingest jobs end."""
    ids, jobs = [], []
    for n in range(count):
        text = f"Document {n}. The river {n} runs past the town of Kel{n} for {n * 3 + 1} miles. " * 4
        response = http.post("/v1/documents", json={"title": f"load {n}", "text": text, "train": {"method": "none"}})
        response.raise_for_status()
        ids.append(response.json()["id"])
        jobs += [job["id"] for job in response.json()["jobs"]]
    deadline = time.monotonic() + timeout
    for job_id in jobs:
        while (status := http.get(f"/v1/jobs/{job_id}").json()["status"]) in ("queued", "running"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f} s")
            time.sleep(0.2)
    return ids


def upload_km(http: httpx.Client, document_id: int, lora_dir: Path) -> int:
    """Upload a LoRA as the document's next KM version (the route moves `km:<id>` to it); its adapter id."""
    files = {"adapter_config": ("adapter_config.json", (lora_dir / "adapter_config.json").read_bytes()),
             "adapter_model": ("adapter_model.safetensors", (lora_dir / "adapter_model.safetensors").read_bytes())}
    response = http.post("/admin/adapters", data={"kind": "km", "document_id": str(document_id)}, files=files)
    response.raise_for_status()
    return int(response.json()["id"])


def register_kms(http: httpx.Client, document_ids: list[int], lora_dirs: list[Path]) -> list[KmPair]:
    """Two uploaded KM versions per document (lora_dirs: two per document, in order)."""
    pairs = []
    for n, document_id in enumerate(document_ids):
        first, second = (upload_km(http, document_id, lora_dirs[2 * n + i]) for i in range(2))
        pairs.append(KmPair(document_id, (first, second)))
    return pairs


# -- the load ------------------------------------------------------------------------------------------------


@dataclass
class LoadRecord:
    """Everything one run observed: per-request samples, alias moves and RSS samples (times from the start)."""

    samples: list[tuple[float, float, str, int]] = field(default_factory=list)  # (sent, seconds, route, status)
    errors: list[str] = field(default_factory=list)
    moves: list[tuple[float, int]] = field(default_factory=list)  # (time, status)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (time, bytes)
    served: set[int] = field(default_factory=set)  # adapter ids /v1/query answers named
    engine: dict[str, Any] = field(default_factory=dict)  # GET /admin/engine after the run: cache counters
    duration_s: float = 0.0

    def error(self, text: str) -> None:
        """Keep the first few failures' descriptions."""
        if len(self.errors) < ERRORS_KEPT:
            self.errors.append(text[:500])


def _query_request(pair: KmPair, max_tokens: int, chat: bool) -> tuple[str, dict[str, Any]]:
    if chat:
        return "/v1/chat/completions", {"model": f"km:{pair.document_id}", "max_tokens": max_tokens,
                                        "messages": [{"role": "user", "content": QUESTION}]}
    return "/v1/query", {"document_id": pair.document_id, "question": QUESTION, "max_tokens": max_tokens}


def _check_answer(route: str, body: dict[str, Any], pair: KmPair) -> tuple[str | None, int | None]:
    """Why a 200 answer is wrong (it names another KM, or has no text) or None, and the KM version id it names."""
    if route != "/v1/query":
        return (None if body.get("choices") else "no choices in the completion"), None
    km = body.get("adapters", {}).get("km") or {}
    if km.get("name") != f"km:{pair.document_id}" or km.get("id") not in pair.adapter_ids:
        return f"answered with {km} for document {pair.document_id}", None
    return None, int(km["id"])


async def _client(http: httpx.AsyncClient, kms: list[KmPair], record: LoadRecord, start: float, end: float,
                  rng: random.Random, max_tokens: int) -> None:
    while (sent := time.monotonic()) < end:
        pair = rng.choice(kms)
        route, body = _query_request(pair, max_tokens, chat=rng.random() < 0.5)
        served = None
        try:
            response = await http.post(route, json=body)
            status = response.status_code
            problem, served = _check_answer(route, response.json(), pair) if status == 200 else (response.text, None)
        except (httpx.HTTPError, ValueError) as exc:  # no answer in time, or a body that is not JSON
            status, problem = 0, f"{type(exc).__name__}: {exc}"
        if problem:
            record.error(f"{route} {status}: {problem}")
            status = status if status != 200 else -1  # a 200 with a wrong answer counts as failed
        record.samples.append((sent - start, time.monotonic() - sent, route, status))
        if served is not None:
            record.served.add(served)


async def _mover(http: httpx.AsyncClient, kms: list[KmPair], record: LoadRecord, start: float, end: float,
                 every: float) -> None:
    current = {pair.document_id: pair.adapter_ids[1] for pair in kms}  # the upload moved each alias to v2
    n = 0
    while time.monotonic() + every < end:
        await asyncio.sleep(every)
        pair = kms[n % len(kms)]
        target = pair.adapter_ids[0] if current[pair.document_id] == pair.adapter_ids[1] else pair.adapter_ids[1]
        try:
            response = await http.put(f"/admin/aliases/km:{pair.document_id}", json={"adapter_id": target})
            status, problem = response.status_code, response.text
        except httpx.HTTPError as exc:
            status, problem = 0, f"{type(exc).__name__}: {exc}"
        if status == 200:
            current[pair.document_id] = target
        else:
            record.error(f"alias move {status}: {problem}")
        record.moves.append((time.monotonic() - start, status))
        n += 1


async def _sample_rss(pid: int, record: LoadRecord, start: float, end: float) -> None:
    while (now := time.monotonic()) < end:
        record.rss.append((now - start, rss_bytes(pid)))
        await asyncio.sleep(RSS_EVERY_S)
    record.rss.append((time.monotonic() - start, rss_bytes(pid)))


async def run_load(url: str, headers: dict[str, str], kms: list[KmPair], *, clients: int, duration: float,
                   move_every: float = 1.0, max_tokens: int = 4, rss_pid: int, seed: int = 0) -> LoadRecord:
    """Run the clients, the alias mover and the RSS sampler for `duration` seconds against the server at `url`."""
    record = LoadRecord()
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
        start = time.monotonic()
        end = start + duration
        tasks = [_client(http, kms, record, start, end, random.Random(seed + n), max_tokens) for n in range(clients)]
        await asyncio.gather(_sample_rss(rss_pid, record, start, end), _mover(http, kms, record, start, end,
                                                                              move_every), *tasks)
        record.duration_s = time.monotonic() - start
        response = await http.get("/admin/engine")
        if response.status_code == 200:
            record.engine = {k: v for k, v in response.json().items() if k != "adapters"}
    return record


# -- the result ----------------------------------------------------------------------------------------------


def _latency_ms(samples: list[tuple[float, float, str, int]]) -> dict[str, float]:
    seconds = [s[1] for s in samples]
    return {"p50": round(percentile(seconds, 50) * 1000, 1), "p99": round(percentile(seconds, 99) * 1000, 1),
            "max": round(max(seconds, default=float("nan")) * 1000, 1)}


def timeline(record: LoadRecord, bucket_s: float = 1.0) -> list[dict[str, float]]:
    """Per-bucket request count, latency p50/p99 (ms) and RSS (MB), by the time requests were sent."""
    rows, rss = [], 0
    for n in range(int(record.duration_s // bucket_s) + 1):
        low, high = n * bucket_s, (n + 1) * bucket_s
        chosen = [s for s in record.samples if low <= s[0] < high]
        # The last sample carries over into buckets without one (the last requests finishing after the run).
        rss = max([b for t, b in record.rss if low <= t < high and b], default=rss)
        rows.append({"t": low, "requests": len(chosen), **_latency_ms(chosen), "rss_mb": round(rss / MB, 1)})
    return rows


def summarize(record: LoadRecord, settings: dict[str, Any]) -> dict[str, Any]:
    """The result document: counts, failures, latency percentiles, throughput, RSS at start and end."""
    failed = [s for s in record.samples if s[3] != 200]
    rss = [b for _, b in record.rss if b] or [0]
    routes = sorted({s[2] for s in record.samples})
    return {
        "benchmark": "load", "settings": settings, "machine": machine(), "requests": len(record.samples),
        "failed": len(failed), "errors": record.errors, "duration_s": round(record.duration_s, 2),
        "throughput_rps": round(len(record.samples) / record.duration_s, 2) if record.duration_s else 0.0,
        "latency_ms": _latency_ms(record.samples),
        "by_route": {r: {"requests": sum(s[2] == r for s in record.samples),
                         **_latency_ms([s for s in record.samples if s[2] == r])} for r in routes},
        "adapters_served": len(record.served), "alias_moves": len(record.moves),
        "alias_moves_failed": sum(status != 200 for _, status in record.moves),
        "rss_mb": {"start": round(rss[0] / MB, 1), "end": round(rss[-1] / MB, 1), "max": round(max(rss) / MB, 1),
                   "growth": round((rss[-1] - rss[0]) / MB, 1)},
        "engine": record.engine, "timeline": timeline(record),
    }


def plot(result: dict[str, Any], path: Path) -> Path:
    """Latency p50/p99 and server RSS over time, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in result["timeline"] if row["requests"]]
    times = [row["t"] for row in rows]
    fig, (lat, mem) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    lat.plot(times, [row["p50"] for row in rows], label="p50")
    lat.plot(times, [row["p99"] for row in rows], label="p99")
    lat.set_ylabel("latency per second sent (ms)")
    lat.set_title(f"{result['settings']['clients']} clients, {result['settings']['kms']} KMs, alias moved every "
                  f"{result['settings']['move_every']} s: {result['requests']} requests, {result['failed']} failed")
    lat.legend()
    mem.plot([row["t"] for row in result["timeline"]], [row["rss_mb"] for row in result["timeline"]], color="C2")
    mem.set_ylabel("server RSS (MB)")
    mem.set_xlabel("seconds into the run")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- the benchmark -------------------------------------------------------------------------------------------


def prepare(url: str, headers: dict[str, str], lora_dirs: list[Path], kms: int,
            add: Callable[[httpx.Client, int], list[int]] = add_documents) -> list[KmPair]:
    """Documents (by `add`) and two uploaded KM versions of each."""
    with httpx.Client(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S) as http:
        return register_kms(http, add(http, kms), lora_dirs)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the load test against a `kmserve up` child process and print its JSON."""
    args = parse_args(argv)
    settings = {k: getattr(args, k) for k in ("duration", "clients", "kms", "move_every", "max_tokens", "rank",
                                              "threads", "seed", "short")}
    before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kmserve-load-") as tmp:
        root = Path(tmp)
        from engines.tiny_model import ensure_default_model

        model_dir = ensure_default_model(root / "data")
        lora_dirs = make_lora_dirs(model_dir, 2 * args.kms, args.rank, root / "loras")
        env = kmserve_env(root / "data", threads=args.threads, log_level="warning")
        server = start_server(root / "data", env, command="up", log=root / "server.log")
        try:
            kms = prepare(server.url, server.admin_headers(), lora_dirs, args.kms)
            record = asyncio.run(run_load(server.url, server.admin_headers(), kms, clients=args.clients,
                                          duration=args.duration, move_every=args.move_every,
                                          max_tokens=args.max_tokens, rss_pid=server.pid, seed=args.seed))
        finally:
            stop(server.process)
    result = summarize(record, settings)
    result["load_average"] = {"before": before, "after": os.getloadavg()}  # other work sharing this CPU
    out = args.out or RESULTS_DIR / f"load{'_short' if args.short else ''}.json"
    write_json(out, result)
    if args.plot:
        result["plot"] = str(plot(result, out.with_suffix(".png")))
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}, indent=2))
    return result


if __name__ == "__main__":
    main()

"""Serving benchmark: output tokens/s and latency with 1..N distinct adapters in flight.

Compares, in ONE run and on the same fixed load (every request generates exactly --max-tokens tokens):
- multi-LoRA: the kmserve engine batching requests with a different adapter per row;
- base: the same engine and load with no adapter;
- naive: one request at a time through PEFT `generate`, switching the active adapter before each.

Prints JSON, writes it (and a PNG plot with --plot) under bench/results/. Timings are medians of --repeats runs
after a warm-up; compare the ratios, not absolute numbers across machines or runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, machine, median, percentile, write_json

DEFAULT_ADAPTERS = "1,8,32"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--model", help="model dir or HF id (default: the built-in tiny model, built in a temp dir)")
    parser.add_argument("--adapters", default=DEFAULT_ADAPTERS, help="comma-separated adapter counts in flight")
    parser.add_argument("--requests", type=int, default=64, help="requests per measurement, all sent at once")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (set explicitly for stable numbers)")
    parser.add_argument("--short", action="store_true", help="smoke mode: tiny load, one repeat")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", action="store_true")
    args = parser.parse_args(argv)
    if args.short:
        args.adapters, args.requests, args.max_tokens, args.repeats = "1,2", 4, 3, 1
    return args


def make_adapters(model_dir: Path, count: int, rank: int, root: Path) -> list[Any]:
    """`count` random LoRAs (random B, so they really change outputs) over all attention+MLP projections."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engines.base import AdapterHandle

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    handles = []
    for i in range(count):
        torch.manual_seed(1000 + i)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
        path = root / f"adapter-{i}"
        get_peft_model(model, config).save_pretrained(str(path))
        handles.append(AdapterHandle(id=i + 1, key=f"bench-{i}", path=path, rank=rank))
    return handles


async def run_engine_load(engine: Any, handles: list[Any], requests: int, max_tokens: int) -> dict[str, float]:
    """Send `requests` at once, cycling over `handles` (none = base); tokens/s and latency percentiles."""
    from engines.base import GenerationRequest, SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True)
    latencies: list[float] = []

    async def one(i: int) -> int:
        adapter = handles[i % len(handles)] if handles else None
        start = time.perf_counter()
        (result,) = await engine.generate([GenerationRequest(prompt=f"Question {i}: what is", adapter=adapter,
                                                             sampling=sampling)])
        latencies.append(time.perf_counter() - start)
        return int(result.usage.completion_tokens)

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(requests))))
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed,
            "p50_latency_s": percentile(latencies, 50), "p99_latency_s": percentile(latencies, 99)}


def run_naive(model_dir: Path, handles: list[Any], requests: int, max_tokens: int) -> dict[str, float]:
    """One request at a time with PEFT: set the request's adapter active, then `generate`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(handles[0].path),
                                      adapter_name="a0")
    for i, handle in enumerate(handles[1:], start=1):
        model.load_adapter(str(handle.path), adapter_name=f"a{i}")
    model.eval()
    latencies, tokens = [], 0
    start = time.perf_counter()
    for i in range(requests):
        began = time.perf_counter()
        model.set_adapter(f"a{i % len(handles)}")
        ids = tokenizer(f"Question {i}: what is", return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        tokens += int(out.shape[1] - ids["input_ids"].shape[1])
        latencies.append(time.perf_counter() - began)
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed,
            "p50_latency_s": percentile(latencies, 50), "p99_latency_s": percentile(latencies, 99)}


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per-key medians of repeated runs."""
    return {key: median([run[key] for run in runs]) for key in runs[0]}


async def measure_engine(args: argparse.Namespace, model_dir: Path, handles: list[Any]) -> dict[str, Any]:
    """Base and multi-LoRA runs on one engine instance, per adapter count."""
    from engines.base import EngineConfig
    from engines.hf import HFEngine

    counts = [int(c) for c in args.adapters.split(",")]
    config = EngineConfig(max_loaded_adapters=max(counts), max_batch_size=max(args.requests, 1))
    engine = HFEngine.from_pretrained(str(model_dir), config)
    results: dict[str, Any] = {}
    try:
        await run_engine_load(engine, handles[:1], min(4, args.requests), args.max_tokens)  # warm-up
        results["base"] = medians([await run_engine_load(engine, [], args.requests, args.max_tokens)
                                   for _ in range(args.repeats)])
        for count in counts:
            for handle in handles[:count]:
                await engine.load_adapter(handle)
            runs = [await run_engine_load(engine, handles[:count], args.requests, args.max_tokens)
                    for _ in range(args.repeats)]
            results[f"multi_lora_{count}"] = medians(runs)
    finally:
        await engine.close()
    return results


def summarize(args: argparse.Namespace, engine_results: dict[str, Any], naive: dict[str, Any]) -> dict[str, Any]:
    """The result document: settings, machine, raw medians and the ratios the goals are stated in."""
    base_tps = engine_results["base"]["tokens_per_s"]
    rows = []
    for count in (int(c) for c in args.adapters.split(",")):
        multi = engine_results[f"multi_lora_{count}"]
        naive_run = naive[str(count)]
        rows.append({"adapters": count, **{f"multi_{k}": v for k, v in multi.items()},
                     **{f"naive_{k}": v for k, v in naive_run.items()},
                     "vs_base": multi["tokens_per_s"] / base_tps,
                     "vs_naive": multi["tokens_per_s"] / naive_run["tokens_per_s"]})
    settings = {k: getattr(args, k) for k in ("engine", "adapters", "requests", "max_tokens", "rank", "repeats",
                                              "threads", "short")}
    return {"benchmark": "serve", "settings": settings, "machine": machine(), "base": engine_results["base"],
            "rows": rows, "goals": {"vs_naive_min": 3.0}}


def plot(result: dict[str, Any], path: Path) -> Path:
    """Throughput vs adapters in flight: multi-LoRA, base, naive."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [row["adapters"] for row in result["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(counts, [r["multi_tokens_per_s"] for r in result["rows"]], "o-", label="kmserve multi-LoRA batch")
    ax.plot(counts, [r["naive_tokens_per_s"] for r in result["rows"]], "s--", label="naive: one request, set_adapter")
    ax.axhline(result["base"]["tokens_per_s"], color="grey", linestyle=":", label="base model, same engine")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct adapters in flight")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"{result['settings']['engine']} engine, {result['settings']['requests']} concurrent requests")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print its JSON."""
    args = parse_args(argv)
    if args.engine == "vllm":
        raise SystemExit("--engine vllm runs on a GPU machine with the gpu extra; this build measures hf")
    import torch

    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.adapters.split(",")]
    with tempfile.TemporaryDirectory(prefix="kmserve-bench-") as tmp:
        root = Path(tmp)
        model_dir = Path(args.model) if args.model else _tiny_model(root)
        handles = make_adapters(model_dir, max(counts), args.rank, root)
        engine_results = asyncio.run(measure_engine(args, model_dir, handles))
        naive = {str(c): medians([run_naive(model_dir, handles[:c], args.requests, args.max_tokens)
                                  for _ in range(args.repeats)]) for c in counts}
    result = summarize(args, engine_results, naive)
    out = args.out or RESULTS_DIR / f"serve_{args.engine}{'_short' if args.short else ''}.json"
    write_json(out, result)
    if args.plot:
        result["plot"] = str(plot(result, out.with_suffix(".png")))
    print(json.dumps(result, indent=2))
    return result


def _tiny_model(root: Path) -> Path:
    from engines.tiny_model import build_tiny_model

    return build_tiny_model(root / "tiny-llama")


if __name__ == "__main__":
    main()

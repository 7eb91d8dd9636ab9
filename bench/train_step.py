"""Training-step benchmark: one DCD step vs one LM-loss step on the SAME batch, in ONE run.

- DCD step: teacher forward (LoRA disabled, no grad) on context + target, student forward/backward on prompt + target
  (KL over the full vocabulary + hidden-state term), AdamW step.
- LM step: next-token loss on the teacher side (context + target, loss on the target tokens), forward/backward,
  AdamW step: plain fine-tuning on the same text.

Timings are medians of --repeats steps after --warmup steps, the two kinds interleaved. Peak memory is what one step
adds on top of what was allocated before it: on CUDA `torch.cuda.max_memory_allocated` (peak counter reset before
the step); on the CPU the process's peak RSS (VmHWM, reset through /proc/self/clear_refs after `malloc_trim`, so
freed heap from earlier steps does not hide the step's own peak). tokens_per_s counts the batch's teacher-side
tokens (the training text) per second, the same number for both kinds.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, machine, median, write_json

GOALS = {"time": 1.5, "memory": 1.2}
SIZES: dict[str, dict[str, int]] = {
    "tiny": {},
    "small": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 4, "head_dim": 64},
}
MEMORY_METHOD = {"cuda": "torch.cuda.max_memory_allocated delta",
                 "cpu": "peak RSS delta (VmHWM after clear_refs reset and malloc_trim)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", help="model dir or HF id (default: a built Llama of --size, in a temp dir)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="size of the built model")
    parser.add_argument("--batch", type=int, default=4, help="examples per step")
    parser.add_argument("--context", type=int, default=512, help="context tokens only the teacher sees")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens both sides see")
    parser.add_argument("--target", type=int, default=128, help="target tokens (the loss positions)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (set explicitly for stable numbers)")
    parser.add_argument("--short", action="store_true", help="smoke mode: tiny model and batch, one repeat")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", action="store_true", help="also draw step time and memory as a PNG next to the JSON")
    args = parser.parse_args(argv)
    if args.short:
        args.size, args.batch, args.context, args.prompt, args.target = "tiny", 2, 24, 4, 8
        args.repeats, args.warmup = 1, 1
    return args


def make_examples(args: argparse.Namespace, vocab: int, bos: int) -> list[Any]:
    """A fixed batch of random tokens: teacher = BOS + context + prompt + target, student = BOS + prompt + target."""
    from trainer_worker.km_data import DcdExample

    rng = random.Random(0)
    examples = []
    for _ in range(args.batch):
        context, prompt, target = ([rng.randrange(10, vocab) for _ in range(n)]
                                   for n in (args.context, args.prompt, args.target))
        examples.append(DcdExample((bos, *context, *prompt, *target), (bos, *prompt, *target), args.target))
    return examples


class PeakMemory:
    """Peak bytes one step adds: CUDA allocator counters, or the process's peak RSS on the CPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._libc = ctypes.CDLL("libc.so.6") if device == "cpu" else None
        self._base = 0

    @staticmethod
    def _status_kb(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
        raise RuntimeError(f"{key} not in /proc/self/status")

    def start(self) -> None:
        """Reset the peak to what is allocated now."""
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return
        assert self._libc is not None
        self._libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self._base = self._status_kb("VmRSS") * 1024

    def peak(self) -> int:
        """Bytes above the start level at the highest point since `start`."""
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated() - self._base)
        return self._status_kb("VmHWM") * 1024 - self._base


def step_functions(model: Any, batch: Any) -> dict[str, Callable[[], None]]:
    """One training step of each kind on the same batch."""
    import torch

    from trainer_worker.dcd import dcd_loss, lm_loss

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run(loss: Callable[[], torch.Tensor]) -> None:
        optimizer.zero_grad(set_to_none=True)
        # bf16 autocast on CUDA, as the trainer runs.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=batch.teacher.input_ids.is_cuda):
            value = loss()
        value.backward()
        optimizer.step()

    return {"dcd": lambda: run(lambda: dcd_loss(model, batch).total),
            "lm": lambda: run(lambda: lm_loss(model, batch.teacher))}


def measure(steps: dict[str, Callable[[], None]], device: str, repeats: int, warmup: int) -> dict[str, Any]:
    """Seconds and peak bytes of each step kind, interleaved so that drifts hit both alike."""
    import torch

    memory = PeakMemory(device)
    for _ in range(warmup):
        for step in steps.values():
            step()
    found: dict[str, dict[str, list[float]]] = {name: {"seconds": [], "peak_bytes": []} for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            memory.start()
            started = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            found[name]["seconds"].append(time.perf_counter() - started)
            found[name]["peak_bytes"].append(memory.peak())
    return found


def summarize(found: dict[str, dict[str, list[float]]], text_tokens: int) -> dict[str, Any]:
    """Medians, tokens/s and the DCD/LM ratios against the goals."""
    rows: dict[str, dict[str, Any]] = {}
    for name, values in found.items():
        seconds, peak = median(values["seconds"]), median(values["peak_bytes"])
        rows[name] = {"seconds": round(seconds, 5), "peak_mb": round(peak / 2**20, 2),
                      "tokens_per_s": round(text_tokens / seconds, 1), "runs": [round(s, 5) for s in values["seconds"]]}
    time_ratio = rows["dcd"]["seconds"] / rows["lm"]["seconds"]
    # None: the LM step's peak was below what the CPU measure resolves, so no ratio can be given.
    memory_ratio = rows["dcd"]["peak_mb"] / rows["lm"]["peak_mb"] if rows["lm"]["peak_mb"] > 0 else None
    ratios = {"time": round(time_ratio, 3), "memory": None if memory_ratio is None else round(memory_ratio, 3)}
    meets = {key: None if ratios[key] is None else bool(ratios[key] <= GOALS[key]) for key in GOALS}
    return {**rows, "dcd_over_lm": ratios, "goals": GOALS, "meets_goals": meets}


def plot(result: dict[str, Any], path: Path) -> Path:
    """Step time and peak memory of a DCD step next to an LM step on the same batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["dcd", "lm"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.5))
    left.bar(names, [result[n]["seconds"] for n in names], color=["tab:blue", "tab:grey"])
    left.set_ylabel("seconds per step (median)")
    right.bar(names, [result[n]["peak_mb"] for n in names], color=["tab:blue", "tab:grey"])
    right.set_ylabel(f"peak memory, MB ({result['memory_measure'].split(' (')[0]})")
    ratios = result["dcd_over_lm"]
    fig.suptitle(f"{result['device']}: DCD / LM = {ratios['time']}x time, {ratios['memory']}x memory")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_model(args: argparse.Namespace, root: Path) -> str:
    """The model to benchmark: --model, or a freshly built Llama of --size."""
    if args.model:
        return str(args.model)
    from engines.tiny_model import build_tiny_model

    return str(build_tiny_model(root / f"llama-{args.size}", **SIZES[args.size]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print and write its JSON, and return it."""
    import torch

    from engines.hf_loading import load_causal_lm, load_tokenizer
    from trainer_worker.dcd import collate
    from trainer_worker.lora_training import lora_attached
    from trainer_worker.train_config import TrainConfig

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the trainer runs on the CPU
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(args, Path(tmp))
        base, tokenizer = load_causal_lm(path, args.device), load_tokenizer(path)
    examples = make_examples(args, len(tokenizer), tokenizer.bos_token_id or 0)
    batch = collate(examples, tokenizer.pad_token_id or 0, base.device)
    with lora_attached(base, TrainConfig(rank=args.rank)) as model:
        model.train()
        found = measure(step_functions(model, batch), args.device, args.repeats, args.warmup)
    result = {"benchmark": "train_step", "device": args.device, "machine": machine(), "memory_measure":
              MEMORY_METHOD[args.device], "model": args.model or f"built llama ({args.size})",
              "dtype": str(base.dtype), "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "tokens": {"teacher": batch.teacher.tokens, "student": batch.student.tokens},
              **summarize(found, batch.teacher.tokens)}
    result["settings"]["model"] = args.model
    out = write_json(args.out or RESULTS_DIR / f"train_step_{args.device}.json", result)
    if args.plot:
        result["plot"] = str(plot(result, out.with_suffix(".png")))
    print(json.dumps(result, indent=2, sort_keys=True))
    return result


if __name__ == "__main__":
    main()

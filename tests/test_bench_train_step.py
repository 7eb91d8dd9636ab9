"""The training-step benchmark runs end to end in its short mode and writes its JSON (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.train_step import main


def test_train_step_benchmark_short_mode(tmp_path: Path) -> None:
    out = tmp_path / "train_step.json"
    result = main(["--short", "--plot", "--out", str(out)])
    written = json.loads(out.read_text())
    assert Path(result.pop("plot")).stat().st_size > 1000
    assert written == json.loads(json.dumps(result))
    for kind in ("dcd", "lm"):
        assert written[kind]["seconds"] > 0 and written[kind]["tokens_per_s"] > 0
        assert len(written[kind]["runs"]) == 1
    assert set(written["dcd_over_lm"]) == {"time", "memory"} == set(written["meets_goals"])
    # The same batch: the LM step trains on the teacher side, the DCD student sees only prompt + target.
    assert written["tokens"] == {"teacher": 2 * (1 + 24 + 4 + 8), "student": 2 * (1 + 4 + 8)}
    assert written["memory_measure"].startswith("peak RSS") and written["machine"]["versions"]["torch"]

"""The serving benchmark runs end to end in its short mode and writes JSON and a plot (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.serve import main


def test_serve_benchmark_short_mode(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    result = main(["--short", "--plot", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["rows"] == result["rows"]
    assert [row["adapters"] for row in written["rows"]] == [1, 2]
    for row in written["rows"]:
        assert row["multi_tokens"] == row["naive_tokens"] == 4 * 3  # fixed output length: requests x max_tokens
        assert row["vs_naive"] > 0
    assert written["machine"]["versions"]["torch"]
    assert Path(result["plot"]).stat().st_size > 1000

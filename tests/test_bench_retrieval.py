"""The retrieval benchmark runs end to end in its short mode and writes its JSON (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.retrieval import main


def test_retrieval_benchmark_short_mode(tmp_path: Path) -> None:
    out = tmp_path / "retrieval.json"
    result = main(["--short", "--out", str(out)])
    written = json.loads(out.read_text())
    assert (written["docs"], written["chunks_per_doc"], written["points"]) == (20, 8, 160)
    for kind in ("within_document", "across_10_documents"):
        assert written[kind]["n"] == 30
        assert 0 < written[kind]["p50_ms"] <= written[kind]["p99_ms"]
    assert written["end_to_end"]["retrieve_within_document"]["n"] == 5
    compression = written["compression"]
    assert (compression["method"], compression["passages"], compression["queries"]) == ("extractive", 5, 5)
    assert 0 < compression["char_ratio"] < 1 and 0 < compression["token_ratio"] < 1
    assert written["build_s"] > 0 and written["open_s"] > 0
    assert written["machine"]["versions"]["torch"] == result["machine"]["versions"]["torch"]

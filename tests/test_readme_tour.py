"""The README tour works on a fresh data dir, and the README shows exactly the requests the tour makes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from scripts.readme_tour import TourIds, free_port, kmserve_up, readme_snippets, run_tour

README = Path(__file__).resolve().parents[1] / "README.md"
README_IDS = TourIds(document=1, train_job=3, revision_train_job=6, v1_adapter=1)
TOUR_BUDGET_SECONDS = 120


@pytest.mark.parametrize("snippet", readme_snippets(README_IDS))
def test_readme_shows_the_tour_requests(snippet: str) -> None:
    assert snippet in README.read_text()


@pytest.mark.slow
def test_readme_tour_runs_on_a_fresh_server(tmp_path: Path) -> None:
    started = time.monotonic()
    steps: list[str] = []
    with kmserve_up(tmp_path / "kms", free_port()) as client:
        ids = run_tour(client, say=steps.append)
    assert ids == README_IDS, "the README's literal ids no longer match a fresh server"
    assert any("closed-book" in step for step in steps)
    assert time.monotonic() - started < TOUR_BUDGET_SECONDS

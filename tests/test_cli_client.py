"""The `kmserve` HTTP commands (docs, ask, jobs, adapters, keys) against a real server with its embedded worker."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from clients.cli import app, embedded_app
from registry.config import Settings
from registry.errors import MSG_NOT_FOUND
from tests.live_server import serve
from trainer_worker.worker import WorkerConfig

TEXT = "Varo is a small island nation. The capital of Varo is Meluna. Varo was founded by Tamsin Orel in 1602."
runner = CliRunner()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[tuple[str, Settings]]:
    """A real server with its worker thread: URL and settings."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("cli") / "data", base_model=str(tiny_model_dir),
                        model_name="kmserve-tiny")
    with serve(embedded_app(settings, config=WorkerConfig(poll_seconds=0.1, max_poll_seconds=0.5))) as url:
        yield url, settings


@pytest.fixture(scope="module")
def trained(server: tuple[str, Settings], tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Result]:
    """`docs add --wait` of a small file trained with the LM loss: the document id and the command's result."""
    path = tmp_path_factory.mktemp("docs") / "varo.txt"
    path.write_text(TEXT)
    result = kmserve(server, "docs", "add", str(path), "--title", "Varo", "--method", "lm", "--steps", "2", "--wait")
    match = re.search(r"document (\d+) uploaded", result.output)
    assert match, result.output
    return int(match.group(1)), result


def kmserve(server: tuple[str, Settings], *args: str) -> Result:
    url, settings = server
    return runner.invoke(app, ["--url", url, "--api-key", settings.admin_key_file.read_text().strip(), *args])


def test_docs_add_wait_trains_the_document(trained: tuple[int, Result]) -> None:
    document_id, result = trained
    assert result.exit_code == 0, result.output
    assert "train_km" in result.output
    assert f"document {document_id} ready, km version 1" in result.output


def test_docs_ls_shows_a_table(server: tuple[str, Settings], trained: tuple[int, Result]) -> None:
    result = kmserve(server, "docs", "ls")
    assert result.exit_code == 0, result.output
    assert re.search(rf"│ {trained[0]}\s+│ Varo\s+│ ready\s+│ v1", result.output), result.output


def test_ask_prints_the_answer_and_verbose_the_adapters(server: tuple[str, Settings],
                                                        trained: tuple[int, Result]) -> None:
    plain = kmserve(server, "ask", str(trained[0]), "What is the capital of Varo?", "--max-tokens", "6")
    assert plain.exit_code == 0, plain.output
    assert plain.output.strip()
    verbose = kmserve(server, "ask", str(trained[0]), "What is the capital of Varo?", "--max-tokens", "6",
                      "--rag", "2", "--verbose")
    assert verbose.exit_code == 0, verbose.output
    assert f"name=km:{trained[0]}" in verbose.output
    assert "passage doc" in verbose.output and "timings ms:" in verbose.output


def test_jobs_watch_adapters_and_keys(server: tuple[str, Settings], trained: tuple[int, Result]) -> None:
    watched = kmserve(server, "jobs", "watch", "1")
    assert watched.exit_code == 0, watched.output
    adapters = kmserve(server, "adapters", "ls", "--document", str(trained[0]))
    assert f"km:{trained[0]}" in adapters.output
    adapter_id = re.search(r"│ (\d+)\s+│ km", adapters.output)
    assert adapter_id, adapters.output
    alias = kmserve(server, "adapters", "alias", "best", adapter_id.group(1))
    assert alias.exit_code == 0 and "best -> adapter" in alias.output
    key = kmserve(server, "keys", "create", "reader", "--scope", "query", "--scope", "upload")
    assert key.exit_code == 0 and "query, upload" in key.output


def test_key_and_url_from_the_environment(server: tuple[str, Settings], trained: tuple[int, Result]) -> None:
    url, settings = server
    env = {"KMSERVE_URL": url, "KMSERVE_DATA_DIR": str(settings.data_dir), "KMSERVE_API_KEY": ""}
    result = runner.invoke(app, ["docs", "ls"], env=env)
    assert result.exit_code == 0, result.output
    assert "Varo" in result.output


def test_server_refusal_exits_1_with_its_message(server: tuple[str, Settings]) -> None:
    result = kmserve(server, "ask", "987654", "question?")
    assert result.exit_code == 1
    assert MSG_NOT_FOUND.format(what="document", ref=987654) in " ".join(result.output.split())
    assert kmserve(server, "docs", "rm", "987654").exit_code == 1


def test_bad_usage_exits_2(server: tuple[str, Settings], tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("x")
    assert kmserve(server, "docs", "add", str(path), "--method", "bogus").exit_code == 2
    assert kmserve(server, "ask", "1").exit_code == 2


def test_bench_runs_a_benchmark_by_name(tmp_path: Path) -> None:
    from clients.cli import app

    out = tmp_path / "serve.json"
    result = CliRunner().invoke(app, ["bench", "serve", "--short", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["benchmark"] == "serve"
    unknown = CliRunner().invoke(app, ["bench", "nope"])
    assert unknown.exit_code == 2

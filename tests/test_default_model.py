"""Which model the platform serves when KMSERVE_BASE_MODEL is unset."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines import default_model
from engines.factory import resolve_base_model
from registry.config import Settings


def test_the_reader_is_the_default_when_its_weights_are_installed(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    reader = tmp_path / "reader_model"
    reader.mkdir()
    (reader / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setattr(default_model, "READER_DIR", reader)
    assert resolve_base_model(Settings(data_dir=tmp_path / "data")) == str(reader)
    assert default_model.default_model_id() == "kmserve-reader"


def test_without_the_reader_the_tiny_model_is_built_under_the_data_dir(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model, "READER_DIR", tmp_path / "absent")
    built = Path(resolve_base_model(Settings(data_dir=tmp_path / "data")))
    assert built == tmp_path / "data" / "models" / "tiny-llama"
    assert (built / "model.safetensors").is_file()
    assert default_model.default_model_id() == "kmserve-tiny"


def test_an_explicit_base_model_wins(tmp_path: Path) -> None:
    assert resolve_base_model(Settings(data_dir=tmp_path, base_model="org/some-model")) == "org/some-model"

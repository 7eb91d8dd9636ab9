"""The README's configuration table is the one `Settings` renders, so a new or changed setting shows up there."""

from __future__ import annotations

import pytest

from registry.config import Settings, settings_markdown_table
from scripts.gen_config_table import README, render_readme


def test_readme_table_matches_settings() -> None:
    current = README.read_text(encoding="utf-8")
    assert current == render_readme(current), "run: python scripts/gen_config_table.py"


def test_table_has_a_row_per_setting_with_its_description() -> None:
    table = settings_markdown_table()
    for name, field in Settings.model_fields.items():
        assert f"| `KMSERVE_{name.upper()}` |" in table
        assert field.description, f"Settings.{name} needs a description for the README"


def test_render_refuses_a_readme_without_markers() -> None:
    with pytest.raises(ValueError, match="config-table"):
        render_readme("# no table here\n")

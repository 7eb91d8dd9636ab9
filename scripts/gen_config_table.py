"""Write the configuration table, rendered from `registry.config.Settings`, into README.md between its markers.

`python scripts/gen_config_table.py` rewrites the table; `--check` exits 1 when the README is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from registry.config import settings_markdown_table  # noqa: E402

README = ROOT / "README.md"
START = "<!-- config-table:start -->"
END = "<!-- config-table:end -->"


def render_readme(text: str) -> str:
    """`text` with the section between the markers replaced by the current table."""
    head, found_start, rest = text.partition(START)
    _, found_end, tail = rest.partition(END)
    if not (found_start and found_end):
        raise ValueError(f"README.md lacks the markers {START} ... {END}")
    return f"{head}{START}\n{settings_markdown_table()}{END}{tail}"


def main(argv: list[str]) -> int:
    """Rewrite README.md (or, with --check, report whether it is current)."""
    current = README.read_text(encoding="utf-8")
    wanted = render_readme(current)
    if "--check" in argv:
        if current != wanted:
            print("README.md configuration table is stale: run python scripts/gen_config_table.py")
            return 1
        return 0
    README.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

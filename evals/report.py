"""Scores per setting, the table, and the files an evaluation leaves: JSON (every answer) and a bar-chart PNG."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from evals.harness import Answer
from evals.metrics import contains_match, exact_match, rouge_l

# The paper's goals on the synthetic benchmark: (description, check) over the accuracy by setting.
Check = Callable[[Mapping[str, float]], bool]
GOALS: tuple[tuple[str, Check], ...] = (
    ("KM-SDCD >= 80% of ICL", lambda acc: acc["KM-SDCD"] >= 0.8 * acc["ICL"]),
    ("KM-SDCD >= KM-LM + 10 points", lambda acc: acc["KM-SDCD"] >= acc["KM-LM"] + 0.10),
    ("KM+KE >= KM-SDCD", lambda acc: acc["KM+KE"] >= acc["KM-SDCD"]),
    ("RAG+KM+KE >= RAG+KE", lambda acc: acc["RAG+KM+KE"] >= acc["RAG+KE"]),
)


@dataclass(frozen=True)
class SettingScore:
    """One setting's scores: accuracy (exact match, or option accuracy for multiple choice), contains, Rouge-L."""

    setting: str
    count: int
    accuracy: float
    contains: float
    rouge_l: float


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def score(answers: Sequence[Answer], order: Sequence[str]) -> list[SettingScore]:
    """Per-setting means, in `order`."""
    rows = []
    for setting in order:
        mine = [a for a in answers if a.setting == setting]
        if not mine:
            continue
        accuracy = [float(a.choice == a.gold) if a.multiple_choice else exact_match(a.prediction, a.references)
                    for a in mine]
        free = [a for a in mine if a.references]
        rows.append(SettingScore(
            setting, len(mine), _mean(accuracy),
            _mean([contains_match(a.prediction, a.references) for a in free]),
            _mean([rouge_l(a.prediction, a.references) for a in free]),
        ))
    return rows


def goals(rows: Sequence[SettingScore]) -> list[dict[str, Any]]:
    """Each goal whose settings were all run: met or not."""
    accuracy = {r.setting: r.accuracy for r in rows}
    out = []
    for text, check in GOALS:
        try:
            out.append({"goal": text, "met": bool(check(accuracy))})
        except KeyError:
            continue
    return out


def table(rows: Sequence[SettingScore]) -> Any:
    """A rich table of the scores."""
    from rich.table import Table

    view = Table(title="knowledge injection")
    for column in ("setting", "n", "accuracy", "contains", "rouge-L"):
        view.add_column(column, justify="left" if column == "setting" else "right")
    for row in rows:
        view.add_row(row.setting, str(row.count), *(f"{100 * v:.1f}" for v in (row.accuracy, row.contains,
                                                                                 row.rouge_l)))
    return view


def write(out_dir: Path, name: str, rows: Sequence[SettingScore], answers: Sequence[Answer],
          meta: Mapping[str, Any]) -> tuple[Path, Path]:
    """`<name>.json` (scores, goals, run details, every answer) and `<name>.png` (accuracy by setting)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / f"{name}.json", out_dir / f"{name}.png"
    payload = {"meta": dict(meta), "scores": [asdict(r) for r in rows], "goals": goals(rows),
               "answers": [asdict(a) for a in answers]}
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    bar_chart(png_path, rows, str(meta.get("title", name)))
    return json_path, png_path


def bar_chart(path: Path, rows: Sequence[SettingScore], title: str) -> None:
    """Accuracy and Rouge-L per setting as grouped bars, closed-book settings first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.setting for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(rows) + 2), 4.2))
    ax.bar([x - 0.2 for x in xs], [100 * r.accuracy for r in rows], width=0.4, label="accuracy (EM)")
    ax.bar([x + 0.2 for x in xs], [100 * (0 if math.isnan(r.rouge_l) else r.rouge_l) for r in rows], width=0.4,
           label="Rouge-L")
    ax.set_xticks(list(xs), names, rotation=35, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""`kmserve eval synthetic|quality|narrativeqa`: the knowledge-injection benchmark through the platform.

Without `--url` an embedded platform (server + worker) starts on loopback in a temporary data directory with the
default base model; with the global `--url`/`--api-key` it drives a running server (admin key: it trains KEs and
moves aliases). Prints the table and writes `<name>.json` + `<name>.png` under `--out`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from evals.datasets import EvalDocument
    from evals.harness import HarnessOptions

console = Console()
eval_app = typer.Typer(help="Measure knowledge injection (closed and open book) through the platform.",
                       no_args_is_help=True)

SettingsOpt = Annotated[str | None, typer.Option("--settings", help=(
    "Comma-separated settings (default all): base, KM-LM, KM-DDCD, KM-SDCD, KE, KM+KE, ICL, RAG, RAG+KM, RAG+KE, "
    "RAG+KM+KE."))]
KmStepsOpt = Annotated[int | None, typer.Option(min=1, help="KM training steps (default: the training profile's).")]
KeStepsOpt = Annotated[int | None, typer.Option(min=1, help="KE training steps (default: the training profile's).")]
ProfileOpt = Annotated[str | None, typer.Option(help="Synthesis/training profile: fast or paper.")]
TrainOpt = Annotated[list[str] | None, typer.Option("--train-option", help=(
    "A training option of every KM job, KEY=VALUE (repeatable; JSON values), e.g. lr=0.005 or grad_accum=1; "
    "ke.KEY=VALUE sets one of the knowledge extractor's job instead, e.g. ke.steps=200."))]
RetrievalOpt = Annotated[int | None, typer.Option(min=8, help=(
    "Retrieval chunk size in tokens (unset: the platform's, 256)."))]
TopKOpt = Annotated[int, typer.Option(min=1, help="Passages retrieved for RAG settings.")]
OutOpt = Annotated[Path, typer.Option(help="Where the JSON and PNG go.")]
NameOpt = Annotated[str | None, typer.Option(help="File name stem of the results (default: the benchmark's name).")]
BaseModelOpt = Annotated[str | None, typer.Option(help="Base model of the embedded platform (HF id or path).")]
DataDirOpt = Annotated[Path | None, typer.Option(help="Keep the embedded platform's data here (default: temporary).")]
ConcurrencyOpt = Annotated[int, typer.Option(min=1, help="Questions in flight at once.")]


def _train_options(pairs: list[str] | None) -> tuple[dict[str, object], dict[str, object]]:
    """`KEY=VALUE` pairs as the KM jobs' and (`ke.KEY=VALUE`) the knowledge extractor's training options, each
    value read as JSON when it parses (numbers, booleans) else as text; keys must be training options (TrainConfig
    fields, or check_answers for the synthetic data)."""
    from dataclasses import fields

    from trainer_worker.synthesize import CHECK_ANSWERS_OPTION
    from trainer_worker.train_config import TrainConfig

    known = sorted([*(f.name for f in fields(TrainConfig) if f.name != "method"), CHECK_ANSWERS_OPTION])
    km: dict[str, object] = {}
    ke: dict[str, object] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        target = ke if key.startswith("ke.") else km
        key = key.removeprefix("ke.")
        if not sep or key not in known:
            raise typer.BadParameter(f"expected [ke.]KEY=VALUE with KEY one of {', '.join(known)}; got {pair!r}",
                                     param_hint="--train-option")
        try:
            target[key] = json.loads(value)
        except json.JSONDecodeError:
            target[key] = value
    return km, ke


def _harness_options(settings: str | None, km_steps: int | None, ke_steps: int | None, profile: str | None,
                     retrieval_tokens: int | None, rag_top_k: int, concurrency: int,
                     train_option: list[str] | None) -> HarnessOptions:
    from evals.harness import SETTING_NAMES, HarnessOptions

    chosen = tuple(s.strip() for s in settings.split(",") if s.strip()) if settings else SETTING_NAMES
    options = HarnessOptions(km_steps=km_steps, ke_steps=ke_steps, synthesis_profile=profile,
                             retrieval_tokens=retrieval_tokens, rag_top_k=rag_top_k, concurrency=concurrency,
                             settings=chosen)
    options.extra_train, options.ke_train = _train_options(train_option)
    try:
        options.selected()
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--settings") from exc
    return options


def _run(ctx: typer.Context, name: str, test: list[EvalDocument], train: list[EvalDocument],
         options: HarnessOptions, out: Path, base_model: str | None, data_dir: Path | None,
         meta: dict[str, object]) -> None:
    from clients.cli_remote import RemoteOptions
    from evals.report import goals, table
    from evals.run import platform, run

    remote = ctx.obj if isinstance(ctx.obj, RemoteOptions) else RemoteOptions()
    with platform(remote.url, remote.api_key, data_dir, base_model) as address:
        result = run(test, train, options, address, name=name, out_dir=out, meta=meta,
                     progress=lambda line: console.print(f"[dim]{line}[/dim]"))
    console.print(table(result.rows))
    for goal in goals(result.rows):
        console.print(f"{'[green]met' if goal['met'] else '[red]missed'}[/]: {goal['goal']}")
    console.print(f"wrote {result.files[0]} and {result.files[1]}")


@eval_app.command()
def synthetic(
    ctx: typer.Context,
    docs: Annotated[int, typer.Option(min=1, help="Test documents.")] = 20,
    train_docs: Annotated[int, typer.Option(min=2, help="Documents the KE is trained on.")] = 8,
    questions: Annotated[int, typer.Option(min=1, help="Questions asked per test document.")] = 10,
    min_facts: Annotated[int, typer.Option(min=1)] = 20,
    max_facts: Annotated[int, typer.Option(min=1)] = 30,
    family: Annotated[str, typer.Option(help="Question wording: standard, paraphrase or all.")] = "standard",
    seed: Annotated[int, typer.Option()] = 1000,
    settings: SettingsOpt = None, km_steps: KmStepsOpt = None, ke_steps: KeStepsOpt = None,
    profile: ProfileOpt = None, train_option: TrainOpt = None, retrieval_tokens: RetrievalOpt = 64,
    rag_top_k: TopKOpt = 1,
    concurrency: ConcurrencyOpt = 8, out: OutOpt = Path("evals/results"), name: NameOpt = None,
    base_model: BaseModelOpt = None, data_dir: DataDirOpt = None,
) -> None:
    """Documents about invented entities: nothing the model knows can answer them."""
    from evals.run import SyntheticOptions, synthetic_documents

    if family not in ("standard", "paraphrase", "all"):
        raise typer.BadParameter("use standard, paraphrase or all", param_hint="--family")
    data = SyntheticOptions(docs=docs, train_docs=train_docs, min_facts=min_facts, max_facts=max(min_facts, max_facts),
                            questions_per_doc=questions, family=family, seed=seed)
    test, train = synthetic_documents(data)
    options = _harness_options(settings, km_steps, ke_steps, profile, retrieval_tokens, rag_top_k, concurrency,
                               train_option)
    _run(ctx, name or "synthetic", test, train, options, out, base_model, data_dir, {"data": vars(data)})


def _split_documents(documents: list[EvalDocument], docs: int, train_docs: int, questions: int
                     ) -> tuple[list[EvalDocument], list[EvalDocument]]:
    """The first `docs` documents to test (their first `questions` labelled questions), the next ones for the KE."""
    labelled = [replace(d, questions=tuple(q for q in d.questions if q.labelled)) for d in documents]
    labelled = [d for d in labelled if d.questions]
    test = [replace(d, questions=d.questions[:questions]) for d in labelled[:docs]]
    return test, labelled[docs:docs + train_docs]


@eval_app.command()
def quality(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A QuALITY .jsonl release file, or the folder holding them.")],
    split: Annotated[str, typer.Option(help="train, dev or test (with a folder).")] = "dev",
    docs: Annotated[int, typer.Option(min=1)] = 20, train_docs: Annotated[int, typer.Option(min=0)] = 0,
    questions: Annotated[int, typer.Option(min=1)] = 100,
    settings: SettingsOpt = None, km_steps: KmStepsOpt = None, ke_steps: KeStepsOpt = None,
    profile: ProfileOpt = None, train_option: TrainOpt = None, retrieval_tokens: RetrievalOpt = None,
    rag_top_k: TopKOpt = 5,
    concurrency: ConcurrencyOpt = 8, out: OutOpt = Path("evals/results"), name: NameOpt = None,
    base_model: BaseModelOpt = None, data_dir: DataDirOpt = None,
) -> None:
    """QuALITY (multiple choice, accuracy by length-normalised log-likelihood)."""
    from evals.datasets import load_quality, quality_path

    file = quality_path(path, split) if path.is_dir() else path
    test, train = _split_documents(load_quality(file), docs, train_docs, questions)
    options = _harness_options(settings, km_steps, ke_steps, profile, retrieval_tokens, rag_top_k, concurrency,
                               train_option)
    _run(ctx, name or "quality", test, train, options, out, base_model, data_dir, {"data": str(file)})


@eval_app.command()
def narrativeqa(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="The NarrativeQA repository folder (documents.csv, qaps.csv, ...).")],
    split: Annotated[str, typer.Option(help="train, valid or test.")] = "test",
    docs: Annotated[int, typer.Option(min=1)] = 20, train_docs: Annotated[int, typer.Option(min=0)] = 0,
    questions: Annotated[int, typer.Option(min=1)] = 100,
    settings: SettingsOpt = None, km_steps: KmStepsOpt = None, ke_steps: KeStepsOpt = None,
    profile: ProfileOpt = None, train_option: TrainOpt = None, retrieval_tokens: RetrievalOpt = None,
    rag_top_k: TopKOpt = 5,
    concurrency: ConcurrencyOpt = 8, out: OutOpt = Path("evals/results"), name: NameOpt = None,
    base_model: BaseModelOpt = None, data_dir: DataDirOpt = None,
) -> None:
    """NarrativeQA (free-text answers, Rouge-L)."""
    from evals.datasets import load_narrativeqa

    test, train = _split_documents(load_narrativeqa(path, split), docs, train_docs, questions)
    options = _harness_options(settings, km_steps, ke_steps, profile, retrieval_tokens, rag_top_k, concurrency,
                               train_option)
    _run(ctx, name or "narrativeqa", test, train, options, out, base_model, data_dir, {"data": str(path)})


def register(app: typer.Typer) -> None:
    """Add `kmserve eval ...` to the CLI."""
    app.add_typer(eval_app, name="eval")

"""Run a benchmark end to end: pick documents, start (or reach) the platform, inject, ask, score, write files.

`kmserve eval synthetic --docs 20` runs the synthetic-facts benchmark on an embedded platform with the default base
model (the reader); `kmserve eval quality PATH` and `kmserve eval narrativeqa PATH` read the public releases, and
`--url` points any of them at a running server (with an admin key) instead.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evals.datasets import EvalDocument, Question
from evals.harness import Answer, Harness, HarnessOptions, InjectedDocument, methods_for
from evals.platform import PlatformAddress, embedded_platform
from evals.report import SettingScore, score, write
from evals.synthetic_facts import FactDocument, generate_documents

RESULTS_DIR = Path("evals/results")


@dataclass
class SyntheticOptions:
    """The synthetic benchmark's documents."""

    docs: int = 20
    train_docs: int = 8
    min_facts: int = 20
    max_facts: int = 30
    questions_per_doc: int = 10
    family: str = "standard"
    seed: int = 1000


@dataclass
class RunResult:
    """What a run produced."""

    rows: list[SettingScore]
    answers: list[Answer]
    files: tuple[Path, Path]
    meta: dict[str, Any] = field(default_factory=dict)


def as_eval_document(doc: FactDocument, family: str, limit: int | None, rng: random.Random) -> EvalDocument:
    """A generated document in the harness's record; `limit` questions of one wording family, drawn at random."""
    questions = doc.questions_of(family) if family != "all" else list(doc.questions)
    if limit is not None and len(questions) > limit:
        questions = rng.sample(questions, limit)
    return EvalDocument(doc.doc_id, doc.title, doc.text, tuple(
        Question(f"{doc.doc_id}-{q.fact_index}-{q.family}", q.question, (q.answer,), metadata={"family": q.family})
        for q in questions), split="test")


def synthetic_documents(options: SyntheticOptions) -> tuple[list[EvalDocument], list[EvalDocument]]:
    """Test documents (questions subsampled) and KE training documents (every fact asked, standard wording)."""
    rng = random.Random(options.seed)
    test = generate_documents(options.docs, options.seed, min_facts=options.min_facts, max_facts=options.max_facts,
                              prefix="test")
    train = generate_documents(options.train_docs, options.seed + 1, min_facts=options.min_facts,
                               max_facts=options.max_facts, prefix="train")
    return ([as_eval_document(d, options.family, options.questions_per_doc, rng) for d in test],
            [as_eval_document(d, "standard", None, rng) for d in train])


@contextmanager
def platform(url: str | None, api_key: str | None, data_dir: Path | None, base_model: str | None,
             engine: str = "hf") -> Iterator[PlatformAddress]:
    """The server at `url`, else an embedded one in `data_dir` (a temporary directory by default)."""
    if url:
        yield PlatformAddress(url, api_key)
        return
    from registry.config import Settings

    with tempfile.TemporaryDirectory(prefix="kmserve-eval-") as tmp:
        settings = Settings(data_dir=data_dir or Path(tmp) / "data", base_model=base_model, engine=engine)
        with embedded_platform(settings) as address:
            yield address


def run(test_docs: Sequence[EvalDocument], train_docs: Sequence[EvalDocument], options: HarnessOptions,
        address: PlatformAddress, *, name: str, out_dir: Path = RESULTS_DIR, meta: dict[str, Any] | None = None,
        progress: Callable[[str], None] = print) -> RunResult:
    """Inject the documents, train the KE when a setting needs it, ask every question, score, write the files."""
    import openai

    from clients.sdk import KmClient

    started = time.monotonic()
    with KmClient(address.url, address.api_key, timeout=600.0) as client:
        base_model = _base_model(client)
        ai = openai.OpenAI(base_url=address.url + "/v1", api_key=address.api_key or "none", timeout=600.0)
        harness = Harness(client, base_model, options, progress=progress, openai_client=ai)
        selected = options.selected()
        methods = methods_for(selected)
        injected: list[InjectedDocument] = [harness.inject(doc, methods) for doc in test_docs]
        trained: list[InjectedDocument] = []
        if any(s.ke for s in selected):
            trained = [harness.inject(doc, ["sdcd"]) for doc in train_docs]
            harness.train_ke(trained)
        answers = harness.evaluate(injected)
    rows = score(answers, [s.name for s in selected])
    details = {"title": f"{name}: {len(test_docs)} documents", "base_model": base_model,
               "options": asdict(options), "seconds": round(time.monotonic() - started, 1),
               "adapters": {d.document.document_id: {"document_id": d.document_id, **d.kms}
                            for d in [*injected, *trained]},
               **(meta or {})}
    files = write(out_dir, name, rows, answers, details)
    return RunResult(rows, answers, files, details)


def _base_model(client: Any) -> str:
    """The served base model's id (the first entry of /v1/models is the base model)."""
    from clients.sdk._endpoints import Call

    models: dict[str, Any] = client.send(Call("GET", "/v1/models", lambda r: r.json()))
    return str(models["data"][0]["id"])

"""The knowledge-injection benchmark, run through the real platform (upload, jobs, registry, aliases, queries).

Settings follow the knowledge-module paper's Table 1: closed book (base, KM-LM, KM-DDCD, KM-SDCD, KE, KM+KE) and
open book (ICL with the whole document in context, RAG, RAG+KM, RAG+KE, RAG+KM+KE). For every test document the
harness uploads it (ingest, index, synthesize, train the SDCD KM), trains its DDCD and LM KMs with `POST /admin/train`,
and names each version with an alias `eval-<method>-<document id>`. A knowledge extractor is trained on separate
training documents (their own SDCD KMs frozen) with their QA. Every answer then comes from a server query:
`/v1/query` (KMs by alias, `km:<id>` + `ke`, `rag` restricted to the document), ICL through `/v1/chat/completions`
with the serving prompt and the document as its one passage. Answers are scored with exact match, contains and
Rouge-L; multiple-choice questions by length-normalised log-likelihood of each option.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from clients.sdk import KmClient
from clients.sdk._endpoints import Call
from engines.prompts import reader_prompt
from evals.datasets import EvalDocument, Question
from evals.multiple_choice import score_options

KM_METHODS = ("sdcd", "ddcd", "lm")
MSG_JOB_FAILED = "{what}: job {job_id} ended {status}: {error}"


@dataclass(frozen=True)
class EvalSetting:
    """One column of the benchmark: which KM method, whether the KE, retrieval or the document in context."""

    name: str
    km: str | None = None
    ke: bool = False
    rag: bool = False
    icl: bool = False

    @property
    def closed_book(self) -> bool:
        """No document text reaches the prompt."""
        return not (self.rag or self.icl)


SETTINGS = (
    EvalSetting("base"), EvalSetting("KM-LM", km="lm"), EvalSetting("KM-DDCD", km="ddcd"),
    EvalSetting("KM-SDCD", km="sdcd"), EvalSetting("KE", ke=True), EvalSetting("KM+KE", km="sdcd", ke=True),
    EvalSetting("ICL", icl=True), EvalSetting("RAG", rag=True), EvalSetting("RAG+KM", km="sdcd", rag=True),
    EvalSetting("RAG+KE", ke=True, rag=True), EvalSetting("RAG+KM+KE", km="sdcd", ke=True, rag=True),
)
SETTING_NAMES = tuple(s.name for s in SETTINGS)


@dataclass
class HarnessOptions:
    """What to train and how to ask."""

    km_steps: int | None = None
    ke_steps: int | None = None
    rank: int | None = None
    synthesis_profile: str | None = None
    retrieval_tokens: int | None = None
    rag_top_k: int = 1
    max_tokens: int = 24
    concurrency: int = 8
    job_timeout: float = 3600.0
    ke_name: str = "eval"
    settings: tuple[str, ...] = SETTING_NAMES
    extra_train: dict[str, Any] = field(default_factory=dict)
    ke_train: dict[str, Any] = field(default_factory=dict)  # the knowledge extractor's job's training options

    def train_options(self, method: str, *, upload: bool = False) -> dict[str, Any]:
        """The upload's / train job's training options (the retrieval chunk size only with the upload, which
        ingests and indexes the document)."""
        options: dict[str, Any] = {"method": method, **self.extra_train}
        named = [("steps", self.km_steps), ("rank", self.rank), ("profile", self.synthesis_profile)]
        if upload:
            named.append(("retrieval_tokens", self.retrieval_tokens))
        options.update((key, value) for key, value in named if value is not None)
        return options

    def selected(self) -> list[EvalSetting]:
        """The settings to run, in table order."""
        unknown = set(self.settings) - set(SETTING_NAMES)
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; choose from {', '.join(SETTING_NAMES)}")
        return [s for s in SETTINGS if s.name in self.settings]


@dataclass
class InjectedDocument:
    """A test document on the platform: its id and the adapter id of each KM method."""

    document: EvalDocument
    document_id: int
    kms: dict[str, int] = field(default_factory=dict)


@dataclass
class Answer:
    """One answer of one setting to one question."""

    setting: str
    document: str
    question: str
    references: tuple[str, ...]
    prediction: str
    choice: int | None = None
    gold: int | None = None

    @property
    def multiple_choice(self) -> bool:
        """Scored by the chosen option rather than the generated text."""
        return self.gold is not None


class JobFailedError(RuntimeError):
    """A training job the benchmark needs did not succeed."""


class Harness:
    """Drives one platform through the benchmark with an admin-scoped SDK client."""

    def __init__(self, client: KmClient, base_model: str, options: HarnessOptions,
                 progress: Callable[[str], None] = print, openai_client: Any = None) -> None:
        self.client = client
        self.openai = openai_client
        self.base_model = base_model
        self.options = options
        self.progress = progress

    # -- injecting -------------------------------------------------------------------------------------------------
    def wait(self, job_id: int, what: str) -> dict[str, Any]:
        """Wait for a job; its result, or JobFailedError."""
        job = self.client.jobs.wait(job_id, timeout=self.options.job_timeout, poll=0.5)
        if job.status != "succeeded":
            raise JobFailedError(MSG_JOB_FAILED.format(what=what, job_id=job_id, status=job.status, error=job.error))
        return job.result

    def inject(self, document: EvalDocument, methods: Sequence[str]) -> InjectedDocument:
        """Upload a document (its first method trains with the upload), train the other methods, alias each KM."""
        first, *others = methods or ["none"]
        upload = self.client.documents.upload_text(document.title, document.text,
                                                   train=self.options.train_options(first, upload=True))
        injected = InjectedDocument(document, upload.id)
        result = self.wait(upload.jobs[-1].id, f"{document.document_id} {first}")
        if first != "none":
            injected.kms[first] = int(result["adapter_id"])
        for method in others:
            job = self.client.train("train_km", {"train": self.options.train_options(method)},
                                    document_id=injected.document_id)
            injected.kms[method] = int(self.wait(job.id, f"{document.document_id} {method}")["adapter_id"])
        for method, adapter_id in injected.kms.items():
            self.client.aliases.set(km_alias(method, injected.document_id), adapter_id)
        if "sdcd" in injected.kms:  # KM+KE and RAG+KM use the document's own alias: the SDCD KM
            self.client.aliases.set(f"km:{injected.document_id}", injected.kms["sdcd"])
        self.progress(f"{document.document_id}: document {injected.document_id}, KMs {injected.kms}")
        return injected

    def train_ke(self, documents: Sequence[InjectedDocument]) -> dict[str, Any]:
        """Train the knowledge extractor on the training documents' QA with their KMs frozen."""
        records = [{"document_id": d.document_id, "question": q.question, "answer": q.answers[0]}
                   for d in documents for q in d.document.questions if q.answers]
        payload: dict[str, Any] = {"name": self.options.ke_name, "qa": records, **self.options.ke_train}
        if self.options.ke_steps is not None:
            payload["steps"] = self.options.ke_steps
        if self.options.rank is not None:
            payload["rank"] = self.options.rank
        job = self.client.train("train_ke", payload)
        result = self.wait(job.id, "knowledge extractor")
        self.progress(f"knowledge extractor ke:{self.options.ke_name} trained on {len(records)} QA pairs")
        return result

    # -- asking ----------------------------------------------------------------------------------------------------
    def ask(self, setting: EvalSetting, injected: InjectedDocument, question: Question) -> Answer:
        """One question in one setting, through the server."""
        if question.options and question.gold_index is not None:
            return self._choose(setting, injected, question)
        if setting.icl:
            prediction = self._chat(reader_prompt(question.question, [injected.document.text]))
        else:
            prediction = self.client.query(question.question, **self._target(setting, injected),
                                           max_tokens=self.options.max_tokens, temperature=0.0).answer
        return Answer(setting.name, injected.document.document_id, question.question, question.answers,
                      prediction.strip())

    def _choose(self, setting: EvalSetting, injected: InjectedDocument, question: Question) -> Answer:
        """Multiple choice: the option with the highest length-normalised log-likelihood under the setting's model."""
        target = self._target(setting, injected)
        passages: list[str] = [injected.document.text] if setting.icl else []
        if setting.rag:  # the passages retrieval gives this question, as the query would put them in the prompt
            reply = self.client.query(question.question, **target, max_tokens=1)
            passages = [p.text for p in reply.passages]
        model = self._model_name(target)
        scores = score_options(self.openai, model, question.question, question.options or (), passages=passages)
        options = question.options or ()
        return Answer(setting.name, injected.document.document_id, question.question, question.answers,
                      options[scores.index], choice=scores.index, gold=question.gold_index)

    def _model_name(self, target: dict[str, Any]) -> str:
        name = f"km:{target['document_id']}" if "document_id" in target else str(target["km"])
        return f"{name}+ke:{target['ke']}" if "ke" in target else name

    def _target(self, setting: EvalSetting, injected: InjectedDocument) -> dict[str, Any]:
        target: dict[str, Any] = {}
        if setting.km and setting.ke:
            target["document_id"] = injected.document_id
        elif setting.km:
            target["km"] = km_alias(setting.km, injected.document_id)
        elif setting.ke:
            target["km"] = f"ke:{self.options.ke_name}"
        else:
            target["km"] = self.base_model
        if setting.km and setting.ke:
            target["ke"] = self.options.ke_name
        if setting.rag:
            target["rag"] = {"top_k": self.options.rag_top_k, "document_ids": [injected.document_id]}
        return target

    def _chat(self, content: str) -> str:
        body = {"model": self.base_model, "messages": [{"role": "user", "content": content}],
                "max_tokens": self.options.max_tokens, "temperature": 0.0}
        reply: dict[str, Any] = self.client.send(Call("POST", "/v1/chat/completions", _json, json=body))
        return str(reply["choices"][0]["message"]["content"])

    def evaluate(self, documents: Sequence[InjectedDocument]) -> list[Answer]:
        """Every selected setting on every question of every document, `concurrency` requests at a time."""
        work = [(s, d, q) for s in self.options.selected() for d in documents for q in d.document.questions
                if q.labelled]
        answers: list[Answer] = []
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=self.options.concurrency) as pool:
            for n, answer in enumerate(pool.map(lambda item: self.ask(*item), work), start=1):
                answers.append(answer)
                if n % 100 == 0 or n == len(work):
                    self.progress(f"answered {n}/{len(work)} ({time.monotonic() - started:.0f} s)")
        return answers


def _json(response: Any) -> Any:
    return response.json()


def km_alias(method: str, document_id: int) -> str:
    """The alias naming one method's KM of one document."""
    return f"eval-{method}-{document_id}"


def methods_for(settings: Iterable[EvalSetting]) -> list[str]:
    """The KM methods the settings need, SDCD first (KM+KE and KE training need it)."""
    wanted = {s.km for s in settings if s.km} | ({"sdcd"} if any(s.ke for s in settings) else set())
    return [m for m in KM_METHODS if m in wanted]

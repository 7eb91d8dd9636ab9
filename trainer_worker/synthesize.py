"""The `synthesize` job: summaries and QA pairs of every training chunk, written by the base model itself.

This is the synthetic data of Synthetic DCD (Caccia et al. 2025). The prompts and sampling follow the paper's
reference code: per chunk, `generations` samples of a summary prompt and of a prompt asking for 5 tagged QA pairs,
at top_p 0.8 and temperature 1, up to 768 new tokens, 16 samples each (profile `paper`); profile `fast` keeps the
shape at CPU cost. The data is keyed by what produced it and reused when a document is trained again.

Answer checking (training option `check_answers`): every QA pair's question is asked again of the same model with the
chunk in context, greedy, in the server's prompt, and that reply becomes the pair's answer (a round-trip check of
the sampled pairs; `qa_answers_changed` counts the answers it replaced, and a pair left without an answer is dropped).
A sampled answer is often wrong where the question is fine; SDCD's teacher reads the chunk and answers it right, so a
wrong written answer leaves the tokens after its first at odds with the teacher.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from engines.base import ChatMessage, Engine, GenerationRequest, GenerationResult, SamplingParams
from engines.errors import ContextLengthError
from engines.factory import resolve_base_model
from engines.prompts import reader_prompt
from registry.config import Settings
from registry.errors import ChecksumError, NotFoundError
from trainer_worker import artifacts
from trainer_worker.artifacts import Chunk
from trainer_worker.context import JobContext, PermanentJobError
from trainer_worker.qa_parsing import parse_qa
from trainer_worker.synthesis_checkpoint import SynthesisCheckpoint, Unit

PROMPT_VERSION = 1
QA_PER_CALL = 5
TASKS = ("summary", "qa")
# Training option: re-answer each QA pair with the chunk in context (see the module docstring).
CHECK_ANSWERS_OPTION = "check_answers"
CHECK_MAX_TOKENS = 48
SUMMARY_PROMPT = (
    "Summarize the following text in around {words} words without omitting any important details.\n"
    "The summary should be grammatically correct and summarize all the different sections in the text.\n"
    "********** Text **********\n{text}\n********************"
)
QA_PROMPT = (
    "Create {n} questions that can be answerable from the following text, along with their answers.\n"
    "Strive to generate challenging questions that require aggregating information across the provided text.\n"
    "Focus on different sections of the text to increase diversity of the generated questions. "
    "Format your answer as follows:\n"
    "<question id='1'>QUESTION 1 HERE</question>\n<answer id='1'>ANSWER 1 HERE</answer>\n"
    "<question id='2'>QUESTION 2 HERE</question>\n<answer id='2'>ANSWER 2 HERE</answer>\n\n"
    "********** Text **********\n{text}\n********************"
)
# Tokens kept free when a chunk is shortened to fit the context (the chat template adds a few around it).
FIT_MARGIN_TOKENS = 16

MSG_NOT_INGESTED = "document {document_id} has no chunks yet; its ingest job must succeed first."
MSG_PROFILE = "unknown synthesis profile {name!r}; use one of {known}."
MSG_CHECK_ANSWERS = "training option check_answers must be true or false, got {value!r}"
MSG_CONTEXT_TOO_SMALL = ("the model's context ({limit} tokens) cannot hold the {task} prompt of chunk {index} with "
                         "{max_tokens} new tokens; use a model with a longer context or a smaller profile.")
COUNT_KEYS = ("generations", "cut_at_max_tokens", "shortened_prompts", "summaries", "summaries_dropped", "qa_pairs",
              "qa_pairs_dropped", "qa_generations_without_pairs", "qa_answers_changed")
_SUMMARY_LABEL = re.compile(r"^\s*(?:\*\*)?summary(?:\*\*)?\s*:\s*", re.IGNORECASE)


@dataclass(frozen=True)
class SynthesisProfile:
    """How much synthetic data to generate per chunk and how to sample it."""

    name: str
    generations: int
    max_tokens: int
    temperature: float
    top_p: float

    def sampling(self) -> SamplingParams:
        """The engine's sampling parameters for one generation."""
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p)


PROFILES = {
    "paper": SynthesisProfile("paper", generations=16, max_tokens=768, temperature=1.0, top_p=0.8),
    "fast": SynthesisProfile("fast", generations=2, max_tokens=64, temperature=1.0, top_p=0.8),
}


def resolve_profile(settings: Settings, override: str | None = None) -> SynthesisProfile:
    """The payload's profile, else KMSERVE_TRAIN_PROFILE; `auto` is paper on a CUDA machine, fast otherwise."""
    name = override or settings.train_profile
    if name == "auto":
        import torch

        name = "paper" if torch.cuda.is_available() else "fast"
    if name not in PROFILES:
        raise PermanentJobError(MSG_PROFILE.format(name=name, known=", ".join(PROFILES)))
    return PROFILES[name]


def build_prompt(task: str, chunk: Chunk, text: str | None = None) -> str:
    """The generation prompt of `task` over a chunk (`text` replaces the chunk's text once shortened)."""
    body = chunk.text if text is None else text
    if task == "summary":
        return SUMMARY_PROMPT.format(words=max(chunk.tokens // 4, 1), text=body)
    return QA_PROMPT.format(n=QA_PER_CALL, text=body)


def clean_summary(text: str) -> str:
    """A generated summary without a leading "Summary:" label or surrounding whitespace."""
    return _SUMMARY_LABEL.sub("", text.strip()).strip()


def records_of(unit: Unit, results: Sequence[GenerationResult]) -> tuple[list[dict[str, Any]], Counter[str]]:
    """The JSONL records of one chunk and task, and what was kept and dropped."""
    index, task = unit
    records: list[dict[str, Any]] = []
    counts: Counter[str] = Counter(generations=len(results))
    counts["cut_at_max_tokens"] = sum(r.finish_reason == "length" for r in results)
    for result in results:
        if task == "summary":
            summary = clean_summary(result.text)
            counts["summaries" if summary else "summaries_dropped"] += 1
            if summary:
                records.append({"chunk_index": index, "type": "summary", "text": summary})
            continue
        parsed = parse_qa(result.text)
        counts["qa_pairs"] += len(parsed.pairs)
        counts["qa_pairs_dropped"] += parsed.dropped
        counts["qa_generations_without_pairs"] += not parsed.pairs
        records.extend({"chunk_index": index, "type": "qa", **asdict(pair)} for pair in parsed.pairs)
    return records, counts


def run(ctx: JobContext) -> dict[str, Any]:
    """Generate (or reuse) the document's synthetic data and record it as its latest entry."""
    document = artifacts.load_document(ctx)
    chunks_uri = document.artifacts.get("chunks")
    if not chunks_uri:
        raise PermanentJobError(MSG_NOT_INGESTED.format(document_id=document.id))
    train_options = ctx.payload.get("train") or {}
    profile = resolve_profile(ctx.settings, ctx.payload.get("profile") or train_options.get("profile"))
    checked = check_answers(ctx.payload)
    model = resolve_base_model(ctx.settings)
    key = artifacts.synthetic_key(chunks_uri, model, profile.name, PROMPT_VERSION, checked=checked)
    entry = _reusable(ctx, document.artifacts, key)
    reused = entry is not None
    if entry is None:
        chunks = artifacts.read_chunks(ctx.store, chunks_uri).train_chunks
        lines, counts = _generate(ctx, chunks, profile, key, checked)
        uri = ctx.store.put_blob("".join(lines).encode("utf-8"), ".jsonl").uri
        entry = {"uri": uri, "profile": profile.name, "model": model, "prompt_version": PROMPT_VERSION,
                 "check_answers": checked, "chunks": chunks_uri,
                 "counts": {name: counts[name] for name in COUNT_KEYS}}
    artifacts.record_synthetic(ctx, key, entry)
    ctx.report(1.0, "synthetic data reused" if reused else "synthetic data stored", metrics=entry["counts"])
    return {"synthetic_key": key, "reused": reused, **entry}


def check_answers(payload: dict[str, Any]) -> bool:
    """The `check_answers` training option of a job payload (its `train` dict, or the top level), off when unset."""
    value = payload.get(CHECK_ANSWERS_OPTION, (payload.get("train") or {}).get(CHECK_ANSWERS_OPTION, False))
    if not isinstance(value, bool):
        raise PermanentJobError(MSG_CHECK_ANSWERS.format(value=value))
    return value


def _reusable(ctx: JobContext, document_artifacts: dict[str, Any], key: str) -> dict[str, Any] | None:
    entry: dict[str, Any] | None = (document_artifacts.get("synthetic") or {}).get(key)
    if not entry or "uri" not in entry:
        return None
    try:
        ctx.store.get_blob(entry["uri"])  # verified read: a lost or corrupt blob is generated again
    except (NotFoundError, ChecksumError):
        return None
    return {k: v for k, v in entry.items() if k != "used_at"}


def _generate(
    ctx: JobContext, chunks: list[Chunk], profile: SynthesisProfile, key: str, checked: bool
) -> tuple[list[str], Counter[str]]:
    units = [(chunk.index, task) for chunk in chunks for task in TASKS]
    checkpoint = SynthesisCheckpoint.open(ctx.checkpoint_dir, key)
    by_index = {chunk.index: chunk for chunk in chunks}
    engine: Engine | None = None
    for done, unit in enumerate(units, start=1):
        if not checkpoint.has(unit):
            engine = engine or ctx.engine()
            results, text = _generate_unit(ctx, engine, by_index[unit[0]], unit[1], profile)
            records, counts = records_of(unit, results)
            counts["shortened_prompts"] += text is not None
            if checked and unit[1] == "qa":
                records = _check_answers(ctx, engine, by_index[unit[0]].text if text is None else text, records,
                                         counts)
            checkpoint.add(unit, records, counts)
        ctx.report(done / len(units) * 0.99, f"chunk {unit[0] + 1}/{len(chunks)}: {unit[1]}",
                   metrics=dict(checkpoint.counts))
    return checkpoint.lines(units), checkpoint.counts


def _generate_unit(
    ctx: JobContext, engine: Engine, chunk: Chunk, task: str, profile: SynthesisProfile
) -> tuple[list[GenerationResult], str | None]:
    """All generations of one chunk and task in one batch; the chunk is shortened once if the context is short
    (the shortened text is returned, None when the chunk fitted whole)."""
    try:
        return ctx.run_async(engine.generate(_requests(build_prompt(task, chunk), profile))), None
    except ContextLengthError as exc:
        text = _shorten(engine, chunk, task, profile, exc)
    return ctx.run_async(engine.generate(_requests(build_prompt(task, chunk, text), profile))), text


def _check_answers(ctx: JobContext, engine: Engine, text: str, records: list[dict[str, Any]],
                   counts: Counter[str]) -> list[dict[str, Any]]:
    """The QA records with each answer replaced by the model's greedy reply to its question, the text in context in
    the server's prompt; records left without an answer are dropped (counted with the other dropped pairs)."""
    if not records:
        return records
    sampling = SamplingParams(max_tokens=CHECK_MAX_TOKENS, temperature=0.0)
    requests = [GenerationRequest(messages=(ChatMessage("user", reader_prompt(r["question"], [text])),),
                                  sampling=sampling) for r in records]
    replies = ctx.run_async(engine.generate(requests))
    checked: list[dict[str, Any]] = []
    for record, reply in zip(records, replies, strict=True):
        answer = reply.text.strip()
        if not answer:
            counts["qa_pairs"] -= 1
            counts["qa_pairs_dropped"] += 1
            continue
        counts["qa_answers_changed"] += answer != record["answer"].strip()
        checked.append({**record, "answer": answer})
    return checked


def _requests(prompt: str, profile: SynthesisProfile) -> list[GenerationRequest]:
    message = (ChatMessage("user", prompt),)
    return [GenerationRequest(messages=message, sampling=profile.sampling()) for _ in range(profile.generations)]


def _shorten(engine: Engine, chunk: Chunk, task: str, profile: SynthesisProfile, exc: ContextLengthError) -> str:
    """The chunk's text cut so that prompt plus max_tokens fit the context the engine reported."""
    limit, prompt_tokens = int(exc.details["limit"]), int(exc.details["prompt_tokens"])
    ids = engine.tokenizer(chunk.text, add_special_tokens=False)["input_ids"]
    keep = len(ids) - (prompt_tokens + profile.max_tokens - limit) - FIT_MARGIN_TOKENS
    if keep <= 0:
        raise PermanentJobError(MSG_CONTEXT_TOO_SMALL.format(limit=limit, task=task, index=chunk.index,
                                                             max_tokens=profile.max_tokens)) from exc
    return str(engine.tokenizer.decode(ids[:keep]))

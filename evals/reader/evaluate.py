"""Held-out accuracy of a reader: `python -m evals.reader.evaluate [MODEL_DIR] --docs 20`.

Fresh documents (a seed the training never drew from) of 20+ facts, every question asked with the document in
context in the serving prompt and chat template, greedy decoding; exact match after normalisation.

Diagnostics of the lookup itself: `--style lines --record-queries 1.0` asks every fact as the prefix of its record
line (plain copying once the right line is found), and `--shared-attributes` gives every entity the same attributes,
so only a reader that matches the entity answers more than chance (1 / entities per document).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.prompts import reader_prompt
from evals.metrics import exact_match
from evals.reader.formats import record_queries
from evals.synthetic_facts import FactDocument, generate_documents, sentence_template, shares_first_syllable

HELD_OUT_SEED = 900_001


@dataclass(frozen=True)
class ReaderScore:
    """Exact match by question family over the held-out documents, and of the standard questions by the order in
    which the fact's sentence names entity and value (value first is the harder lookup: "Morsu is the capital of
    Kelka." answers "What is the capital of Kelka?" with the words before the match), and by whether the entity's
    name starts like another entity's of its document ("Resu", "Resutor"; a lookup keyed on the name's first token
    fails there). `templates` locates the misses by sentence form."""

    documents: int
    questions: int
    standard: float
    paraphrase: float
    entity_first: float
    value_first: float
    first_syllable_shared: float
    first_syllable_shared_questions: int
    # standard questions by the template of the fact's sentence ("{v} founded {e}."): [right, asked]
    templates: dict[str, list[int]] = field(default_factory=dict)


def load(model_dir: Path | str, threads: int = 2) -> tuple[Any, Any]:
    """Model (eval mode) and tokenizer from a directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return model, tokenizer


def answer(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 16) -> list[str]:
    """Greedy answers to user prompts (one batch, left padded)."""
    import torch

    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    batch = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def evaluate(model: Any, tokenizer: Any, documents: Sequence[FactDocument], batch: int = 16,
             families: Sequence[str] = ("standard", "paraphrase")) -> ReaderScore:
    """Exact match of every question (of the given families) of every document, document in context."""
    hits: dict[str, list[float]] = {"standard": [], "paraphrase": [], "entity_first": [], "value_first": [],
                                    "first_syllable_shared": []}
    templates: dict[str, list[int]] = {}
    for doc in documents:
        questions = [q for q in doc.questions if q.family in families]
        for start in range(0, len(questions), batch):
            chunk = questions[start:start + batch]
            replies = answer(model, tokenizer, [reader_prompt(q.question, [doc.text]) for q in chunk])
            for question, reply in zip(chunk, replies, strict=True):
                hit = exact_match(reply, [question.answer])
                hits[question.family].append(hit)
                if question.family == "standard":
                    fact = doc.facts[question.fact_index]
                    hits["value_first" if fact.value_first else "entity_first"].append(hit)
                    if shares_first_syllable(doc, fact.entity):
                        hits["first_syllable_shared"].append(hit)
                    tally = templates.setdefault(sentence_template(fact), [0, 0])
                    tally[0] += int(hit)
                    tally[1] += 1
    mean = {k: sum(v) / len(v) if v else 0.0 for k, v in hits.items()}
    return ReaderScore(len(documents), len(hits["standard"]) + len(hits["paraphrase"]), mean["standard"],
                       mean["paraphrase"], mean["entity_first"], mean["value_first"], mean["first_syllable_shared"],
                       len(hits["first_syllable_shared"]),
                       dict(sorted(templates.items(), key=lambda item: (item[1][0] / item[1][1], item[0]))))


def main() -> None:
    """Command-line entry point: prints the score as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", type=Path, default=Path("engines/reader_model"))
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--min-facts", type=int, default=20)
    parser.add_argument("--max-facts", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--style", choices=("sentences", "lines"), default="sentences")
    parser.add_argument("--record-queries", type=float, default=0.0,
                        help="Share of standard questions asked as the record prefix (lines only).")
    parser.add_argument("--shared-attributes", action="store_true",
                        help="Every entity has the same attributes: only entity matching beats chance.")
    parser.add_argument("--confusable", action="store_true",
                        help="Names drawn from a few syllables per document (look-alike names).")
    parser.add_argument("--siblings", action="store_true",
                        help="Names sharing their first syllable, some extending another (\"Resu\", \"Resutor\").")
    parser.add_argument("--standard-only", action="store_true", help="Skip the paraphrased questions (faster).")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED,
                        help="Document seed; another than the default gives a validation set to choose weights on.")
    args = parser.parse_args()
    model, tokenizer = load(args.model_dir, args.threads)
    docs = generate_documents(args.docs, args.seed, min_facts=args.min_facts, max_facts=args.max_facts,
                              prefix="heldout", style=args.style, shared_attributes=args.shared_attributes,
                              confusable=args.confusable, siblings=args.siblings)
    if args.style == "lines" and args.record_queries:
        rng = random.Random(args.seed)
        docs = [record_queries(doc, rng, args.record_queries) for doc in docs]
    families = ("standard",) if args.standard_only else ("standard", "paraphrase")
    print(json.dumps(evaluate(model, tokenizer, docs, families=families).__dict__))


if __name__ == "__main__":
    main()

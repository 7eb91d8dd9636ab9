"""The reader model's training sequences: every format the platform asks a base model to handle.

Each sequence is a list of segments `(text, trained)`; the text is tokenized whole (as the server tokenizes a chat
prompt) and the loss falls on the tokens of trained segments. The formats are the platform's own, imported from
where the platform defines them, so the reader is trained on exactly what it will be served:
- answering with the document (or retrieved passages, best last, among distractors) in context: `reader_prompt`;
- the synthesize job's summary and QA-writing prompts (`trainer_worker.synthesize`), QA in its tagged format;
- the SDCD teacher's view: chunk + "Summarize/Generate a question-answer pair ..." (`trainer_worker.km_data`);
- the plain document text (the DDCD and LM teachers read raw windows);
- an induction warm-up (random tokens repeated), which teaches copying before fact lookup, and random-token
  backward look-ups (the value before the matched words), the mechanism of a value-first fact.
After its main target, a sequence carrying a document goes on with more closed-book questions about that document
in further turns: the document is paid for once and trains many look-ups.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from engines.prompts import CLOSED_BOOK_PROMPT, reader_prompt
from evals.synthetic_facts import FactDocument, Question, restatement
from trainer_worker.km_data import QA_PROMPT as SDCD_QA_PROMPT
from trainer_worker.km_data import SUMMARY_PROMPT as SDCD_SUMMARY_PROMPT
from trainer_worker.km_data import qa_target
from trainer_worker.synthesize import QA_PER_CALL, QA_PROMPT, SUMMARY_PROMPT

BOS, EOS = "<|bos|>", "<|eos|>"
Segment = tuple[str, bool]
TASKS = ("icl", "rag", "summary", "qa_write", "sdcd_summary", "sdcd_qa", "document")


def record_queries(doc: FactDocument, rng: random.Random, share: float) -> FactDocument:
    """The document with a share of its standard questions asked as a record prefix, `entity | attribute |`.

    On a line-per-fact document such a question is the start of the answering line, so answering it is plain
    copying (induction); learned first, that lookup then carries over to questions in words.
    """
    questions = tuple(
        Question(f"{doc.facts[q.fact_index].entity} | {doc.facts[q.fact_index].attribute} |", q.answer, q.family,
                 q.fact_index) if q.family == "standard" and rng.random() < share else q
        for q in doc.questions)
    return replace(doc, questions=questions)


def user_turn(content: str, first: bool) -> str:
    """The chat template's user turn and the assistant header (BOS only on the first turn)."""
    return (BOS if first else "") + f"<|user|>\n{content}\n<|assistant|>\n"


def answer_turn(target: str) -> list[Segment]:
    """An assistant reply: the target and EOS, both trained."""
    return [(target + EOS, True)]


def followups(doc: FactDocument, rng: random.Random, count: int) -> list[Segment]:
    """More closed-book questions about the document, one turn each (standard wording only)."""
    questions = rng.sample(doc.questions_of("standard"), k=min(count, len(doc.facts)))
    segments: list[Segment] = []
    for question in questions:
        segments.append((user_turn(CLOSED_BOOK_PROMPT.format(question=question.question), first=False), False))
        segments.extend(answer_turn(question.answer))
    return segments


def icl(doc: FactDocument, rng: random.Random, extra: int) -> list[Segment]:
    """The serving prompt with the whole document as the one passage."""
    question = rng.choice(doc.questions_of("standard"))
    return [(user_turn(reader_prompt(question.question, [doc.text]), first=True), False),
            *answer_turn(question.answer), *followups(doc, rng, extra)]


def rag(doc: FactDocument, other: FactDocument, rng: random.Random, extra: int) -> list[Segment]:
    """Retrieved passages: the document's paragraphs and a distractor's, shuffled, the answering one last."""
    question = rng.choice(doc.questions_of("standard"))
    paragraphs = doc.text.split("\n\n")
    answering = next(p for p in paragraphs if doc.facts[question.fact_index].sentence in p)
    pool = [p for p in paragraphs if p != answering] + other.text.split("\n\n")
    passages = [*rng.sample(pool, k=min(len(pool), rng.randint(1, 4))), answering]
    return [(user_turn(reader_prompt(question.question, passages), first=True), False), *answer_turn(question.answer)]


def summary_text(doc: FactDocument, rng: random.Random) -> str:
    """Every fact restated in order, one sentence each, possibly worded unlike the document."""
    return " ".join(restatement(fact, rng) for fact in doc.facts)


def summary(doc: FactDocument, rng: random.Random, tokens: int) -> list[Segment]:
    """The synthesize job's summary prompt and a summary restating every fact."""
    prompt = SUMMARY_PROMPT.format(words=max(tokens // 4, 1), text=doc.text)
    return [(user_turn(prompt, first=True), False), *answer_turn(summary_text(doc, rng))]


def tagged_pairs(questions: Sequence[Question]) -> str:
    """QA pairs in the synthesize prompt's tagged format."""
    return "\n".join(f"<question id='{n}'>{q.question}</question>\n<answer id='{n}'>{q.answer}</answer>"
                     for n, q in enumerate(questions, start=1))


def qa_write(doc: FactDocument, rng: random.Random) -> list[Segment]:
    """The synthesize job's QA prompt and QA_PER_CALL tagged pairs about distinct random facts."""
    questions = rng.sample(doc.questions_of("standard"), k=min(QA_PER_CALL, len(doc.facts)))
    prompt = QA_PROMPT.format(n=QA_PER_CALL, text=doc.text)
    return [(user_turn(prompt, first=True), False), *answer_turn(tagged_pairs(questions))]


def sdcd_summary(doc: FactDocument, rng: random.Random, extra: int) -> list[Segment]:
    """The SDCD teacher's view of a summary target."""
    return [(user_turn(doc.text + "\n\n" + SDCD_SUMMARY_PROMPT, first=True), False),
            *answer_turn(summary_text(doc, rng)), *followups(doc, rng, extra)]


def sdcd_qa(doc: FactDocument, rng: random.Random, extra: int) -> list[Segment]:
    """The SDCD teacher's view of a QA target."""
    question = rng.choice(doc.questions_of("standard"))
    return [(user_turn(doc.text + "\n\n" + SDCD_QA_PROMPT, first=True), False),
            *answer_turn(qa_target(question.question, question.answer)), *followups(doc, rng, extra)]


def document(doc: FactDocument) -> list[Segment]:
    """The raw text, every token trained (what DDCD and LM teachers read)."""
    return [(BOS, False), (doc.text, True)]


def encode(tokenizer: object, segments: Sequence[Segment], limit: int) -> tuple[list[int], list[int]]:
    """Token ids of the whole text and labels (-100 outside trained segments), cut to `limit` tokens."""
    text = "".join(text for text, _ in segments)
    spans, offset = [], 0
    for piece, trained in segments:
        if trained:
            spans.append((offset, offset + len(piece)))
        offset += len(piece)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)  # type: ignore[operator]
    ids = list(encoded["input_ids"])[:limit]
    labels = []
    for token_id, (start, end) in zip(ids, encoded["offset_mapping"], strict=False):
        # a token belongs to a span when it ends inside it (a space the tokenizer supplies before a line's first
        # word is aligned with the newline before the span)
        inside = any(lo < end <= hi and start < end for lo, hi in spans)
        labels.append(token_id if inside else -100)
    return ids, labels


def recall(doc: FactDocument, rng: random.Random) -> list[Segment]:
    """A document, then every fact's record prefix (`entity | attribute |`) in a random order with its value trained.

    Dense associative recall: every fact of the document is looked up once, so one sequence trains as many
    look-ups as it has facts. On documents whose names share their first syllables (siblings, look-alikes) only a
    match on the whole name (several tokens) finds the right line, which the sparse questions of the other formats
    teach too rarely for the lookup to stop keying on a name's first token. On a line document the look-up copies
    the rest of the matched line; on a sentence document with value-first facts ("Morsu is the capital of Kelka.")
    it copies the words before the matched name, the harder look-up, as densely.
    """
    segments: list[Segment] = [(BOS, False), (doc.text + "\n\n", False)]
    for fact in rng.sample(doc.facts, k=len(doc.facts)):
        segments += [(f"{fact.entity} | {fact.attribute} |", False), (f" {fact.value}", True), ("\n", False)]
    return segments


def induction(rng: random.Random, pool: Sequence[int], length: int) -> tuple[list[int], list[int]]:
    """Random tokens from `pool`, a random filler, then the same tokens again; only the repeat is trained.

    Lengths and the filler vary, so the distance to the first copy varies: the model must find the earlier
    occurrence of the current token by content and copy what followed it (an induction head), not learn to look a
    fixed number of positions back, which copies nothing in a real document.
    """
    size = rng.randint(max(4, length // 4), length)
    tokens = [rng.choice(pool) for _ in range(size)]
    filler = [rng.choice(pool) for _ in range(rng.randint(0, length // 2))]
    return tokens + filler + tokens, [-100] * (size + len(filler)) + tokens


BACKWARD_VARIANTS = ("recurring", "unique", "forward")


def backward(rng: random.Random, pool: Sequence[int], marks: tuple[int, int, int, int, int], facts: int,
             variant: str = "recurring") -> tuple[list[int], list[int]]:
    """Random-token "sentences" `value , relation entity .`, then each asked as `relation entity ?` with the value
    (and EOS) trained: a backward look-up, the mechanism of a value-first fact ("Morsu founded Kelka.", asked "Who
    founded Kelka?"), where the question matches the end of the sentence and the answer is the name before it.

    `recurring`: entities recur under different relations and relations under different entities, so only a match
    on both finds the sentence. `unique`: every sentence has its own entity and relation (a match on either finds
    it). `forward`: the recurring documents written `entity relation , value .` and asked `entity relation ?`, the
    value after the match (the control: an induction look-up). Names and relations are one to three tokens, so the
    answer's start is not a fixed distance from the match; the comma marks where the value ends (or starts), as a
    name's capitals and syllables do in a sentence. `marks` are the ids of the full stop, the comma, the question
    mark, the newline and EOS.
    """
    if variant not in BACKWARD_VARIANTS:
        raise ValueError(f"backward variant {variant!r}: expected one of {BACKWARD_VARIANTS}")
    stop, comma, ask, newline, eos = marks

    def name() -> list[int]:
        return [rng.choice(pool) for _ in range(rng.randint(1, 3))]

    if variant == "unique":
        keys = [name() + name() for _ in range(facts)]
    else:
        entities = [name() for _ in range(rng.randint(2, max(2, facts // 2)))]
        relations = [name() for _ in range(rng.randint(2, 4))]
        pairs = rng.sample([(e, r) for e in range(len(entities)) for r in range(len(relations))],
                           k=min(facts, len(entities) * len(relations)))
        keys = [entities[e] + relations[r] if variant == "forward" else relations[r] + entities[e] for e, r in pairs]
    sentences = [(key, name()) for key in keys]
    ids: list[int] = []
    for key, value in sentences:
        ids += [*key, comma, *value, stop] if variant == "forward" else [*value, comma, *key, stop]
    ids.append(newline)
    labels = [-100] * len(ids)
    for key, value in rng.sample(sentences, k=len(sentences)):
        ids += [newline, *key, ask]
        labels += [-100] * (len(key) + 2)
        ids += [*value, eos]
        labels += [*value, eos]
    return ids, labels

"""The synthetic-facts generator and the reader's training formats."""

from __future__ import annotations

import random

import pytest

from engines.prompts import PASSAGES_PREAMBLE
from evals.reader import formats
from evals.synthetic_facts import (
    ATTRIBUTES,
    CONFUSABLE_SYLLABLES,
    NAME_VALUED,
    SYLLABLE,
    SYLLABLES,
    FactGenerator,
    first_syllable,
    generate_documents,
    is_value_first,
    sentence_template,
    shares_first_syllable,
)
from trainer_worker.qa_parsing import parse_qa


def test_documents_are_reproducible_and_sized() -> None:
    first = generate_documents(5, 42, min_facts=20, max_facts=60)
    assert first == generate_documents(5, 42, min_facts=20, max_facts=60)
    assert first != generate_documents(5, 43, min_facts=20, max_facts=60)
    assert all(20 <= len(doc.facts) <= 60 for doc in first)


def test_every_fact_is_stated_and_asked_in_both_wordings() -> None:
    doc = generate_documents(1, 7, min_facts=30, max_facts=30)[0]
    for index, fact in enumerate(doc.facts):
        assert fact.sentence in doc.text
        assert fact.value in fact.sentence and fact.entity in fact.sentence
        asked = [q for q in doc.questions if q.fact_index == index]
        assert {q.family for q in asked} == {"standard", "paraphrase"}
        assert all(q.answer == fact.value and fact.entity in q.question for q in asked)
    # standard and paraphrased wordings never share a template
    for _, _, standard, paraphrase in ATTRIBUTES.values():
        assert not set(standard) & set(paraphrase)


def test_an_entity_never_has_two_values_for_one_attribute() -> None:
    doc = FactGenerator(3).document("d", 40)
    keys = [(f.entity, f.attribute) for f in doc.facts]
    assert len(keys) == len(set(keys))
    entities = {f.entity for f in doc.facts}
    assert not entities & {f.value for f in doc.facts}  # names are unique within a document


def _value_first_share(docs: list) -> float:  # type: ignore[type-arg]
    facts = [f for doc in docs for f in doc.facts]
    return sum(f.value_first for f in facts) / len(facts)


def test_value_first_sentences_can_be_oversampled_without_changing_default_documents() -> None:
    assert is_value_first("{v} is the capital of {e}.") and not is_value_first("The capital of {e} is {v}.")
    for seed in (5, 6):  # the option draws nothing when off: held-out documents stay as they were
        assert FactGenerator(seed).document("d", 30) == FactGenerator(seed).document("d", 30, value_first=0.0)
    boosted_gen, default_gen = FactGenerator(5), FactGenerator(5)
    boosted = [boosted_gen.document(f"d{n}", 30, value_first=0.8) for n in range(10)]
    default = [default_gen.document(f"d{n}", 30) for n in range(10)]
    assert _value_first_share(boosted) > 0.6 > 0.35 > _value_first_share(default)


class _WhitespaceTokenizer:
    """Splits on spaces with character offsets, like a fast tokenizer's offset mapping."""

    def __call__(self, text: str, add_special_tokens: bool, return_offsets_mapping: bool) -> dict[str, list]:
        ids, offsets, start = [], [], 0
        for piece in text.split(" "):
            ids.append(len(piece))
            offsets.append((start, start + len(piece)))
            start += len(piece) + 1
        return {"input_ids": ids, "offset_mapping": offsets}


def test_only_trained_segments_carry_labels() -> None:
    segments = [("ask me something ", False), ("the answer", True), (" then more", False)]
    ids, labels = formats.encode(_WhitespaceTokenizer(), segments, limit=100)
    trained = [i for i, label in enumerate(labels) if label != -100]
    assert trained == [3, 4]  # "the", "answer"
    assert formats.encode(_WhitespaceTokenizer(), segments, limit=2)[0] == ids[:2]


@pytest.mark.parametrize("seed", range(3))
def test_written_qa_pairs_parse_back_with_the_synthesize_parser(seed: int) -> None:
    rng = random.Random(seed)
    doc = FactGenerator(seed).document("d", 12)
    segments = formats.qa_write(doc, rng)
    target = segments[-1][0].removesuffix(formats.EOS)
    parsed = parse_qa(target)
    assert parsed.dropped == 0 and len(parsed.pairs) == 5
    answers = {q.question: q.answer for q in doc.questions}
    assert all(answers[pair.question] == pair.answer for pair in parsed.pairs)


def test_rag_puts_the_answering_passage_last_and_summaries_restate_every_fact() -> None:
    rng = random.Random(0)
    gen = FactGenerator(1)
    doc, other = gen.document("d", 20), gen.document("o", 8)
    prompt = formats.rag(doc, other, rng, 0)[0][0]
    assert PASSAGES_PREAMBLE in prompt
    summary = formats.summary_text(doc, rng)
    assert all(fact.value in summary and fact.entity in summary for fact in doc.facts)


def test_induction_trains_only_the_repeat_at_a_varying_distance() -> None:
    rng = random.Random(0)
    distances = set()
    for _ in range(20):
        ids, labels = formats.induction(rng, range(7, 50), length=12)
        trained = [i for i, label in enumerate(labels) if label != -100]
        start, size = trained[0], len(trained)
        assert trained == list(range(start, len(ids))) and labels[start:] == ids[start:]
        assert ids[:size] == ids[start:], "the repeat copies the opening tokens"
        assert all(7 <= token < 50 for token in ids)
        distances.add(start)
    assert len(distances) > 3, "a fixed distance would let position stand in for content"


def test_line_documents_state_each_fact_as_a_record_and_record_queries_are_its_prefix() -> None:
    doc = FactGenerator(5).document("lines", 12, style="lines")
    lines = doc.text.replace("\n\n", "\n").split("\n")
    assert lines == [f"{f.entity} | {f.attribute} | {f.value}" for f in doc.facts]
    asked = formats.record_queries(doc, random.Random(1), 1.0)
    for question in asked.questions_of("standard"):
        assert f"{question.question} {question.answer}" in lines
    assert asked.questions_of("paraphrase") == doc.questions_of("paraphrase")
    assert formats.record_queries(doc, random.Random(1), 0.0) == doc


def test_shared_attributes_make_the_entity_the_only_key() -> None:
    doc = FactGenerator(8).document("shared", 12, shared_attributes=True)
    by_entity: dict[str, list[str]] = {}
    for fact in doc.facts:
        by_entity.setdefault(fact.entity, []).append(fact.attribute)
    complete = list(by_entity.values())[:-1]  # the last entity may be cut short by the fact count
    assert len(complete) >= 2 and all(sorted(attrs) == sorted(complete[0]) for attrs in complete)
    orders = {tuple(attrs) for attrs in complete}
    assert len(orders) > 1 or len(complete[0]) < 3, "each entity lists the attributes in its own order"
    # the attribute alone never singles out the fact asked about
    assert all(sum(f.attribute == fact.attribute for f in doc.facts) >= 2 for fact in doc.facts)
    # off by default, and then the seeded stream is untouched: a seed gives the documents it always gave
    assert FactGenerator(8).document("d", 12) == FactGenerator(8).document("d", 12, shared_attributes=False)
    assert generate_documents(2, 7, min_facts=4, max_facts=6)[0].facts[0].entity == "Shara"


def test_name_valued_documents_put_several_names_next_to_each_entity() -> None:
    assert sorted(NAME_VALUED) == ["capital", "founder", "partner", "river"]
    doc = FactGenerator(8).document("named", 17, name_valued=True, value_first=1.0)
    by_entity: dict[str, list[str]] = {}
    for fact in doc.facts:
        by_entity.setdefault(fact.entity, []).append(fact.attribute)
    assert len(by_entity) == 5 and all(sorted(a) == sorted(NAME_VALUED) for a in list(by_entity.values())[:4])
    assert len({tuple(a) for a in by_entity.values()}) > 1, "each entity lists them in its own order"
    # capital and founder both written value first: a name before the entity's name, told apart by the words between
    assert all(f.value_first for f in doc.facts if f.attribute in ("capital", "founder"))
    assert FactGenerator(8).document("d", 12) == FactGenerator(8).document("d", 12, name_valued=False)


def test_confusable_documents_draw_every_name_from_a_few_syllables() -> None:
    doc = FactGenerator(4).document("look-alike", 24, confusable=True)
    names = {f.entity for f in doc.facts} | {part for f in doc.facts if f.attribute in ("capital", "founder",
                                                                                      "partner", "river")
                                             for part in f.value.split()}
    syllables = {s for name in names for s in SYLLABLE.findall(name.lower())}
    assert len(syllables) <= CONFUSABLE_SYLLABLES < len(SYLLABLES)
    # names really look alike: most entities share their first syllable with another name in the document
    firsts = [first_syllable(name) for name in names]
    assert sum(firsts.count(first) > 1 for first in firsts) > len(firsts) // 2
    assert len({f.entity for f in doc.facts}) >= 4, "still several distinct entities"
    # a long document that runs out of the few syllables' names still completes, with unique names
    long = FactGenerator(4).document("long", 300, confusable=True)
    assert len(long.facts) == 300
    assert len(long.text.split("\n\n")) == len({f.entity for f in long.facts}), "no entity name drawn twice"
    # off by default, and then the seeded stream is untouched
    assert FactGenerator(8).document("d", 12) == FactGenerator(8).document("d", 12, confusable=False)


def test_sibling_documents_give_names_a_shared_first_syllable_and_names_that_extend_others() -> None:
    doc = FactGenerator(5).document("siblings", 40, siblings=True)
    entities = sorted({f.entity for f in doc.facts})
    firsts = {first_syllable(name) for name in entities}
    assert len(firsts) <= 2 < len(entities), "several entities, one of two first syllables"
    assert any(a != b and b.startswith(a) for a in entities for b in entities), "a name extends another one"
    assert len(doc.text.split("\n\n")) == len(entities), "no entity name drawn twice"
    # only entity names are siblings: values come from the whole syllable set as before
    values = {f.value for f in doc.facts if f.attribute in ("capital", "partner", "river")}
    assert any(first_syllable(v) not in firsts for v in values)
    assert all(shares_first_syllable(doc, name) for name in entities), "two first syllables, three or more names"
    assert first_syllable("Venvofi") == "ven" and first_syllable("Resutor") == "re"
    # off by default, and then the seeded stream is untouched
    assert FactGenerator(8).document("d", 12) == FactGenerator(8).document("d", 12, siblings=False)


def test_recall_asks_every_fact_once_after_the_document_and_trains_only_the_values() -> None:
    doc = FactGenerator(8).document("recall", 14, style="lines", siblings=True)
    segments = formats.recall(doc, random.Random(2))
    assert segments[:2] == [(formats.BOS, False), (doc.text + "\n\n", False)]
    asked = segments[2:]
    queries = [text for text, trained in asked[0::3]]
    values = [text for text, trained in asked[1::3]]
    assert all(not trained for _, trained in asked[0::3]) and all(trained for _, trained in asked[1::3])
    assert all(text == "\n" and not trained for text, trained in asked[2::3])
    # every record line once, in another order than the document's
    lines = [f"{query}{value}" for query, value in zip(queries, values, strict=True)]
    assert sorted(lines) == sorted(doc.text.replace("\n\n", "\n").split("\n")) and lines != doc.text.split("\n")
    assert sorted(value.strip() for value in values) == sorted(fact.value for fact in doc.facts)
    # a sentence document with value-first facts: the same look-ups, each value written before its name
    doc = FactGenerator(8).document("recall", 14, siblings=True, value_first=1.0)
    segments = formats.recall(doc, random.Random(2))
    assert segments[1] == (doc.text + "\n\n", False) and "|" not in doc.text
    asked = [(query, value.strip()) for (query, _), (value, _) in zip(segments[2::3], segments[3::3], strict=True)]
    assert sorted(asked) == sorted((f"{f.entity} | {f.attribute} |", f.value) for f in doc.facts)
    assert sum(f.value_first for f in doc.facts) > len(doc.facts) // 2  # (some attributes have no such sentence)


def test_a_facts_template_is_the_one_its_sentence_was_written_from() -> None:
    for style in ("sentences", "lines"):
        doc = FactGenerator(21).document("t", 40, style=style, value_first=0.5)
        for fact in doc.facts:
            template = sentence_template(fact)
            assert template.format(e=fact.entity, v=fact.value) == fact.sentence
            assert template in ATTRIBUTES[fact.attribute][1] or template == f"{{e}} | {fact.attribute} | {{v}}"
            assert is_value_first(template) == fact.value_first

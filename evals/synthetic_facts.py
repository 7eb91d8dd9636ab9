"""Seeded documents about invented entities, with held-out questions, for measuring knowledge injection.

A random or small model knows nothing about "Velkaro", so every correct answer about it must come from the document
(in context) or from a knowledge module (in the weights). A document describes a few invented lands: each fact is one
(entity, attribute, value) triple written in one of several sentence templates, values invented too. Questions come in
two families per attribute: `standard` wording and `paraphrase` wording the reader model never sees in training, so
an evaluation can tell recall from template matching. Everything is drawn from one `random.Random(seed)`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

SYLLABLES = (
    "ka", "lo", "mi", "ra", "ven", "tor", "sel", "du", "bri", "na", "os", "pel", "qui", "zan", "mor", "thi",
    "gal", "re", "su", "vo", "dra", "kel", "fi", "lan", "pu", "sha", "te", "vim", "ul", "yor", "bes", "cam",
)
COLOURS = ("red", "blue", "green", "amber", "violet", "grey", "white", "black", "silver", "golden", "crimson",
           "teal", "orange", "brown", "pink", "ivory")
GOODS = ("salt", "copper", "wool", "tea", "glass", "timber", "silk", "honey", "iron", "pepper", "cotton", "marble",
         "amber", "rice", "tin", "wine")
ANIMALS = ("owl", "fox", "heron", "bear", "lynx", "otter", "hawk", "wolf", "stag", "crane", "badger", "swan",
           "raven", "boar", "eagle", "hare")
# Attribute -> (how a value is drawn, sentence templates, standard questions, paraphrased questions).
# {e} is the entity, {v} the value.
ATTRIBUTES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "capital": ("place", (
        "The capital of {e} is {v}.", "{e} has its capital in {v}.", "{v} is the capital of {e}.",
        "The seat of government of {e} is the city of {v}."),
        ("What is the capital of {e}?", "Which city is the capital of {e}?"),
        ("Where does {e} have its seat of government?", "Name the capital city of {e}.")),
    "founder": ("person", (
        "{e} was founded by {v}.", "The founder of {e} was {v}.", "{v} founded {e}.",
        "It was {v} who founded {e}."),
        ("Who founded {e}?", "Who was the founder of {e}?"),
        ("Which person established {e}?", "By whom was {e} founded?")),
    "year": ("year", (
        "{e} was founded in {v}.", "The year {e} was founded is {v}.", "In {v}, {e} was founded.",
        "{e} dates its founding to {v}."),
        ("In which year was {e} founded?", "When was {e} founded?"),
        ("What year did the founding of {e} happen?", "Give the founding year of {e}.")),
    "colour": ("colour", (
        "The flag of {e} is {v}.", "{e} flies a {v} flag.", "The colour of the flag of {e} is {v}.",
        "People of {e} wave a {v} flag."),
        ("What colour is the flag of {e}?", "Which colour is the flag of {e}?"),
        ("What is the colour of {e}'s flag?", "Describe the colour of the flag that {e} flies.")),
    "partner": ("land", (
        "{e} is allied with {v}.", "The ally of {e} is {v}.", "{e} and {v} are allies.",
        "{e} signed an alliance with {v}."),
        ("Who is the ally of {e}?", "Which land is allied with {e}?"),
        ("With whom did {e} sign an alliance?", "Name the ally of {e}.")),
    "export": ("goods", (
        "{e} exports {v}.", "The main export of {e} is {v}.", "{v} is what {e} sells abroad.",
        "Traders of {e} mostly sell {v}."),
        ("What does {e} export?", "What is the main export of {e}?"),
        ("Which goods does {e} sell abroad?", "What do the traders of {e} mostly sell?")),
    "animal": ("animal", (
        "The symbol of {e} is the {v}.", "{e} has the {v} as its symbol.", "The {v} is the symbol of {e}.",
        "On the coins of {e} there is a {v}."),
        ("What animal is the symbol of {e}?", "What is the symbol of {e}?"),
        ("Which animal appears on the coins of {e}?", "Name the animal that stands for {e}.")),
    "river": ("place", (
        "The river of {e} is the {v}.", "The {v} river flows through {e}.", "{e} lies on the {v} river.",
        "The {v} is the river that crosses {e}."),
        ("What river flows through {e}?", "Which river crosses {e}?"),
        ("On which river does {e} lie?", "Name the river of {e}.")),
}
# one syllable, longest first ("ven" before a shorter syllable it starts with)
SYLLABLE_PATTERN = "|".join(sorted(SYLLABLES, key=len, reverse=True))
SYLLABLE = re.compile(SYLLABLE_PATTERN, re.IGNORECASE)
QUESTION_FAMILIES = ("standard", "paraphrase")
CONFUSABLE_SYLLABLES = 8
SIBLING_EXTENSION = 0.25  # share of a sibling document's names that extend an earlier name by one syllable
TITLE_TEMPLATES = ("Notes on {e}", "A short history of {e}", "The lands around {e}", "Facts about {e} and its allies")


@dataclass(frozen=True)
class Fact:
    """One (entity, attribute, value) triple and the sentence that states it."""

    entity: str
    attribute: str
    value: str
    sentence: str

    @property
    def value_first(self) -> bool:
        """Whether the sentence names the value before the entity (the harder lookup)."""
        return self.sentence.find(self.value) < self.sentence.find(self.entity)


@dataclass(frozen=True)
class Question:
    """A question about one fact: its answer, the wording family and the fact's position in the document."""

    question: str
    answer: str
    family: str
    fact_index: int


@dataclass(frozen=True)
class FactDocument:
    """A generated document: its facts in order and questions about every fact in both wording families."""

    doc_id: str
    title: str
    facts: tuple[Fact, ...]
    questions: tuple[Question, ...] = field(default=())
    style: str = "sentences"

    @property
    def text(self) -> str:
        """The document body: one paragraph per entity (a line per fact in the `lines` style)."""
        paragraphs: list[list[str]] = []
        last = None
        for fact in self.facts:
            if fact.entity != last:
                paragraphs.append([])
                last = fact.entity
            paragraphs[-1].append(fact.sentence)
        joiner = "\n" if self.style == "lines" else " "
        return "\n\n".join(joiner.join(sentences) for sentences in paragraphs)

    def questions_of(self, family: str) -> list[Question]:
        """The questions in one wording family, one per fact."""
        return [q for q in self.questions if q.family == family]


class FactGenerator:
    """Draws names, values, facts and documents from one seeded random stream."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self._used: set[str] = set()
        self._syllables: Sequence[str] = SYLLABLES

    def name(self, syllables: tuple[int, int] = (2, 3)) -> str:
        """A fresh invented name (never repeated within the current document)."""
        attempts = 0
        while True:
            # a document of look-alike names that has used up its few syllables' names draws from all of them
            pool = self._syllables if attempts < 200 else SYLLABLES
            attempts += 1
            parts = [self.rng.choice(pool) for _ in range(self.rng.randint(*syllables))]
            candidate = "".join(parts).capitalize()
            if candidate not in self._used and len(candidate) > 3:
                self._used.add(candidate)
                return candidate

    def sibling_name(self, heads: Sequence[str], earlier: Sequence[str]) -> str:
        """A fresh name starting with one of `heads`, or one of the `earlier` names with a syllable added."""
        while True:
            if earlier and self.rng.random() < SIBLING_EXTENSION:
                candidate = self.rng.choice(earlier) + self.rng.choice(SYLLABLES)
            else:
                tail = [self.rng.choice(SYLLABLES) for _ in range(self.rng.randint(1, 2))]
                candidate = "".join([self.rng.choice(heads), *tail]).capitalize()
            if candidate not in self._used:
                self._used.add(candidate)
                return candidate

    def value(self, kind: str) -> str:
        """A value of one kind: an invented name, a year or a word from a fixed list."""
        if kind == "person":
            return f"{self.name((2, 2))} {self.name((2, 3))}"
        if kind == "year":
            return str(self.rng.randint(1100, 1999))
        if kind in ("place", "land"):
            return self.name()
        return self.rng.choice({"colour": COLOURS, "goods": GOODS, "animal": ANIMALS}[kind])

    def document(self, doc_id: str, n_facts: int, *, sentence_templates: slice = slice(None),
                 style: str = "sentences", shared_attributes: bool = False,
                 value_first: float = 0.0, confusable: bool = False, siblings: bool = False,
                 name_valued: bool = False) -> FactDocument:
        """A document of exactly `n_facts` facts about several entities, with both question families.

        `style="lines"` writes each fact as a record line, `entity | attribute | value`: the reader learns to look
        facts up on these before it meets the varied sentences. `shared_attributes` gives every entity the same
        attributes (in its own order), so a question is answered only by matching its entity, never by its
        attribute alone. `value_first` is the share of facts written in a template that names the value before the
        entity ("Morsu is the capital of Kelka."), the harder lookup; at 0 the templates are drawn uniformly.
        `confusable` draws the document's names from a few syllables only (CONFUSABLE_SYLLABLES), so that names
        share their first or last syllables ("Kelmor", "Kelmi", "Mikel"): a question is answered only by matching
        the whole name, and a value is copied to its end, not continued from a look-alike.
        `siblings` gives the entities' names one of two first syllables, and some names are another one's with a
        syllable added ("Resu", "Resutor"): a lookup that matches a name by its first token finds the wrong entity.
        `name_valued` gives every entity all the attributes whose values are invented names (NAME_VALUED: capital,
        founder, partner, river), so several sentences about an entity put a name next to its name ("Dure is the
        capital of Vensel. Sello Quivosu founded Vensel."): only a reader that also matches the attribute answers.
        """
        self._used = set()  # names are unique within a document; documents are independent worlds
        self._syllables = self.rng.sample(SYLLABLES, k=CONFUSABLE_SYLLABLES) if confusable else SYLLABLES
        heads = self.rng.sample(SYLLABLES, k=2) if siblings else []
        facts: list[Fact] = []
        shared = self.rng.sample(sorted(ATTRIBUTES), k=self.rng.randint(2, 4)) if shared_attributes else []
        if name_valued:
            shared = list(NAME_VALUED)
        while len(facts) < n_facts:
            entity = self.sibling_name(heads, [f.entity for f in facts]) if siblings else self.name()
            attributes = (self.rng.sample(shared, k=len(shared)) if shared
                          else self.rng.sample(sorted(ATTRIBUTES), k=self.rng.randint(3, 6)))
            for attribute in attributes[: n_facts - len(facts)]:
                kind, sentences, _, _ = ATTRIBUTES[attribute]
                value = self.value(kind)
                if value_first and self.rng.random() < value_first:
                    template = self.rng.choice([t for t in sentences if is_value_first(t)] or sentences)
                else:
                    template = self.rng.choice(sentences[sentence_templates])
                sentence = f"{entity} | {attribute} | {value}" if style == "lines" else template.format(
                    e=entity, v=value)
                facts.append(Fact(entity, attribute, value, sentence))
        title = self.rng.choice(TITLE_TEMPLATES).format(e=facts[0].entity)
        return FactDocument(doc_id, title, tuple(facts), tuple(self._questions(facts)), style)

    def _questions(self, facts: Sequence[Fact]) -> Iterator[Question]:
        for index, fact in enumerate(facts):
            _, _, standard, paraphrase = ATTRIBUTES[fact.attribute]
            for family, templates in zip(QUESTION_FAMILIES, (standard, paraphrase), strict=True):
                template = self.rng.choice(templates)
                yield Question(template.format(e=fact.entity), fact.value, family, index)


# The attributes whose values are invented names, like the entities' own.
NAME_VALUED = tuple(name for name, (kind, *_) in ATTRIBUTES.items() if kind in ("place", "person", "land"))


def first_syllable(name: str) -> str:
    """The syllable an invented name starts with (the longest that fits)."""
    match = SYLLABLE.match(name)
    return match.group(0).lower() if match else name[:2].lower()


def shares_first_syllable(doc: FactDocument, entity: str) -> bool:
    """Whether another entity of the document starts with the same syllable as `entity`."""
    first = first_syllable(entity)
    return any(first_syllable(f.entity) == first for f in doc.facts if f.entity != entity)


def sentence_template(fact: Fact) -> str:
    """The template a fact's sentence was written from, `{e}` and `{v}` in place of entity and value (a record
    line's is `{e} | attribute | {v}`)."""
    _, sentences, _, _ = ATTRIBUTES[fact.attribute]
    for template in (*sentences, f"{{e}} | {fact.attribute} | {{v}}"):
        if template.format(e=fact.entity, v=fact.value) == fact.sentence:
            return template
    raise ValueError(f"no template of {fact.attribute!r} writes {fact.sentence!r}")


def is_value_first(template: str) -> bool:
    """Whether a sentence template names the value before the entity."""
    return template.index("{v}") < template.index("{e}")


def generate_documents(count: int, seed: int, *, min_facts: int = 20, max_facts: int = 60,
                       prefix: str = "facts", style: str = "sentences", shared_attributes: bool = False,
                       confusable: bool = False, siblings: bool = False) -> list[FactDocument]:
    """`count` documents of `min_facts`..`max_facts` facts each, reproducible from `seed`."""
    generator = FactGenerator(seed)
    return [generator.document(f"{prefix}-{seed}-{n}", generator.rng.randint(min_facts, max_facts), style=style,
                               shared_attributes=shared_attributes, confusable=confusable, siblings=siblings)
            for n in range(count)]


def restatement(fact: Fact, rng: random.Random) -> str:
    """The fact in a standard sentence (a summary restates facts, possibly worded unlike the document)."""
    _, sentences, _, _ = ATTRIBUTES[fact.attribute]
    return rng.choice(sentences).format(e=fact.entity, v=fact.value)

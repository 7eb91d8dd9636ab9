"""Train the reader model from scratch: `python -m evals.reader.train --out evals/reader/model`.

Recipe (seeded, reproducible on one machine; numbers, the exact command and any earlier phase in RECIPE.json):
1. A BPE tokenizer trained on the fact generator's text, the platform's prompts and a little English. Every word
   carries its leading space (one is supplied at the start of a text or a line), a digit is its own token and
   invented names are cut into their syllables: a name or a year is the same few frequent tokens wherever it stands,
   and answering is copying tokens (`--tokenizer spaces`, the earlier scheme, makes a space its own token).
2. A small Llama (tied embeddings) warmed up on induction: random tokens, a filler, the same tokens again, loss on
   the repeat, until the loss is below `--induction-stop`. The distance varies: at a fixed distance the model learns
   to look a fixed number of positions back (loss ~0 in a few hundred steps) and that copies nothing in a document.
   The tokens are drawn from those generated documents are made of (a few hundred): drawn from the whole vocabulary
   the copying had not formed after 700 steps at batch 64; from the documents' tokens it forms in ~690 at batch 32.
3. Mixed skills on generated documents (evals.reader.formats), with a curriculum on the number of facts per document
   that doubles whenever the running exact match of answers reaches 90%, up to the maximum; a share of batches stay
   induction. Documents can be written a line per fact (`--line-docs`) and questions about them asked as the
   line's prefix (`--record-queries`): plain copying first, questions in words on top. `--shared-attributes` gives
   a share of documents the same attributes for every entity, where only matching the entity answers, and
   `--confusable` a share whose names are drawn from a few syllables (look-alikes: only the whole name matches),
   `--siblings` a share whose names share their first syllable or extend one another ("Resu", "Resutor").
   Accuracy is teacher-forced exact match of every answer token on fresh documents (never seen before). Phases
   chain with `--init-from` (a continued phase keeps the earlier phase's tokenizer) and can grow the model
   (`--layers`, `--heads`, `--hidden`, `--intermediate`): the grown model computes what the earlier one did until
   trained.
4. Held-out evaluation by greedy generation on new documents of 20+ facts, document in context, the serving prompt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from engines.prompts import CLOSED_BOOK_PROMPT, PASSAGES_PREAMBLE, reader_prompt
from engines.tiny_model import CHAT_TEMPLATE, CORPUS, PAD, SPECIAL_TOKENS
from evals.reader import formats
from evals.synthetic_facts import SYLLABLE, SYLLABLE_PATTERN, FactDocument, FactGenerator, generate_documents
from trainer_worker.km_data import QA_PROMPT as SDCD_QA_PROMPT
from trainer_worker.km_data import SUMMARY_PROMPT as SDCD_SUMMARY_PROMPT
from trainer_worker.synthesize import QA_PROMPT, SUMMARY_PROMPT


@dataclass
class Recipe:
    """Everything that determines the reader's weights."""

    seed: int = 0
    vocab_size: int = 2048
    hidden_size: int = 256
    layers: int = 4
    heads: int = 8
    head_dim: int = 32
    intermediate_size: int = 512
    max_positions: int = 2048
    lr: float = 1e-3
    weight_decay: float = 0.01
    induction_steps: int = 1500
    induction_length: int = 48
    induction_batch: int = 32
    steps: int = 2500
    token_budget: int = 4096
    max_seq: int = 768
    induction_mix: float = 0.2
    start_facts: int = 2
    max_facts: int = 32
    promote_at: float = 0.9
    window: int = 400
    threads: int = 2
    task_weights: tuple[float, ...] = (0.45, 0.12, 0.10, 0.10, 0.06, 0.12, 0.05)
    line_docs: float = 0.0
    record_queries: float = 0.0
    shared_attributes: float = 0.0
    tokenizer: str = "words"
    induction_pool: str = "documents"
    induction_stop: float = 0.5
    value_first: float = 0.0
    confusable: float = 0.0
    siblings: float = 0.0
    data_seed: int | None = None  # the training stream's seed when not `seed` (a continued run's fresh documents)
    followups: int = 12  # most closed-book questions after a document's first answer (at most one per fact)
    recall_mix: float = 0.0  # share of batches of dense recall (formats.recall) on documents of look-alike names
    recall_siblings: float = 0.5  # share of those documents with sibling names (the others look-alike names)
    recall_sentences: float = 0.0  # share of recall documents in sentences (value first as `value_first` says)
    name_valued: float = 0.0  # share of documents whose entities all have every name-valued attribute
    ema: float = 0.0  # decay of an exponential moving average of the weights, which is then what is saved (0: off)
    backward_mix: float = 0.0  # share of batches of random-token backward look-ups (formats.backward)
    backward_variant: str = "recurring"  # which (formats.BACKWARD_VARIANTS; "forward" is the induction control)
    bind_weight: float = 0.0  # weight of the binding loss (`bindings`) added to the skills' loss (0: off)
    bind_layer: int = 3  # the layer whose output at a value-first fact's entity is read for its value
    retrieve_weight: float = 0.0  # weight of the retrieval loss (`retrievals`: answer attends to entity; 0: off)
    retrieve_layer: int = 5  # the layer one of whose heads is trained to attend to the bound entity


NAME = re.compile(rf"\b(?:{SYLLABLE_PATTERN})+\b", re.IGNORECASE)


def split_names(line: str) -> str:
    """Invented names cut into their syllables, so that no merge spans two syllables: a name is then a few frequent
    tokens (well trained everywhere) rather than one rare token per name."""
    return NAME.sub(lambda m: " ".join(SYLLABLE.findall(m.group(0))), line)


def tokenizer_corpus(seed: int, cut_names: bool = True) -> list[str]:
    """Lines the tokenizer is trained on: generated documents, questions, summaries and every platform prompt."""
    rng = random.Random(seed)
    lines = CORPUS.splitlines()
    for doc in generate_documents(400, seed + 7, min_facts=4, max_facts=30, prefix="tok"):
        generated = [*doc.text.split("\n\n"), *(q.question + " " + q.answer for q in doc.questions),
                     formats.summary_text(doc, rng)]
        lines.extend(split_names(line) if cut_names else line for line in generated)
    if not cut_names:  # record lines too (the tokenizer that cuts names keeps its first corpus, and so its vocabulary)
        lines.extend(line for doc in generate_documents(100, seed + 8, min_facts=4, max_facts=12, style="lines")
                     for line in doc.text.splitlines())
    prompts = (SUMMARY_PROMPT.format(words=100, text=""), QA_PROMPT.format(n=5, text=""),
               CLOSED_BOOK_PROMPT.format(question=""), PASSAGES_PREAMBLE, SDCD_QA_PROMPT, SDCD_SUMMARY_PROMPT,
               reader_prompt("", ["x"]))
    lines.extend(line for p in prompts for line in p.splitlines() * 20)
    return lines


def build_tokenizer(recipe: Recipe) -> Any:
    """Byte-level BPE on the corpus above, with the default model's special tokens and chat template.

    Two schemes (`recipe.tokenizer`). `spaces`: a space is its own token, so a word is the same tokens wherever it
    stands (after a space, a newline or at the start of an answer). `words`: every word carries its leading space,
    and one is supplied where a word starts a text or a line, so again a word is the same tokens everywhere, while a
    record line is fewer tokens and copying a value never crosses a lone space. Under both, digits are single tokens
    (a year is four well-trained tokens, not one of hundreds of rare ones) and invented names are their syllables (a
    few frequent tokens, well trained everywhere, rather than one rare token per name): answering is copying tokens
    from the document, which a small model learns fast.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    words = recipe.tokenizer == "words"
    if words:
        tok.normalizer = normalizers.Sequence([
            normalizers.Prepend(" "), normalizers.Replace(Regex(r"\n(?=\S)"), "\n "),
            normalizers.Replace(Regex(r"\A (?=\s)"), "")])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r" ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"), behavior="isolated"),
            pre_tokenizers.Split(Regex(f" ?(?i:{SYLLABLE_PATTERN})"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        # the supplied spaces are not text: a text's or a line's first word decodes without one
        tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("\n ", "\n"),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(" ", behavior="isolated"), pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=recipe.vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(recipe.seed, cut_names=not words), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=formats.BOS, eos_token=formats.EOS,
                                   pad_token=PAD, chat_template=CHAT_TEMPLATE, padding_side="left",
                                   model_max_length=recipe.max_positions)


def phase_tokenizer(recipe: Recipe, init_from: Path | None) -> Any:
    """A continued run's tokenizer is the earlier phase's, as saved with its weights (the ids those weights were
    trained on, whatever the corpus has become since); a first phase builds one from the recipe."""
    if init_from is not None and (init_from / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(init_from)
    return build_tokenizer(recipe)


def build_model(recipe: Recipe, tokenizer: Any) -> Any:
    """The Llama the recipe describes, weights drawn from its seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.heads,
        head_dim=recipe.head_dim,
        max_position_embeddings=recipe.max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
RESIDUAL_OUTPUTS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def grown(state: dict[str, Any], layers: int) -> dict[str, Any]:
    """An earlier phase's weights stretched to `layers` decoder layers without changing what the model computes.

    Each added layer is a copy of the layer before it with its two residual outputs (attention and MLP output
    projections) zeroed: it adds nothing to the residual stream until training moves those projections, while its
    queries, keys and MLP inputs start from weights that already read that stream. Added layers are spread over
    the middle of the stack (where a look-up composes), the first and last old layers stay at the ends.
    """
    old = 1 + max((int(m.group(1)) for key in state if (m := LAYER.match(key))), default=-1)
    if old == 0 or layers <= old:
        return state
    # old layer i is followed by copies[i] added layers; layers 1..old-2 take them in turn (or the first if old < 3)
    middle = list(range(1, old - 1)) or [0]
    copies = [0] * old
    for n in range(layers - old):
        copies[middle[n % len(middle)]] += 1
    source = [i for i in range(old) for _ in range(1 + copies[i])]
    added = {n for n in range(1, layers) if source[n] == source[n - 1]}
    out = {key: value for key, value in state.items() if not LAYER.match(key)}
    for key, value in state.items():
        if (m := LAYER.match(key)) is None:
            continue
        for n, origin in enumerate(source):
            if origin == int(m.group(1)):
                zero = n in added and m.group(2) in RESIDUAL_OUTPUTS
                out[f"model.layers.{n}.{m.group(2)}"] = value.clone().zero_() if zero else value.clone()
    return out


HEAD_INPUTS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")


def with_heads(state: dict[str, Any], heads: int, head_dim: int, seed: int = 0, noise: float = 0.01) -> dict[str, Any]:
    """An earlier phase's weights given `heads` attention heads per layer without changing what the model computes.

    Added heads start as copies of the old heads in turn (queries, keys and values, plus a little noise so that a
    copy can part ways with its original) and write nothing: their columns of the output projection are zero, so
    the residual stream is unchanged until training moves them. The residual width stays as it was.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    out = dict(state)
    for key, value in state.items():
        if (m := LAYER.match(key)) is None:
            continue
        if m.group(2) in HEAD_INPUTS and (old := value.shape[0] // head_dim) < heads:
            copies = value.view(old, head_dim, -1)[[h % old for h in range(old, heads)]].reshape(-1, value.shape[1])
            jitter = torch.randn(copies.shape, generator=generator, dtype=value.dtype) * noise
            out[key] = torch.cat([value, copies + jitter])
        elif m.group(2) == "self_attn.o_proj.weight" and (old := value.shape[1] // head_dim) < heads:
            out[key] = torch.cat([value, value.new_zeros(value.shape[0], (heads - old) * head_dim)], dim=1)
    return out


def induction_pool(recipe: Recipe, tokenizer: Any) -> list[int]:
    """Token ids the induction warm-up draws from: the whole vocabulary but the special tokens, or (`documents`)
    only the tokens generated documents are made of, a few hundred, each then trained far more often."""
    if recipe.induction_pool == "vocab":
        return list(range(len(SPECIAL_TOKENS), len(tokenizer)))
    docs = [*generate_documents(50, recipe.seed + 9, min_facts=4, max_facts=12, style="lines"),
            *generate_documents(50, recipe.seed + 10, min_facts=4, max_facts=12)]
    ids = {i for doc in docs for text in (doc.text, *(q.question for q in doc.questions))
           for i in tokenizer(text, add_special_tokens=False)["input_ids"]}
    return sorted(ids - set(tokenizer.all_special_ids))


class Curriculum:
    """Facts per document, doubled when the running answer accuracy reaches the promotion threshold."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.facts = recipe.start_facts
        self.hits: deque[bool] = deque(maxlen=recipe.window)

    def record(self, correct: list[bool]) -> bool:
        """Add answer outcomes; True when the curriculum moved up."""
        self.hits.extend(correct)
        if len(self.hits) < self.hits.maxlen or self.accuracy < self.recipe.promote_at:  # type: ignore[operator]
            return False
        if self.facts >= self.recipe.max_facts:
            return False
        self.facts = min(self.recipe.max_facts, self.facts * 2)
        self.hits.clear()
        return True

    @property
    def accuracy(self) -> float:
        """Share of exactly right answers in the window."""
        return sum(self.hits) / max(1, len(self.hits))


def sample_sequence(task: str, gen: FactGenerator, n_facts: int, tokenizer: Any, recipe: Recipe,
                    bind: bool = False) -> Any:
    """One encoded training sequence of `task` on a fresh document: ids and labels, and (`bind`) the targets of the
    binding and retrieval losses in it (`bindings`, `retrievals`)."""
    rng = gen.rng
    facts = rng.randint(max(1, n_facts // 2), n_facts)
    if task in ("summary", "sdcd_summary"):
        facts = min(facts, 24)  # document + restatement must fit max_seq
    style = "lines" if rng.random() < recipe.line_docs else "sentences"
    shared = recipe.shared_attributes > 0 and rng.random() < recipe.shared_attributes
    confusable = recipe.confusable > 0 and rng.random() < recipe.confusable
    siblings = recipe.siblings > 0 and rng.random() < recipe.siblings
    named = recipe.name_valued > 0 and rng.random() < recipe.name_valued
    doc = gen.document("train", facts, style=style, shared_attributes=shared, value_first=recipe.value_first,
                       confusable=confusable, siblings=siblings, name_valued=named)
    if style == "lines" and recipe.record_queries:
        doc = formats.record_queries(doc, rng, recipe.record_queries)
    extra = rng.randint(min(recipe.followups, facts) // 2, min(recipe.followups, facts))
    if task == "icl":
        segments = formats.icl(doc, rng, extra)
    elif task == "rag":
        segments = formats.rag(doc, gen.document("other", rng.randint(3, 10), style=style), rng, 0)
    elif task == "summary":
        segments = formats.summary(doc, rng, len(tokenizer(doc.text)["input_ids"]))
    elif task == "qa_write":
        segments = formats.qa_write(doc, rng)
    elif task == "sdcd_summary":
        segments = formats.sdcd_summary(doc, rng, extra // 2)
    elif task == "sdcd_qa":
        segments = formats.sdcd_qa(doc, rng, extra)
    else:
        segments = formats.document(doc)
    ids, labels = formats.encode(tokenizer, segments, recipe.max_seq)
    if not bind:
        return ids, labels
    located = _bound_facts(doc, ids, tokenizer)  # once for both losses
    return (ids, labels, [(end, value[0]) for end, value, _ in located],
            _retrieval_pairs(located, ids, labels, tokenizer))


BIND_GAP = 16  # most tokens between the end of a value and its entity's name within one sentence


def bindings(doc: FactDocument, ids: list[int], tokenizer: Any) -> list[tuple[int, int]]:
    """(position, token) pairs: where a value-first fact's entity name ends in its sentence, and its value's first
    token. The binding loss reads the reader's hidden state there (`Recipe.bind_layer`, through the final norm and
    the tied output embedding) and trains it to name the value.

    A causal reader answers "What is the capital of Kelka?" from "Morsu is the capital of Kelka." only if the
    state at "Kelka" already holds "Morsu" (the value stands before the name the question matches, so a look-up at
    question time cannot see it from there); the answer loss alone teaches that binding too rarely (one asked fact
    among a document's dozens, see the README). Every value-first sentence of every training document gives one
    target here. Facts whose names the sequence was cut before, or that are not in sentences, give none.
    """
    return [(end, value[0]) for end, value, _ in _bound_facts(doc, ids, tokenizer)]


def _bound_facts(doc: FactDocument, ids: list[int], tokenizer: Any) -> list[tuple[int, list[int], list[int]]]:
    """Each value-first fact found in `ids`: its entity's last position, its value's and its entity's tokens."""
    stop = tokenizer(".", add_special_tokens=False)["input_ids"][-1]
    starts: dict[int, list[int]] = {}
    for position, token in enumerate(ids):
        starts.setdefault(token, []).append(position)
    found = []
    for fact in doc.facts:
        if not fact.value_first:
            continue
        value = tokenizer(fact.value, add_special_tokens=False)["input_ids"]
        entity = tokenizer(fact.entity, add_special_tokens=False)["input_ids"]
        end = _bound_entity(ids, starts.get(value[0], []), value, entity, stop)
        if end is not None:
            found.append((end, value, entity))
    return found


def retrievals(doc: FactDocument, ids: list[int], labels: list[int], tokenizer: Any) -> list[tuple[int, int]]:
    """(query, key) position pairs: where an answer to a value-first fact starts (the position whose output names
    its first token) and that fact's bound entity (`bindings`). The retrieval loss trains one head of a later layer
    to attend from the first to the second, so that the value bound there is what the answer copies. Answers that
    more than one such fact could give (same value, the entity named in the question) are left out."""
    return _retrieval_pairs(_bound_facts(doc, ids, tokenizer), ids, labels, tokenizer)


def _retrieval_pairs(facts: list[tuple[int, list[int], list[int]]], ids: list[int], labels: list[int],
                     tokenizer: Any) -> list[tuple[int, int]]:
    """`retrievals` of facts already located by `_bound_facts`."""
    if not facts:
        return []
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    pairs = []
    for start, end in answer_spans(labels, tokenizer.eos_token_id):
        answer = labels[start:end - 1]
        asked = ids[max(i for i in range(start) if ids[i] == user):start] if user in ids[:start] else []
        keys = [key for key, value, entity in facts if value == answer
                and any(asked[i:i + len(entity)] == entity for i in range(len(asked)))]
        if len(keys) == 1:
            pairs.append((start - 1, keys[0]))
    return pairs


def _bound_entity(ids: list[int], candidates: list[int], value: list[int], entity: list[int], stop: int) -> int | None:
    """Last position of the first `entity` that follows `value` in the same sentence (the document comes first in
    every training format, so the first such pair is the fact's sentence)."""
    for i in candidates:
        if ids[i:i + len(value)] != value:
            continue
        for j in range(i + len(value), min(len(ids) - len(entity) + 1, i + len(value) + BIND_GAP)):
            if ids[j] == stop:
                break
            if ids[j:j + len(entity)] == entity:
                return j + len(entity) - 1
    return None


def answer_spans(labels: list[int], eos_id: int) -> list[tuple[int, int]]:
    """Positions of each short trained span ending with EOS (the answers), for exact-match tracking."""
    spans, start = [], None
    for i, label in enumerate(labels):
        if label != -100 and start is None:
            start = i
        if label == -100 and start is not None:
            start = None
        if label == eos_id and start is not None:
            if i - start <= 12:
                spans.append((start, i + 1))
            start = None
    return spans


def make_batch(items: Sequence[tuple[list[int], ...]], pad_id: int) -> tuple[Any, Any, Any]:
    """Right-padded ids, labels and attention mask (of items that start with ids and labels)."""
    import torch

    width = max(len(item[0]) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (seq, lab, *_) in enumerate(items):
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(seq)] = 1
    return ids, labels, mask


def exact_answers(logits: Any, labels: Any, items: Sequence[tuple[list[int], ...]], eos_id: int) -> list[bool]:
    """Teacher-forced exact match of each answer span."""
    predicted = logits.argmax(-1)
    out = []
    for row, (_, lab, *_) in enumerate(items):
        for start, end in answer_spans(lab, eos_id):
            # logits at position p predict token p + 1
            out.append(bool((predicted[row, start - 1: end - 1] == labels[row, start:end]).all()))
    return out


def lr_at(step: int, total: int, base: float) -> float:
    """Short warmup, flat, cosine over the last 30%."""
    if step < 100:
        return base * (step + 1) / 100
    tail = int(total * 0.7)
    if step < tail:
        return base
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - tail) / max(1, total - tail))))


NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
# (input columns, output rows) each layer matrix widens: the residual stream's width is d, the MLP's is i
LAYER_MATRICES = {"self_attn.q_proj.weight": ("d", None), "self_attn.k_proj.weight": ("d", None),
                  "self_attn.v_proj.weight": ("d", None), "self_attn.o_proj.weight": (None, "d"),
                  "mlp.gate_proj.weight": ("d", "i"), "mlp.up_proj.weight": ("d", "i"),
                  "mlp.down_proj.weight": ("i", "d")}


def widened(state: dict[str, Any], hidden: int, intermediate: int, seed: int = 0,
            std: float = 0.02) -> dict[str, Any]:
    """An earlier phase's weights with a wider residual stream (`hidden`) and MLP (`intermediate`), computing what
    they did until trained (up to the norms' epsilon, now averaged over more dimensions).

    The added residual dimensions start at zero everywhere they are written (embedding columns, attention and MLP
    output rows), so the stream carries the old values plus zeros; the RMS norms' old gains shrink by
    sqrt(old / hidden) to undo the longer vector they now average over. Whatever reads the stream (queries, keys,
    values, MLP inputs) gets random columns for the added dimensions, which read zeros for now, so gradients reach
    them and the added dimensions part ways. Added MLP units read the stream with random weights and write nothing.
    """
    import torch

    embed = state["model.embed_tokens.weight"]
    old_hidden = embed.shape[1]
    old_inter = next(v.shape[0] for k, v in state.items() if k.endswith("mlp.up_proj.weight"))
    if hidden < old_hidden or intermediate < old_inter:
        raise ValueError(f"cannot narrow a {old_hidden}-wide model (MLP {old_inter}) to {hidden} (MLP {intermediate})")
    if hidden == old_hidden and intermediate == old_inter:
        return state
    generator = torch.Generator().manual_seed(seed)
    size = {"d": (old_hidden, hidden), "i": (old_inter, intermediate)}
    scale = (old_hidden / hidden) ** 0.5

    def grow(value: Any, columns: str | None, rows: str | None) -> Any:
        out_rows = size[rows][1] if rows else value.shape[0]
        out_cols = size[columns][1] if columns else value.shape[1]
        # what reads the added stream dimensions, and the added MLP units' inputs: random; what writes the added
        # stream dimensions (o_proj, down_proj, whose added MLP columns stay zero too): zero
        random_fill = columns == "d" or rows == "i"
        grown_value = (torch.randn(out_rows, out_cols, generator=generator, dtype=value.dtype) * std
                       if random_fill else value.new_zeros(out_rows, out_cols))
        grown_value[: value.shape[0], : value.shape[1]] = value
        return grown_value

    def norm(value: Any) -> Any:
        gains = value.new_full((hidden,), float(value.abs().mean()) * scale)
        gains[: value.shape[0]] = value * scale
        return gains

    out: dict[str, Any] = {}
    for key, value in state.items():
        m = LAYER.match(key)
        part = m.group(2) if m else key
        if part in LAYER_MATRICES:
            out[key] = grow(value, *LAYER_MATRICES[part])
        elif part in NORMS or key == "model.norm.weight":
            out[key] = norm(value)
        elif key in ("model.embed_tokens.weight", "lm_head.weight"):
            out[key] = torch.cat([value, value.new_zeros(value.shape[0], hidden - old_hidden)], dim=1)
        else:
            out[key] = value
    return out


def training_stream(recipe: Recipe) -> tuple[random.Random, FactGenerator]:
    """The batch-choice generator and the document generator of a run: drawn from `data_seed` when set, else from
    `seed` (which fixes a first phase's tokenizer and initial weights)."""
    stream = recipe.seed if recipe.data_seed is None else recipe.data_seed
    return random.Random(stream + 1), FactGenerator(stream + 2)


def train(recipe: Recipe, out: Path, log_every: int = 50, init_from: Path | None = None) -> dict[str, Any]:
    """Run the whole recipe (from `init_from`'s weights when given); save into `out`; return the training log."""
    import torch

    torch.set_num_threads(recipe.threads)
    tokenizer = phase_tokenizer(recipe, init_from)
    model = build_model(recipe, tokenizer)
    if recipe.retrieve_weight > 0:  # the retrieval loss reads attention weights, which only eager attention returns
        model.set_attn_implementation("eager")
    if init_from is not None:  # a continued run: the earlier phase's weights (its recipe is recorded with them)
        from safetensors.torch import load_file

        earlier = widened(grown(load_file(init_from / "model.safetensors"), recipe.layers), recipe.hidden_size,
                          recipe.intermediate_size, recipe.seed)
        model.load_state_dict(with_heads(earlier, recipe.heads, recipe.head_dim, recipe.seed), strict=False)
        model.tie_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay,
                                  betas=(0.9, 0.98))
    # The saved weights: the model's own, or their moving average, which smooths the step-to-step wander of a
    # late phase (held-out accuracy moves by points between checkpoints 250 steps apart).
    average = (torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(
        recipe.ema)) if recipe.ema else None)
    saved = model if average is None else average.module
    rng, gen = training_stream(recipe)
    pool = induction_pool(recipe, tokenizer)
    marks = backward_marks(tokenizer)
    backward_pool = [i for i in pool if i not in marks]
    log: dict[str, Any] = {"induction": [], "skills": [], "recall": [], "backward": [], "promotions": []}
    if init_from is not None and (init_from / "RECIPE.json").exists():
        log["previous"] = json.loads((init_from / "RECIPE.json").read_text())
    started = time.monotonic()
    model.train()
    recent: deque[float] = deque(maxlen=20)
    items: Sequence[tuple[list[int], ...]]
    for step in range(recipe.induction_steps):
        items = _induction_batch(rng, pool, recipe)
        loss, _, _ = _step(model, optimizer, items, tokenizer, lr_at(step, recipe.induction_steps * 2, recipe.lr))
        if average is not None:
            average.update_parameters(model)
        recent.append(loss)
        if step % log_every == 0:
            log["induction"].append({"step": step, "loss": loss, "s": round(time.monotonic() - started, 1)})
            print(f"induction {step} loss {loss:.3f} {time.monotonic() - started:.0f}s", flush=True)
        if len(recent) == recent.maxlen and sum(recent) / len(recent) < recipe.induction_stop:
            log["induction_stopped"] = step  # copying has formed: the rest of the warm-up would teach nothing new
            print(f"induction formed at step {step}", flush=True)
            break
    curriculum = Curriculum(recipe)
    tasks = formats.TASKS
    recall_from, backward_from = recipe.induction_mix, recipe.induction_mix + recipe.recall_mix
    for step in range(recipe.steps):
        draw = rng.random()
        recall = recall_from <= draw < backward_from
        backward = backward_from <= draw < backward_from + recipe.backward_mix
        if draw < recipe.induction_mix:
            items = _induction_batch(rng, pool, recipe)
        elif recall:
            items = _recall_batch(rng, gen, tokenizer, recipe)
        elif backward:
            items = _fill(lambda: formats.backward(rng, backward_pool, marks, rng.randint(4, 16),
                                                     recipe.backward_variant),
                          recipe.token_budget)
        else:
            items = _skill_batch(rng, gen, curriculum.facts, tokenizer, recipe, tasks)
        skills = not (draw < recipe.induction_mix or recall or backward)
        bind = (recipe.bind_weight, recipe.bind_layer) if recipe.bind_weight > 0 and skills else None
        retrieve = (recipe.retrieve_weight, recipe.retrieve_layer) if recipe.retrieve_weight > 0 and skills else None
        loss, correct, aux = _step(model, optimizer, items, tokenizer, lr_at(step, recipe.steps, recipe.lr), bind,
                                   retrieve)
        if average is not None:
            average.update_parameters(model)
        if recall:  # its look-ups carry no EOS-ended answers: the curriculum's accuracy is the skills' alone
            if step % log_every == 0:
                log["recall"].append({"step": step, "loss": loss, "s": round(time.monotonic() - started, 1)})
                print(json.dumps({"step": step, "recall_loss": loss}), flush=True)
        elif backward:  # its own accuracy: how well value-before-match look-ups are done on random tokens
            if step % log_every == 0:
                log["backward"].append({"step": step, "loss": loss, "em": round(sum(correct) / len(correct), 3)})
                print(json.dumps({"step": step, "backward_loss": loss, "backward_em": log["backward"][-1]["em"]}),
                      flush=True)
        else:
            if curriculum.record(correct):
                log["promotions"].append({"step": step, "facts": curriculum.facts})
                print(f"step {step}: curriculum -> {curriculum.facts} facts", flush=True)
            if step % log_every == 0:
                entry = {"step": step, "loss": loss, "facts": curriculum.facts, "em": round(curriculum.accuracy, 3),
                         "s": round(time.monotonic() - started, 1)}
                if aux is not None:  # the auxiliary losses and their accuracy or attention
                    entry |= {key: round(value, 4) for key, value in aux.items()}
                log["skills"].append(entry)
                print(json.dumps(entry), flush=True)
        if step % 250 == 249:
            save(saved, tokenizer, recipe, out, log)
    log["train_seconds"] = round(time.monotonic() - started, 1)
    save(saved, tokenizer, recipe, out, log)
    return log


def backward_marks(tokenizer: Any) -> tuple[int, int, int, int, int]:
    """Ids of the full stop, comma, question mark and newline (each the last token of its encoding) and EOS."""
    stop, comma, ask, newline = (tokenizer(mark, add_special_tokens=False)["input_ids"][-1]
                                 for mark in (".", ",", "?", "\n"))
    return stop, comma, ask, newline, tokenizer.eos_token_id


def _induction_batch(rng: random.Random, pool: list[int], recipe: Recipe) -> list[tuple[list[int], list[int]]]:
    return [formats.induction(rng, pool, recipe.induction_length) for _ in range(recipe.induction_batch)]


Item = TypeVar("Item", bound=tuple[list[int], ...])


def _fill(draw: Callable[[], Item], budget: int) -> list[Item]:
    """Sequences from `draw` until one more would take the padded batch past `budget` tokens (at least one)."""
    items: list[Item] = []
    longest = 0
    while True:
        item = draw()
        longest = max(longest, len(item[0]))
        if items and longest * (len(items) + 1) > budget:
            return items
        items.append(item)


def _recall_batch(rng: random.Random, gen: FactGenerator, tokenizer: Any,
                  recipe: Recipe) -> list[tuple[list[int], list[int]]]:
    """Dense recall sequences (every fact looked up) on documents whose names share syllables: line documents, and
    (`recall_sentences`) sentence documents, where a value-first fact's value is copied from before the match."""

    def draw() -> tuple[list[int], list[int]]:
        siblings = rng.random() < recipe.recall_siblings
        facts = rng.randint(max(1, recipe.max_facts // 2), recipe.max_facts)
        if recipe.recall_sentences and rng.random() < recipe.recall_sentences:
            doc = gen.document("recall", facts, siblings=siblings, confusable=not siblings,
                               value_first=recipe.value_first)
        else:
            doc = gen.document("recall", facts, style="lines", siblings=siblings, confusable=not siblings)
        return formats.encode(tokenizer, formats.recall(doc, rng), recipe.max_seq)

    return _fill(draw, recipe.token_budget)


def _skill_batch(rng: random.Random, gen: FactGenerator, facts: int, tokenizer: Any, recipe: Recipe,
                 tasks: tuple[str, ...]) -> list[tuple[list[int], ...]]:
    return _fill(lambda: sample_sequence(rng.choices(tasks, weights=recipe.task_weights)[0], gen, facts, tokenizer,
                                         recipe, bind=recipe.bind_weight > 0 or recipe.retrieve_weight > 0),
                 recipe.token_budget)


def retrieval_loss(attentions: Any, items: Sequence[tuple[list[int], ...]]) -> tuple[Any, float] | None:
    """Negative log of the attention the best-placed head of one layer (`attentions`: batch, heads, query, key)
    gives each retrieval pair's key from its query (`retrievals`, the items' fourth part), and that attention's
    mean; None when the items carry no pairs."""
    import torch

    rows = [(row, query, key) for row, item in enumerate(items) if len(item) > 3
            for query, key in cast(list[tuple[int, int]], item[3])]
    if not rows:
        return None
    at = torch.tensor(rows)
    weights = attentions[at[:, 0], :, at[:, 1], at[:, 2]].max(dim=-1).values  # the head that attends there most
    return -torch.log(weights + 1e-6).mean(), float(weights.mean().item())


def binding_loss(model: Any, hidden: Any, items: Sequence[tuple[list[int], ...]]) -> tuple[Any, list[bool]] | None:
    """Cross-entropy of each binding target (`bindings`, the items' third part) read from `hidden` (one layer's
    output) through the final norm and the output embedding, and whether each is already the top token; None when
    the items carry no targets."""
    import torch

    rows = [(row, position, token) for row, item in enumerate(items) if len(item) > 2
            for position, token in cast(list[tuple[int, int]], item[2])]
    if not rows:
        return None
    at = torch.tensor([[row, position] for row, position, _ in rows])
    targets = torch.tensor([token for _, _, token in rows])
    logits = model.lm_head(model.model.norm(hidden[at[:, 0], at[:, 1]]))
    return torch.nn.functional.cross_entropy(logits, targets), (logits.argmax(-1) == targets).tolist()


def _step(model: Any, optimizer: Any, items: Sequence[tuple[list[int], ...]], tokenizer: Any,
          lr: float, bind: tuple[float, int] | None = None,
          retrieve: tuple[float, int] | None = None) -> tuple[float, list[bool], dict[str, float] | None]:
    """One optimiser step: the loss, each answer's teacher-forced exact match, and with `bind` (weight, layer) the
    binding loss, added to the loss, with its top-1 accuracy, and with `retrieve` (weight, layer; the model's
    attention eager) the retrieval loss with its mean attention (None without either)."""
    import torch

    ids, labels, mask = make_batch(items, tokenizer.pad_token_id)
    for group in optimizer.param_groups:
        group["lr"] = lr
    output = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=bind is not None,
                   output_attentions=retrieve is not None)
    loss = output.loss
    stats: dict[str, float] = {}
    bound = None if bind is None else binding_loss(model, output.hidden_states[bind[1]], items)
    if bind is not None and bound is not None:
        loss = loss + bind[0] * bound[0]
        stats |= {"bind_loss": float(bound[0].item()), "bind_acc": sum(bound[1]) / len(bound[1])}
    found = None if retrieve is None else retrieval_loss(output.attentions[retrieve[1] - 1], items)
    if retrieve is not None and found is not None:
        loss = loss + retrieve[0] * found[0]
        stats |= {"retrieve_loss": float(found[0].item()), "retrieve_attention": found[1]}
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        correct = exact_answers(output.logits, labels, items, tokenizer.eos_token_id)
    return float(output.loss.item()), correct, stats or None


def save(model: Any, tokenizer: Any, recipe: Recipe, out: Path, log: dict[str, Any]) -> None:
    """Weights (safetensors), tokenizer, recipe, training log and the weights' hash."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    params = sum(p.numel() for p in model.parameters())
    (out / "RECIPE.json").write_text(json.dumps(
        {"recipe": asdict(recipe), "parameters": params, "weights_sha256": digest,
         "command": " ".join(["python -m evals.reader.train", *sys.argv[1:]]), "log": log}, indent=1) + "\n")


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("evals/reader/model"))
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    parser.add_argument("--induction-steps", type=int, default=Recipe.induction_steps)
    parser.add_argument("--threads", type=int, default=Recipe.threads)
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    parser.add_argument("--data-seed", type=int, default=None,
                        help="Seed of the training documents when not --seed (the tokenizer stays the earlier "
                             "phase's): a continued run then reads documents the earlier phase never saw.")
    parser.add_argument("--init-from", type=Path, default=None, help="Continue from these weights.")
    parser.add_argument("--start-facts", type=int, default=Recipe.start_facts)
    parser.add_argument("--max-facts", type=int, default=Recipe.max_facts)
    parser.add_argument("--line-docs", type=float, default=Recipe.line_docs,
                        help="Share of documents written a line per fact (`entity | attribute | value`).")
    parser.add_argument("--record-queries", type=float, default=Recipe.record_queries,
                        help="Share of questions on line documents asked as `entity | attribute |`.")
    parser.add_argument("--shared-attributes", type=float, default=Recipe.shared_attributes,
                        help="Share of documents whose entities all have the same attributes (entity matching).")
    parser.add_argument("--tokenizer", choices=("spaces", "words"), default=Recipe.tokenizer,
                        help="spaces: a space is its own token; words: a word carries its leading space.")
    parser.add_argument("--induction-pool", choices=("vocab", "documents"), default=Recipe.induction_pool,
                        help="Induction draws from the whole vocabulary or from the tokens of generated documents.")
    parser.add_argument("--induction-stop", type=float, default=Recipe.induction_stop,
                        help="End the induction warm-up early once its mean loss over 20 steps is below this.")
    parser.add_argument("--value-first", type=float, default=Recipe.value_first,
                        help="Share of facts written value first (\"Morsu is the capital of Kelka.\").")
    parser.add_argument("--confusable", type=float, default=Recipe.confusable,
                        help="Share of documents whose names are drawn from a few syllables (look-alike names).")
    parser.add_argument("--siblings", type=float, default=Recipe.siblings,
                        help="Share of documents whose names share first syllables or extend each other.")
    parser.add_argument("--layers", type=int, default=Recipe.layers,
                        help="Decoder layers; more than --init-from's adds layers that start as identities.")
    parser.add_argument("--heads", type=int, default=Recipe.heads,
                        help="Attention heads per layer; more than --init-from's adds heads that start silent.")
    parser.add_argument("--hidden", type=int, default=Recipe.hidden_size,
                        help="Residual width; wider than --init-from's adds dimensions that start silent.")
    parser.add_argument("--intermediate", type=int, default=Recipe.intermediate_size,
                        help="MLP width; wider than --init-from's adds units that start silent.")
    parser.add_argument("--induction-batch", type=int, default=Recipe.induction_batch)
    parser.add_argument("--induction-mix", type=float, default=Recipe.induction_mix)
    parser.add_argument("--followups", type=int, default=Recipe.followups,
                        help="Most further questions about a document in the sequences that carry one.")
    parser.add_argument("--max-seq", type=int, default=Recipe.max_seq, help="Longest training sequence (tokens).")
    parser.add_argument("--recall-mix", type=float, default=Recipe.recall_mix,
                        help="Share of batches of dense recall: a line document of look-alike or sibling names, "
                             "then every fact's record prefix with its value (whole-name matching).")
    parser.add_argument("--recall-siblings", type=float, default=Recipe.recall_siblings,
                        help="Share of the recall documents with sibling names (the others: look-alike names).")
    parser.add_argument("--recall-sentences", type=float, default=Recipe.recall_sentences,
                        help="Share of the recall documents written in sentences (value first as --value-first "
                             "says): dense look-ups that copy a value from before the matched name.")
    parser.add_argument("--name-valued", type=float, default=Recipe.name_valued,
                        help="Share of documents whose entities all have every attribute valued by a name (capital, "
                             "founder, partner, river): a look-up must match the attribute as well as the entity.")
    parser.add_argument("--ema", type=float, default=Recipe.ema,
                        help="Save an exponential moving average of the weights with this decay (e.g. 0.995).")
    parser.add_argument("--backward-mix", type=float, default=Recipe.backward_mix,
                        help="Share of batches of backward look-ups on random tokens (`value relation entity .`, "
                             "asked `relation entity ?`): the mechanism of a value-first fact's question.")
    parser.add_argument("--backward-variant", choices=formats.BACKWARD_VARIANTS, default=Recipe.backward_variant,
                        help="recurring: entities recur under several relations; unique: one sentence each; "
                             "forward: the recurring documents with the value after the match (the control).")
    parser.add_argument("--bind-weight", type=float, default=Recipe.bind_weight,
                        help="Weight of the binding loss: a value-first fact's entity state names its value.")
    parser.add_argument("--bind-layer", type=int, default=Recipe.bind_layer,
                        help="Which layer's output the binding loss reads (1 = after the first).")
    parser.add_argument("--retrieve-weight", type=float, default=Recipe.retrieve_weight,
                        help="Weight of the retrieval loss: a head attends from a value-first answer to its entity.")
    parser.add_argument("--retrieve-layer", type=int, default=Recipe.retrieve_layer,
                        help="Which layer's heads the retrieval loss trains (1 = the first).")
    parser.add_argument("--lr", type=float, default=Recipe.lr)
    parser.add_argument("--task-weights", type=str, default=",".join(map(str, Recipe.task_weights)),
                        help=f"Comma-separated weights of {', '.join(formats.TASKS)}.")
    args = parser.parse_args()
    weights = tuple(float(w) for w in args.task_weights.split(","))
    if len(weights) != len(formats.TASKS):
        parser.error(f"--task-weights needs {len(formats.TASKS)} numbers")
    if not 0 <= args.ema < 1:
        parser.error(f"--ema is a decay in [0, 1) (0: off), got {args.ema}")
    for flag, layer in (("--bind-layer", args.bind_layer), ("--retrieve-layer", args.retrieve_layer)):
        if not 1 <= layer <= args.layers:
            parser.error(f"{flag} is a layer from 1 to --layers ({args.layers}), got {layer}")
    recipe = Recipe(steps=args.steps, induction_steps=args.induction_steps, threads=args.threads, seed=args.seed,
                    start_facts=args.start_facts, max_facts=args.max_facts, line_docs=args.line_docs,
                    record_queries=args.record_queries, shared_attributes=args.shared_attributes,
                    induction_batch=args.induction_batch, tokenizer=args.tokenizer,
                    induction_pool=args.induction_pool, induction_stop=args.induction_stop,
                    induction_mix=args.induction_mix, lr=args.lr, task_weights=weights,
                    value_first=args.value_first, layers=args.layers, confusable=args.confusable,
                    heads=args.heads, siblings=args.siblings, data_seed=args.data_seed,
                    hidden_size=args.hidden, intermediate_size=args.intermediate, recall_mix=args.recall_mix,
                    recall_siblings=args.recall_siblings, recall_sentences=args.recall_sentences,
                    followups=args.followups, max_seq=args.max_seq, ema=args.ema,
                    name_valued=args.name_valued, backward_mix=args.backward_mix,
                    backward_variant=args.backward_variant, bind_weight=args.bind_weight,
                    bind_layer=args.bind_layer, retrieve_weight=args.retrieve_weight,
                    retrieve_layer=args.retrieve_layer)
    train(recipe, args.out, init_from=args.init_from)


if __name__ == "__main__":
    main()

"""DCD losses against hand computations, batch alignment, the disabled-adapter teacher, and the example builders."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.tiny import tiny_llama
from trainer_worker.checkpoint import load_checkpoint, load_optimizer_state, optimizer_state, save_checkpoint
from trainer_worker.dcd import (
    collate,
    collate_side,
    dcd_loss,
    forward_targets,
    lm_loss,
    teacher_targets,
)
from trainer_worker.km_data import (
    QA_PROMPT,
    SUMMARY_PROMPT,
    DcdExample,
    ExampleDeck,
    SyntheticItem,
    TrainSampler,
    WindowSource,
    answer_items,
    document_data,
    parse_synthetic,
    sdcd_example,
    sdcd_examples,
    synthetic_data,
    window_example,
)
from trainer_worker.lora_training import assert_clean, lora_attached, lora_target_modules
from trainer_worker.train_config import TrainConfig, lr_at, profile_config, resolve_profile

torch.set_num_threads(2)
ALL_PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
PAD = 0

# Teacher = context + target, student = a short prompt + the same target; lengths differ on purpose.
EXAMPLES = [
    DcdExample((5, 17, 29, 41, 53, 65, 77, 89, 9, 10, 11), (3, 9, 10, 11), 3),
    DcdExample((7, 19, 31, 43, 12, 13, 14, 15, 16), (4, 6, 8, 12, 13, 14, 15, 16), 5),
]


def lora_model(seed: int = 1, dropout: float = 0.0) -> Any:
    """A tiny Llama with a random (non-zero) LoRA on every projection."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=ALL_PROJECTIONS,
                        init_lora_weights=False)
    return get_peft_model(tiny_llama(), config).eval()


def run_alone(model: Any, ids: tuple[int, ...], target_len: int, *, adapter: bool) -> tuple[list[Any], list[Any]]:
    """Logits and hidden states (as nested lists) at the last target_len positions of one unpadded sequence."""
    with torch.no_grad():
        if adapter:
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        else:
            with model.disable_adapter():
                out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    logits = out.logits[0, -target_len:].double().tolist()
    hidden = [h[0, -target_len:].double().tolist() for h in out.hidden_states]
    return logits, hidden


def hand_kl(p_logits: list[float], q_logits: list[float]) -> float:
    """KL(p || q) of two logit vectors, with an explicit softmax."""
    def log_softmax(row: list[float]) -> list[float]:
        top = max(row)
        log_total = top + math.log(sum(math.exp(x - top) for x in row))
        return [x - log_total for x in row]

    log_p, log_q = log_softmax(p_logits), log_softmax(q_logits)
    return sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q, strict=True))


def hand_dcd(model: Any, examples: list[DcdExample]) -> tuple[float, float]:
    """(KL term, hidden term) computed example by example, token by token, pooled over all target tokens."""
    kls: list[float] = []
    diff: list[float] | None = None
    norm: list[float] | None = None
    for ex in examples:
        t_logits, t_hidden = run_alone(model, ex.teacher_ids, ex.target_len, adapter=False)
        s_logits, s_hidden = run_alone(model, ex.student_ids, ex.target_len, adapter=True)
        kls += [hand_kl(t, s) for t, s in zip(t_logits, s_logits, strict=True)]
        layer_diff = [sum(abs(a - b) for st, tt in zip(s, t, strict=True) for a, b in zip(st, tt, strict=True))
                      for s, t in zip(s_hidden, t_hidden, strict=True)]
        layer_norm = [sum(abs(b) for tt in t for b in tt) for t in t_hidden]
        diff = layer_diff if diff is None else [a + b for a, b in zip(diff, layer_diff, strict=True)]
        norm = layer_norm if norm is None else [a + b for a, b in zip(norm, layer_norm, strict=True)]
    assert diff is not None and norm is not None
    return sum(kls) / len(kls), sum(d / n for d, n in zip(diff, norm, strict=True)) / len(diff)


def test_dcd_loss_matches_a_hand_computation_on_a_padded_batch() -> None:
    model = lora_model()
    loss = dcd_loss(model, collate(EXAMPLES, PAD))
    kl, hidden = hand_dcd(model, EXAMPLES)
    assert kl > 1e-4 and hidden > 1e-3  # the LoRA really separates student from teacher
    assert loss.kl.item() == pytest.approx(kl, abs=1e-5)
    assert loss.hidden.item() == pytest.approx(hidden, abs=1e-5)
    assert loss.total.item() == pytest.approx(kl + hidden, abs=1e-5)


def test_batch_loss_pools_tokens_and_ignores_padding_and_order() -> None:
    model = lora_model()
    batch = dcd_loss(model, collate(EXAMPLES, PAD))
    alone = [dcd_loss(model, collate([ex], PAD)) for ex in EXAMPLES]
    sizes = [ex.target_len for ex in EXAMPLES]
    # Token-pooled: the KL of the batch is the target-token-weighted mean of the examples' KLs.
    pooled = sum(n * a.kl.item() for n, a in zip(sizes, alone, strict=True)) / sum(sizes)
    assert batch.kl.item() == pytest.approx(pooled, abs=1e-6)
    swapped = dcd_loss(model, collate(EXAMPLES[::-1], PAD))
    assert swapped.total.item() == pytest.approx(batch.total.item(), abs=1e-6)
    assert batch.total.item() != pytest.approx(sum(a.total.item() for a in alone) / 2, abs=1e-6)


def test_collate_left_pads_with_targets_at_the_right_edge_and_positions_from_zero() -> None:
    side = collate_side([(1, 2, 3, 4, 5), (6, 7, 8)], [2, 3], PAD)
    assert side.input_ids.tolist() == [[1, 2, 3, 4, 5], [PAD, PAD, 6, 7, 8]]
    assert side.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    assert side.target_mask.tolist() == [[False, False, False, True, True], [False, False, True, True, True]]
    assert side.keep == 3 and side.tokens == 8
    with pytest.raises(ValueError, match="at least one target"):
        collate_side([(1, 2)], [0], PAD)


def test_teacher_runs_with_the_adapter_disabled() -> None:
    base = tiny_llama()
    side = collate_side([EXAMPLES[0].teacher_ids, EXAMPLES[1].teacher_ids], [3, 5], PAD)
    with torch.no_grad():
        plain_logits, plain_hidden = forward_targets(base, side)
    model = lora_model()  # the same seed-0 base weights, plus a random non-zero LoRA
    teacher_logits, teacher_hidden = teacher_targets(model, side)
    with torch.no_grad():
        student_logits, _ = forward_targets(model, side)
    torch.testing.assert_close(teacher_logits, plain_logits)
    torch.testing.assert_close(teacher_hidden[-1], plain_hidden[-1])
    assert (student_logits - plain_logits).abs().max() > 1e-3  # enabled, the LoRA changes the logits
    assert not teacher_logits.requires_grad


def test_zero_lora_on_the_same_input_gives_zero_loss_and_gradients_only_to_lora() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=4, target_modules=ALL_PROJECTIONS))
    same = [DcdExample(ex.student_ids, ex.student_ids, ex.target_len) for ex in EXAMPLES]
    loss = dcd_loss(model.eval(), collate(same, PAD))
    assert loss.total.item() == pytest.approx(0.0, abs=1e-6)
    dcd_loss(model, collate(EXAMPLES, PAD)).total.backward()
    grads = {name for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in name for name in grads)


def test_lm_loss_matches_cross_entropy_of_the_model() -> None:
    model = tiny_llama()
    ids = (1, 20, 21, 22, 23, 24)
    side = collate_side([ids, (1, 30, 31)], [5, 2], PAD)
    with torch.no_grad():
        first = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).logits[0, :-1]
        second = model(input_ids=torch.tensor([[1, 30, 31]])).logits[0, -3:-1]
        expected = torch.nn.functional.cross_entropy(torch.cat([first, second]), torch.tensor([20, 21, 22, 23, 24,
                                                                                               30, 31]))
        assert lm_loss(model, side).item() == pytest.approx(expected.item(), abs=1e-5)
    with pytest.raises(ValueError, match="real token before every target"):
        lm_loss(model, collate_side([(5, 6)], [2], PAD))


# -- examples


def test_sdcd_example_puts_the_same_target_after_both_prompts(tiny_model_dir: Path) -> None:
    from engines.hf_loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    ex = sdcd_example(tokenizer, "The river starts in the hills.", SUMMARY_PROMPT, "A river.",
                      max_context_tokens=100, max_target_tokens=100)
    teacher, student = tokenizer.decode(ex.teacher_ids), tokenizer.decode(ex.student_ids)
    target = tokenizer.decode(ex.teacher_ids[-ex.target_len:])
    assert target == "A river."
    assert teacher == f"<|bos|><|user|>\nThe river starts in the hills.\n\n{SUMMARY_PROMPT}\n<|assistant|>\nA river."
    assert student == f"<|bos|><|user|>\n{SUMMARY_PROMPT}\n<|assistant|>\nA river."
    short = sdcd_example(tokenizer, "The river starts in the hills above the town.", QA_PROMPT, "one two three",
                         max_context_tokens=3, max_target_tokens=2)
    assert short.target_len == 2 and len(short.teacher_ids) < len(ex.teacher_ids) + 10


def test_sdcd_examples_encode_each_chunk_once_and_match_one_by_one_examples(tiny_model_dir: Path) -> None:
    from engines.hf_loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    chunks = {0: "The river starts in the hills.", 3: "The old town lies on the river above the hills. " * 4}
    items = [SyntheticItem(index, kind, target) for index in (3, 0) for kind in ("summary", "qa")
             for target in ("A river.", "one two three four five", "")]
    encoded: list[str] = []

    class Counting:  # the tokenizer, recording every text it encodes
        def __getattr__(self, name: str) -> Any:
            return getattr(tokenizer, name)

        def __call__(self, text: str, **kwargs: Any) -> Any:
            encoded.append(text)
            return tokenizer(text, **kwargs)

        def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> Any:
            encoded.append(messages[0]["content"])
            return tokenizer.apply_chat_template(messages, **kwargs)

    limits = {"max_context_tokens": 12, "max_target_tokens": 3}
    examples = sdcd_examples(Counting(), chunks, items, **limits)
    assert examples == [sdcd_example(tokenizer, chunks[i.chunk_index], i.prompt, i.target, **limits)
                        for i in items if i.target]
    # per chunk: its tokens once (to fit the context), then one teacher prompt per prompt kind
    assert [sum(text.startswith(chunks[i][:20]) for text in encoded) for i in (3, 0)] == [3, 3]
    with pytest.raises(ValueError, match="chunk 7"):
        sdcd_examples(tokenizer, chunks, [*items, SyntheticItem(7, "summary", "x")], **limits)


def test_sdcd_data_names_the_chunks_the_context_cuts_short(tiny_model_dir: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from engines.hf_loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    chunks = {0: "The river starts in the hills.", 1: "The river starts in the hills above the old town. " * 4}
    items = [SyntheticItem(index, "summary", f"A river {n}.") for index in (0, 1) for n in range(2)]
    limit = len(tokenizer("The river starts in the hills.", add_special_tokens=False)["input_ids"]) + 4
    kwargs: dict[str, Any] = {"dev_fraction": 0.25, "max_dev": 1, "seed": 0, "max_target_tokens": 8}
    with caplog.at_level("WARNING", logger="trainer_worker.km_data"):
        data = synthetic_data(tokenizer, chunks, items, max_context_tokens=limit, **kwargs)
    note = (f"chunks [1] are longer than max_context_tokens={limit}: the teacher reads only their first {limit} "
            "tokens (raise max_context_tokens or ingest smaller chunks)")
    assert data.notes == (note,) and [r.getMessage() for r in caplog.records] == [note]
    assert len(data.dev) + len(data.source.examples) == 4  # type: ignore[attr-defined]
    caplog.clear()
    with caplog.at_level("WARNING", logger="trainer_worker.km_data"):
        assert synthetic_data(tokenizer, chunks, items, max_context_tokens=512, **kwargs).notes == ()
    assert caplog.records == []
    assert profile_config("fast", {}).max_context_tokens >= 300  # a benchmark document (270-300 tokens) stays whole


def test_parse_synthetic_reads_both_record_forms_and_names_bad_lines() -> None:
    lines = [{"chunk_index": 0, "type": "summary", "text": "S"},
             {"chunk_index": 1, "type": "qa", "question": "Q?", "answer": "A."},
             {"chunk_index": 2, "type": "qa", "text": "\nQuestion: X\nAnswer: Y"}]
    items = parse_synthetic("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert [(i.chunk_index, i.kind, i.target) for i in items] == [
        (0, "summary", "S"), (1, "qa", "\nQuestion: Q?\nAnswer: A."), (2, "qa", "\nQuestion: X\nAnswer: Y")]
    assert items[1].prompt == QA_PROMPT
    with pytest.raises(ValueError, match="line 2"):
        parse_synthetic(json.dumps(lines[0]) + "\n" + json.dumps({"chunk_index": 0, "type": "poem", "text": "x"}))


def test_answer_targets_ask_each_qa_pair_closed_book_as_the_server_does(tiny_model_dir: Path) -> None:
    from engines.hf_loading import load_tokenizer
    from engines.prompts import CLOSED_BOOK_PROMPT

    tokenizer = load_tokenizer(str(tiny_model_dir))
    lines = [{"chunk_index": 0, "type": "summary", "text": "The river is the Osven."},
             {"chunk_index": 0, "type": "qa", "question": "Which river crosses Kelka?", "answer": "the Osven"},
             {"chunk_index": 0, "type": "qa", "text": "\nQuestion: X\nAnswer: Y"},  # parts unknown: no answer target
             {"chunk_index": 0, "type": "qa", "question": "Who founded Kelka?", "answer": " "}]
    items = parse_synthetic("\n".join(json.dumps(line) for line in lines))
    answers = answer_items(items)
    assert [(a.kind, a.target, a.question) for a in answers] == [
        ("answer", "the Osven", "Which river crosses Kelka?")]
    question = CLOSED_BOOK_PROMPT.format(question="Which river crosses Kelka?")
    assert answers[0].prompt == question
    chunk = "The Osven is the river that crosses Kelka."
    data = {flag: synthetic_data(tokenizer, {0: chunk}, items, dev_fraction=0.1, max_dev=1, seed=0,
                                 max_context_tokens=100, max_target_tokens=100, answer_targets=flag)
            for flag in (False, True)}
    every = {flag: [*d.dev, *d.source.examples] for flag, d in data.items()}  # type: ignore[union-attr]
    assert len(every[True]) == len(every[False]) + 1
    added = [ex for ex in every[True] if ex not in every[False]]
    assert [tokenizer.decode(ex.student_ids) for ex in added] == [
        f"<|bos|><|user|>\n{question}\n<|assistant|>\nthe Osven"]
    assert tokenizer.decode(added[0].teacher_ids) == f"<|bos|><|user|>\n{chunk}\n\n{question}\n<|assistant|>\nthe Osven"
    with pytest.raises(ValueError, match="line 1"):  # the answer kind is derived, never read from a file
        parse_synthetic(json.dumps({"chunk_index": 0, "type": "answer", "text": "x"}))


def test_window_examples_and_document_split() -> None:
    ddcd = window_example("ddcd", list(range(10, 30)), (1,), 0.25)
    assert ddcd.teacher_ids == (1, *range(10, 30)) and ddcd.student_ids == (1, *range(25, 30))
    lm = window_example("lm", [10, 11, 12], (1,), 0.25)
    assert lm.student_ids == (1, 10, 11, 12) and lm.target_len == 3

    class Chars:
        bos_token_id = 1

        def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
            return {"input_ids": [ord(c) for c in text]}

    data = document_data(Chars(), "abcdefghij" * 10, method="ddcd", window=16, target_fraction=0.25,
                         dev_fraction=0.2, max_dev=8)
    assert len(data.dev) == 1 and len(data.dev[0].teacher_ids) == 1 + 16
    head = data.source.tokens  # type: ignore[union-attr]
    assert len(head) == 80  # the last 20 tokens are held out for dev


def test_ddcd_windows_put_targets_all_over_a_document_shorter_than_the_window() -> None:
    import random

    tokens = list(range(100, 160))
    rng = random.Random(0)
    ddcd = WindowSource(tokens, 2048, "ddcd", (1,), 0.25).draw(rng, 200)
    targets = {t for ex in ddcd for t in ex.student_ids[-ex.target_len:]}
    assert targets == set(tokens[6:]), "every token after the shortest window's (8 tokens) context is a target"
    for ex in ddcd:  # each window is a stretch of the document ending at its target, with everything before it
        window = list(ex.teacher_ids[1:])
        assert window == tokens[:len(window)] and ex.student_ids[1:] == ex.teacher_ids[-ex.target_len:]
    long = WindowSource(tokens, 16, "ddcd", (1,), 0.25).draw(rng, 600)
    assert max(len(ex.teacher_ids) for ex in long) == 17 and {ex.teacher_ids[-1] for ex in long} >= set(tokens[20:])
    lm = WindowSource(tokens, 2048, "lm", (1,), 0.25).draw(rng, 3)
    assert all(ex.student_ids == (1, *tokens) for ex in lm), "LM trains the whole document every time"


def test_sampler_state_round_trip_continues_the_same_batches() -> None:
    examples = [DcdExample((i, i + 1), (i + 1,), 1) for i in range(7)]
    sampler = TrainSampler(ExampleDeck(examples), seed=3)
    sampler.next_batch(5)
    state = json.loads(json.dumps(sampler.state_dict()))
    expected = [sampler.next_batch(3) for _ in range(4)]
    again = TrainSampler(ExampleDeck(examples), seed=99)
    again.load_state_dict(state)
    assert [again.next_batch(3) for _ in range(4)] == expected


def test_synthetic_data_holds_out_a_seeded_dev_split(tiny_model_dir: Path) -> None:
    from engines.hf_loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    items = parse_synthetic("\n".join(json.dumps({"chunk_index": 0, "type": "summary", "text": f"Item {i}."})
                                      for i in range(20)))
    kwargs: dict[str, Any] = {"dev_fraction": 0.1, "max_dev": 8, "max_context_tokens": 64, "max_target_tokens": 16}
    data = synthetic_data(tokenizer, {0: "A chunk."}, items, seed=0, **kwargs)
    deck = data.source
    assert isinstance(deck, ExampleDeck) and len(data.dev) == 2 and len(deck.examples) == 18
    assert not set(data.dev) & set(deck.examples)
    assert synthetic_data(tokenizer, {0: "A chunk."}, items, seed=0, **kwargs).dev == data.dev
    with pytest.raises(ValueError, match="chunk 5"):
        synthetic_data(tokenizer, {}, [items[0].__class__(5, "summary", "x")] * 2, seed=0, **kwargs)


# -- config, LoRA setup, schedule, checkpoint files


def test_train_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"TrainConfig\.method must be one of sdcd, ddcd, lm"):
        TrainConfig(method="rag")
    with pytest.raises(ValueError, match=r"TrainConfig\.dropout must be in \[0, 1\)"):
        TrainConfig(dropout=1.0)
    with pytest.raises(ValueError, match=r"TrainConfig\.steps must be an integer"):
        profile_config("fast", {"steps": "many"})
    assert TrainConfig().lora_alpha == 16.0 and TrainConfig().effective_batch == 8


def test_profiles_and_overrides(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_profile("auto", "cpu") == "fast" and resolve_profile("auto", "cuda") == "paper"
    config = profile_config("fast", {"steps": 7, "rank": 4, "lr": "0.01", "method": "lm", "mystery": 1,
                                     "alpha": None})
    assert (config.steps, config.rank, config.lr, config.method, config.lora_alpha) == (7, 4, 0.01, "lm", 4.0)
    assert "mystery" in caplog.text
    assert profile_config("paper").steps == 1500


def test_lr_schedule_warms_up_then_decays() -> None:
    config = TrainConfig(steps=100, lr=1e-3, warmup_ratio=0.06)
    lrs = [lr_at(step, config) for step in range(100)]
    assert lrs[0] == pytest.approx(1e-3 / 6) and lrs[5] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[5:])) and 0 < lrs[-1] < 1e-4
    cosine = TrainConfig(steps=100, schedule="cosine")
    assert lr_at(6, cosine) == pytest.approx(1e-3) and lr_at(99, cosine) < 1e-5


def test_lora_targets_every_projection_and_leaves_the_base_clean() -> None:
    base = tiny_llama()
    assert lora_target_modules(base) == ALL_PROJECTIONS
    ids = torch.tensor([[1, 2, 3, 4]])
    before = base(input_ids=ids).logits
    with lora_attached(base, TrainConfig(rank=4)) as model:
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in name for name in trainable)
    assert_clean(base)
    assert all(p.requires_grad for p in base.parameters())
    torch.testing.assert_close(base(input_ids=ids).logits, before)


def test_optimizer_state_round_trips_through_safetensors(tmp_path: Path) -> None:
    weight = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([weight], lr=0.1, betas=(0.8, 0.9))
    weight.sum().backward()
    optimizer.step()
    tensors, meta = optimizer_state(optimizer)
    save_checkpoint(tmp_path, 1, {"optimizer": meta}, {"optimizer": tensors})
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    fresh = torch.optim.AdamW([torch.nn.Parameter(weight.detach().clone())], lr=0.5)
    load_optimizer_state(fresh, loaded.tensors["optimizer"], loaded.meta["optimizer"])
    restored = fresh.state_dict()
    assert restored["param_groups"][0]["betas"] == (0.8, 0.9) and restored["param_groups"][0]["lr"] == 0.1
    torch.testing.assert_close(restored["state"][0]["exp_avg_sq"], optimizer.state_dict()["state"][0]["exp_avg_sq"])


def test_checkpoints_are_published_atomically_and_old_ones_removed(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None
    (tmp_path / ".tmp-crashed").mkdir()  # what a crash in the middle of a save leaves behind
    first = save_checkpoint(tmp_path, 1, {"note": "a"}, {"w": {"x": torch.ones(2)}})
    second = save_checkpoint(tmp_path, 2, {"note": "b"}, {"w": {"x": torch.zeros(2)}})
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.path == second and loaded.meta["step"] == 2
    assert not first.exists() and not (tmp_path / ".tmp-crashed").exists()
    assert sorted(p.name for p in second.iterdir()) == ["state.json", "w.safetensors"]
    assert loaded.meta["writer_versions"]["torch"]

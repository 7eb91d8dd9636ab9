"""The reader's training script: tokenizer properties, a short run end to end, the saved recipe and hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from evals.reader import train
from evals.synthetic_facts import FactGenerator

SMALL = train.Recipe(vocab_size=512, hidden_size=32, layers=1, heads=2, head_dim=16, intermediate_size=64,
                     induction_steps=2, steps=3, token_budget=768, max_seq=384, window=4, threads=1, line_docs=0.5,
                     record_queries=0.5, shared_attributes=0.5, confusable=0.5, siblings=0.5)


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return train.build_tokenizer(replace(SMALL, tokenizer="spaces"))


def test_names_are_cut_into_syllables_for_the_tokenizer_corpus() -> None:
    cut = train.split_names("Kalomi was founded by Venra Tor in 1234.")
    assert cut == "Ka lo mi was founded by Ven ra Tor in 1234."


def test_a_name_is_the_same_tokens_wherever_it_stands_and_digits_stand_alone(tokenizer) -> None:  # type: ignore[no-untyped-def]
    name = FactGenerator(3).name()
    alone = tokenizer.tokenize(name)
    for text in (f"The capital is {name}.", f"x\n{name}", f"{name} | capital"):
        tokens = tokenizer.tokenize(text)
        assert any(tokens[i:i + len(alone)] == alone for i in range(len(tokens))), (text, tokens, alone)
    assert tokenizer.tokenize("1583") == ["1", "5", "8", "3"]


@pytest.fixture(scope="module")
def word_tokenizer():  # type: ignore[no-untyped-def]
    return train.build_tokenizer(train.Recipe(tokenizer="words"))


def test_under_the_words_scheme_a_name_carries_its_space_and_is_the_same_tokens_everywhere(word_tokenizer) -> None:  # type: ignore[no-untyped-def]
    name = FactGenerator(3).name()
    alone = word_tokenizer.tokenize(name)
    assert alone[0].startswith("Ġ") and len(alone) == len(train.SYLLABLE.findall(name)), alone
    answer_start = word_tokenizer.apply_chat_template([{"role": "user", "content": "Q"}], add_generation_prompt=True,
                                                      tokenize=False) + name
    for text in (f"The capital is {name}.", f"x\n{name}", f"{name} | capital", f"a\n\n{name} b", answer_start):
        tokens = word_tokenizer.tokenize(text)
        assert any(tokens[i:i + len(alone)] == alone for i in range(len(tokens))), (text, tokens, alone)
    assert word_tokenizer.tokenize(f"{name} | year | 1583")[-6:] == ["Ġ|", "Ġyear", "Ġ|", "Ġ1", "5", "8", "3"][-6:]
    text = f"{name} | capital | Venrator\nVenrator | year | 1583\n\nThe end."
    assert word_tokenizer.decode(word_tokenizer(text)["input_ids"]) == text


def test_answer_labels_start_at_the_answers_first_word_under_either_scheme(tokenizer, word_tokenizer) -> None:  # type: ignore[no-untyped-def]
    import random

    from evals.reader import formats

    gen = FactGenerator(4)
    doc = gen.document("d", 6, style="lines")
    segments = formats.icl(doc, random.Random(0), 3)
    answers = [text for text, trained in segments if trained]
    for tok in (tokenizer, word_tokenizer):
        _, labels = formats.encode(tok, segments, 4096)
        trained = tok.decode([label for label in labels if label != -100])
        assert trained.replace(" ", "") == "".join(answers).replace(" ", ""), (trained, answers)


def test_a_short_run_saves_loadable_weights_with_recipe_and_hash(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log = train.train(SMALL, tmp_path, log_every=1)
    assert len(log["induction"]) == 2 and len(log["skills"]) == 3
    saved = json.loads((tmp_path / "RECIPE.json").read_text())
    assert saved["weights_sha256"] == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert saved["recipe"]["line_docs"] == 0.5 and saved["command"].startswith("python -m evals.reader.train")
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.hidden_size == 32
    assert AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False).endswith("<|assistant|>\n")
    continued = tmp_path / "continued"
    train.train(SMALL, continued, init_from=tmp_path)
    assert json.loads((continued / "RECIPE.json").read_text())["log"]["previous"]["weights_sha256"] == \
        saved["weights_sha256"]


def test_a_data_seed_gives_fresh_documents_under_the_same_tokenizer(word_tokenizer) -> None:  # type: ignore[no-untyped-def]
    def first_documents(recipe: train.Recipe) -> list[str]:
        _, gen = train.training_stream(recipe)
        return [gen.document("train", 6).text for _ in range(3)]

    assert first_documents(SMALL) == first_documents(replace(SMALL, data_seed=SMALL.seed))
    fresh = train.Recipe(tokenizer="words", data_seed=50_000)
    assert not set(first_documents(fresh)) & set(first_documents(SMALL))
    assert train.build_tokenizer(fresh).get_vocab() == word_tokenizer.get_vocab()


def test_a_continued_run_keeps_the_earlier_phase_tokenizer(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    tokenizer.save_pretrained(tmp_path)  # an earlier phase's tokenizer, unlike the one the recipe would build now
    assert train.phase_tokenizer(SMALL, tmp_path).get_vocab() == tokenizer.get_vocab()
    built = train.build_tokenizer(SMALL).get_vocab()
    assert built != tokenizer.get_vocab()
    assert train.phase_tokenizer(SMALL, None).get_vocab() == built
    assert train.phase_tokenizer(SMALL, tmp_path / "weights-only").get_vocab() == built


def test_induction_can_draw_from_document_tokens_and_stop_once_formed(tmp_path: Path) -> None:
    recipe = replace(SMALL, induction_steps=40, induction_stop=100.0, steps=1)
    tok = train.build_tokenizer(recipe)
    pool = train.induction_pool(recipe, tok)
    assert set(pool) < set(train.induction_pool(replace(recipe, induction_pool="vocab"), tok))
    assert not set(pool) & set(tok.all_special_ids)
    name = FactGenerator(3).name()
    assert set(tok(f"The capital is {name}. 1583")["input_ids"]) <= set(pool)
    log = train.train(recipe, tmp_path, log_every=10)
    assert log["induction_stopped"] == 19 and len(log["induction"]) == 2  # a mean over 20 steps, then the skills
    assert json.loads((tmp_path / "RECIPE.json").read_text())["recipe"]["induction_pool"] == "documents"


def test_the_committed_warm_start_matches_its_recorded_hash() -> None:
    warm = Path(train.__file__).parent / "warm_start"
    recipe = json.loads((warm / "RECIPE.json").read_text())
    assert recipe["weights_sha256"] == hashlib.sha256((warm / "model.safetensors").read_bytes()).hexdigest()
    assert recipe["log"]["previous"]["command"].startswith("python -m evals.reader.train")


def test_the_lookup_diagnostics_ask_record_prefixes_on_shared_attribute_documents() -> None:
    import subprocess
    import sys

    warm = Path(train.__file__).parent / "warm_start"
    out = subprocess.run([sys.executable, "-m", "evals.reader.evaluate", str(warm), "--docs", "1", "--min-facts", "6",
                          "--max-facts", "6", "--style", "lines", "--record-queries", "1.0", "--shared-attributes",
                          "--threads", "1"], capture_output=True, text=True, check=True)
    score = json.loads(out.stdout.strip().splitlines()[-1])
    assert score["documents"] == 1 and score["questions"] == 12  # each fact: its record prefix and a paraphrase
    assert 0.0 <= score["standard"] <= 1.0 and 0.0 <= score["paraphrase"] <= 1.0
    assert score["value_first"] == 0.0 and score["entity_first"] == score["standard"]  # record lines: entity first


def test_held_out_scores_split_out_the_entities_whose_names_start_alike() -> None:
    from evals.reader.evaluate import evaluate, load
    from evals.synthetic_facts import sentence_template, shares_first_syllable

    model, tokenizer = load(Path(train.__file__).parent / "warm_start", threads=1)
    siblings = FactGenerator(11).document("siblings", 8, siblings=True)
    plain = FactGenerator(12).document("plain", 8)
    score = evaluate(model, tokenizer, [siblings, plain], families=("standard",))
    alike = sum(shares_first_syllable(doc, f.entity) for doc in (siblings, plain) for f in doc.facts)
    assert score.first_syllable_shared_questions == alike >= 8, "every sibling document's entity counts"
    assert score.questions == 16 and 0.0 <= score.first_syllable_shared <= 1.0
    # the misses located by sentence form: every standard question counted once under its fact's template
    assert sum(asked for _, asked in score.templates.values()) == 16
    assert all(0 <= right <= asked for right, asked in score.templates.values())
    rates = [right / asked for right, asked in score.templates.values()]
    assert rates == sorted(rates), "weakest first"
    assert set(score.templates) <= {sentence_template(f) for doc in (siblings, plain) for f in doc.facts}


def test_grown_weights_compute_what_the_shallower_model_did(word_tokenizer) -> None:  # type: ignore[no-untyped-def]
    import torch

    shallow = replace(SMALL, layers=4)
    model = train.build_model(shallow, word_tokenizer)
    with torch.no_grad():  # random residual outputs, so that a zeroed copy would show if it were not zeroed
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = train.grown(state, 7)
    assert train.grown(state, 4) is state and train.grown(state, 3) is state
    deep = train.build_model(replace(shallow, layers=7), word_tokenizer)
    missing, unexpected = deep.load_state_dict(layers, strict=False)
    assert not unexpected and all("rotary" in key or "lm_head" in key for key in missing)
    deep.tie_weights()
    # old layers 1 and 2 take the three added layers in turn: old 0, 1, 1', 1', 2, 2', 3
    query = "self_attn.q_proj.weight"
    assert torch.equal(layers[f"model.layers.1.{query}"], layers[f"model.layers.3.{query}"])
    assert torch.equal(layers["model.layers.6.mlp.down_proj.weight"], state["model.layers.3.mlp.down_proj.weight"])
    for n in (2, 3, 5):
        assert not layers[f"model.layers.{n}.self_attn.o_proj.weight"].any()
        assert not layers[f"model.layers.{n}.mlp.down_proj.weight"].any()
    assert layers["model.layers.4.mlp.down_proj.weight"].any()
    text = "The capital of Kelka is Morsu. What is the capital of Kelka?"
    ids = word_tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, deep(ids).logits, atol=1e-5)
        deep.model.layers[2].self_attn.o_proj.weight.fill_(0.1)  # and the added layers are live, not frozen copies
        assert not torch.allclose(model(ids).logits, deep(ids).logits, atol=1e-3)


def test_added_heads_compute_what_the_narrower_model_did_until_trained(word_tokenizer) -> None:  # type: ignore[no-untyped-def]
    import torch

    narrow = replace(SMALL, layers=2, heads=2)
    model = train.build_model(narrow, word_tokenizer)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    deep = train.grown(state, 3)
    wide_state = train.with_heads(deep, 4, narrow.head_dim)
    assert train.with_heads(state, 2, narrow.head_dim) == state
    wide = train.build_model(replace(narrow, layers=3, heads=4), word_tokenizer)
    missing, unexpected = wide.load_state_dict(wide_state, strict=False)
    assert not unexpected and all("rotary" in key or "lm_head" in key for key in missing)
    wide.tie_weights()
    query, output = "model.layers.2.self_attn.q_proj.weight", "model.layers.2.self_attn.o_proj.weight"
    assert wide_state[query].shape == (4 * 16, 32) and wide_state[output].shape == (32, 4 * 16)
    assert torch.equal(wide_state[query][:32], deep[query])
    # head 2 copies old head 0 (with a little noise); the added heads' output columns are zero
    assert torch.allclose(wide_state[query][32:48], deep[query][:16], atol=0.1)
    assert not torch.equal(wide_state[query][32:48], deep[query][:16])
    assert not wide_state[output][:, 32:].any() and torch.equal(wide_state[output][:, :32], deep[output])
    text = "The capital of Kelka is Morsu. What is the capital of Kelka?"
    ids = word_tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, wide(ids).logits, atol=1e-5)
        wide.model.layers[0].self_attn.o_proj.weight[:, 40].fill_(0.5)  # and the added heads are live
        assert not torch.allclose(model(ids).logits, wide(ids).logits, atol=1e-3)


def test_widened_weights_compute_what_the_narrower_model_did_until_trained(word_tokenizer) -> None:  # type: ignore[no-untyped-def]
    import torch

    narrow = replace(SMALL, layers=2, heads=2)
    model = train.build_model(narrow, word_tokenizer)
    with torch.no_grad():  # gains away from 1, so that a norm left unscaled would show
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.05))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hidden, inter = 2 * narrow.hidden_size, narrow.intermediate_size + 16
    wide_state = train.with_heads(train.widened(state, hidden, inter), 4, narrow.head_dim)
    assert train.widened(state, narrow.hidden_size, narrow.intermediate_size) is state
    with pytest.raises(ValueError, match="cannot narrow"):
        train.widened(state, narrow.hidden_size // 2, narrow.intermediate_size)
    wide = train.build_model(replace(narrow, heads=4, hidden_size=hidden, intermediate_size=inter), word_tokenizer)
    missing, unexpected = wide.load_state_dict(wide_state, strict=False)
    assert not unexpected and all("rotary" in key or "lm_head" in key for key in missing)
    wide.tie_weights()
    old = narrow.hidden_size
    embed, up = wide_state["model.embed_tokens.weight"], wide_state["model.layers.1.mlp.up_proj.weight"]
    assert embed.shape[1] == hidden and not embed[:, old:].any() and torch.equal(embed[:, :old], state[
        "model.embed_tokens.weight"])
    assert up.shape == (inter, hidden) and up[:, old:].abs().sum() > 0 and up[narrow.intermediate_size:].any()
    assert not wide_state["model.layers.1.mlp.down_proj.weight"][old:].any()
    assert not wide_state["model.layers.1.mlp.down_proj.weight"][:, narrow.intermediate_size:].any()
    assert not wide_state["model.layers.0.self_attn.o_proj.weight"][old:].any()
    text = "The capital of Kelka is Morsu. What is the capital of Kelka?"
    ids = word_tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        # equal but for the norms' epsilon, now averaged over more dimensions
        assert torch.allclose(model(ids).logits, wide(ids).logits, atol=1e-3)
        wide.model.embed_tokens.weight[:, old:].normal_(0, 0.5)  # and the added dimensions are read
        assert not torch.allclose(model(ids).logits, wide(ids).logits, atol=1e-2)


def test_recall_batches_train_whole_name_lookups_within_the_token_budget(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]

    recipe = replace(SMALL, recall_mix=1.0, induction_mix=0.0, induction_steps=0, steps=2, max_facts=8)
    rng, gen = train.training_stream(recipe)
    items = train._recall_batch(rng, gen, tokenizer, recipe)
    assert items and max(len(ids) for ids, _ in items) * len(items) <= recipe.token_budget
    assert all(any(label != -100 for label in labels) for _, labels in items)
    sentences = train._recall_batch(rng, gen, tokenizer, replace(recipe, recall_sentences=1.0, value_first=1.0))
    texts = [tokenizer.decode(ids) for ids, _ in sentences]
    documents = [text.rsplit("\n\n", 1) for text in texts]  # the document, then its look-ups one per line
    assert all(" | " not in doc and asked.count(" | ") == 2 * len(asked.splitlines()) for doc, asked in documents)
    log = train.train(recipe, tmp_path, log_every=1)
    assert [entry["step"] for entry in log["recall"]] == [0, 1] and not log["skills"]
    assert json.loads((tmp_path / "RECIPE.json").read_text())["recipe"]["recall_mix"] == 1.0
    # a document's sequence asks at most `followups` further questions
    gen = FactGenerator(9)
    for followups in (2, 12):
        asked = [train.sample_sequence("icl", gen, 16, tokenizer, replace(recipe, followups=followups, max_seq=4096))
                 for _ in range(5)]
        turns = [tokenizer.decode(ids).count("<|assistant|>") - 1 for ids, _ in asked]
        assert max(turns) <= followups and min(turns) >= min(followups, 8) // 2, turns


def test_a_moving_average_of_the_weights_is_what_is_saved(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    recipe = replace(SMALL, induction_steps=0, recall_mix=0.3)
    raw = {}
    for steps in (1, 2):  # the same stream and warmup learning rates: the first steps of one trajectory
        train.train(replace(recipe, steps=steps), tmp_path / f"raw{steps}")
        raw[steps] = load_file(tmp_path / f"raw{steps}" / "model.safetensors")
    train.train(replace(recipe, steps=2, ema=0.5), tmp_path / "ema")
    averaged = load_file(tmp_path / "ema" / "model.safetensors")
    assert json.loads((tmp_path / "ema" / "RECIPE.json").read_text())["recipe"]["ema"] == 0.5
    assert set(averaged) == set(raw[2])
    moved = [name for name in averaged if not torch.equal(raw[1][name], raw[2][name])]
    assert moved
    for name in averaged:  # the first update copies, the second mixes half and half
        assert torch.allclose(averaged[name], 0.5 * raw[1][name] + 0.5 * raw[2][name], atol=1e-6), name


def test_name_valued_share_reaches_the_documents(tokenizer) -> None:  # type: ignore[no-untyped-def]
    class Recording(FactGenerator):
        def document(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            doc = super().document(*args, **kwargs)
            if args[0] == "train":
                drawn.append(kwargs["name_valued"])
            return doc

    for share in (0.0, 0.5, 1.0):
        drawn: list[bool] = []
        gen = Recording(5)
        for _ in range(40):
            train.sample_sequence("icl", gen, 12, tokenizer, replace(SMALL, name_valued=share))
        assert abs(sum(drawn) / len(drawn) - share) <= 0.2, (share, sum(drawn))


@pytest.mark.parametrize("variant", ["recurring", "unique", "forward"])
def test_backward_lookups_ask_each_sentence_by_its_key_and_train_the_name_before_it(variant: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    import random

    from evals.reader import formats

    marks = train.backward_marks(tokenizer)
    stop, comma, ask, newline, eos = marks
    assert tokenizer.convert_ids_to_tokens([stop, comma, ask]) == [".", ",", "?"] and eos == tokenizer.eos_token_id
    pool = [i for i in range(10, 200) if i not in marks]
    rng = random.Random(4)
    for facts in (4, 9, 16):
        ids, labels = formats.backward(rng, pool, marks, facts, variant)
        assert len(ids) == len(labels)
        document = ids[:ids.index(newline)]
        stops = [k for k, t in enumerate(document) if t == stop]
        sentences = [document[i + 1:j] for i, j in zip([-1, *stops], stops, strict=False)]
        assert 4 <= len(sentences) <= facts and (variant != "unique" or len(sentences) == facts)
        asked = 0
        at = ids.index(newline) + 1
        while at < len(ids):  # "\n relation entity ? value EOS", the value and EOS alone trained
            assert ids[at] == newline and labels[at] == -100
            end = ids.index(eos, at)
            query, value = ids[at + 1:ids.index(ask, at)], ids[ids.index(ask, at) + 1:end]
            assert all(label == -100 for label in labels[at:ids.index(ask, at) + 1])
            assert labels[ids.index(ask, at) + 1:end + 1] == [*value, eos]
            if variant == "forward":  # the key starts its sentence; the value follows it after the comma
                assert [s[len(query):] for s in sentences if s[:len(query)] == query] == [[comma, *value]]
            else:  # the key ends one sentence; its start, up to the comma, is the answer
                assert [s[:-len(query)] for s in sentences if s[-len(query):] == query] == [[*value, comma]]
            asked += 1
            at = end + 1
        assert asked == len(sentences)
        if variant == "recurring":  # an entity (the key's last tokens) stands in more than one sentence
            assert len({tuple(s[-1:]) for s in sentences}) < len(sentences)
    with pytest.raises(ValueError, match="backward variant"):
        formats.backward(rng, pool, marks, 4, "sideways")


def test_backward_batches_train_and_log_their_own_accuracy(tmp_path: Path) -> None:
    recipe = replace(SMALL, backward_mix=1.0, induction_mix=0.0, induction_steps=0, steps=2)
    log = train.train(recipe, tmp_path, log_every=1)
    assert [entry["step"] for entry in log["backward"]] == [0, 1] and not log["skills"] and not log["recall"]
    assert all(0.0 <= entry["em"] <= 1.0 for entry in log["backward"])
    assert json.loads((tmp_path / "RECIPE.json").read_text())["recipe"]["backward_mix"] == 1.0


def test_bindings_point_at_each_value_first_entity_and_name_its_value(word_tokenizer) -> None:  # type: ignore[no-untyped-def]
    from evals.reader import formats

    gen = FactGenerator(21)
    recipe = replace(SMALL, tokenizer="words", value_first=1.0, max_seq=4096, line_docs=0.0)
    ids, labels, binds, pairs = train.sample_sequence("icl", gen, 16, word_tokenizer, recipe, bind=True)
    assert len(train.sample_sequence("icl", gen, 16, word_tokenizer, recipe)) == 2, "no targets unless asked"
    doc_end = ids.index(word_tokenizer.convert_tokens_to_ids("<|assistant|>"))
    assert len(binds) >= 3 and all(position < doc_end for position, _ in binds), "in the document, not the answers"
    text = word_tokenizer.decode(ids)
    for position, token in binds:
        before = word_tokenizer.decode(ids[:position + 1])
        sentence = before[before.rfind(".") + 1:]  # the sentence up to the bound entity's last token
        value = word_tokenizer.decode([token]).strip()
        assert sentence.strip().split()[0].startswith(value) or f" {value}" in sentence, (sentence, value)
    # retrieval pairs: from where a value-first answer starts to the entity that fact is bound at
    assert pairs and {key for _, key in pairs} <= {position for position, _ in binds}
    spans = dict(train.answer_spans(labels, word_tokenizer.eos_token_id))
    assign = word_tokenizer.convert_tokens_to_ids("<|assistant|>")
    for query, key in pairs:
        assert query + 1 in spans and ids[query - 1] == assign, "the answer's first token is predicted at query"
        answer = word_tokenizer.decode(labels[query + 1:spans[query + 1] - 1])
        entity_end = word_tokenizer.decode(ids[key])
        question = word_tokenizer.decode(ids[:query + 1]).rsplit("<|user|>", 1)[1]
        assert entity_end.strip() in question, (question, entity_end)
        sentence = word_tokenizer.decode(ids[:key + 1]).rsplit(".", 1)[-1]
        assert answer in sentence, (answer, sentence)
    # every value-first fact of the document is bound, at its entity's last token, to its value's first token
    gen = FactGenerator(22)
    doc = gen.document("d", 12, value_first=1.0)
    ids, _ = formats.encode(word_tokenizer, formats.document(doc), 4096)
    binds = train.bindings(doc, ids, word_tokenizer)
    expected = {(word_tokenizer(f.entity, add_special_tokens=False)["input_ids"][-1],
                 word_tokenizer(f.value, add_special_tokens=False)["input_ids"][0]) for f in doc.facts if f.value_first}
    assert {(ids[position], token) for position, token in binds} == expected and len(expected) >= 6
    assert text  # decoded whole
    entity_first = [f for f in gen.document("e", 12, value_first=0.0).facts if not f.value_first]
    assert entity_first, "documents with no value-first sentences bind nothing of those facts"
    assert train.bindings(FactGenerator(22).document("d", 12, value_first=1.0), ids[:5], word_tokenizer) == []


def test_the_binding_loss_trains_the_entity_state_to_name_its_value(tmp_path: Path, word_tokenizer) -> None:  # type: ignore[no-untyped-def]
    recipe = replace(SMALL, tokenizer="words", value_first=1.0, layers=2, lr=3e-3, max_seq=1024, bind_weight=1.0,
                     bind_layer=1, steps=2, induction_steps=0, line_docs=0.0, start_facts=8)
    torch.manual_seed(0)
    model = train.build_model(recipe, word_tokenizer)
    gen = FactGenerator(23)
    items = [train.sample_sequence("icl", gen, 8, word_tokenizer, recipe, bind=True) for _ in range(2)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr)
    stats = [train._step(model, optimizer, items, word_tokenizer, recipe.lr, (1.0, 1))[2] for _ in range(40)]
    first, last = stats[0], stats[-1]
    assert all(s is not None for s in stats) and first is not None and last is not None
    assert last["bind_acc"] > first["bind_acc"] and last["bind_loss"] < first["bind_loss"] / 2, (first, last)
    plain = train._step(model, optimizer, items, word_tokenizer, recipe.lr)
    assert plain[2] is None, "without a binding weight the step adds nothing"
    # a run with the binding loss logs it with the skills and records its recipe
    log = train.train(recipe, tmp_path, log_every=1)
    bound = [entry for entry in log["skills"] if "bind_loss" in entry]  # batches with a value-first sentence
    assert bound and all(entry["bind_loss"] > 0 and 0.0 <= entry["bind_acc"] <= 1.0 for entry in bound)
    saved = json.loads((tmp_path / "RECIPE.json").read_text())["recipe"]
    assert saved["bind_weight"] == 1.0 and saved["bind_layer"] == 1


def test_the_retrieval_loss_trains_a_head_to_attend_from_the_answer_to_the_bound_entity(word_tokenizer) -> None:  # type: ignore[no-untyped-def]
    recipe = replace(SMALL, tokenizer="words", value_first=1.0, layers=2, lr=3e-3, max_seq=1024, line_docs=0.0,
                     shared_attributes=0.0)
    model = train.build_model(recipe, word_tokenizer)
    model.set_attn_implementation("eager")
    gen = FactGenerator(24)
    items = [train.sample_sequence("icl", gen, 8, word_tokenizer, recipe, bind=True) for _ in range(3)]
    assert any(item[3] for item in items)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr)
    stats = [train._step(model, optimizer, items, word_tokenizer, recipe.lr, retrieve=(1.0, 2))[2] for _ in range(30)]
    first, last = stats[0], stats[-1]
    assert first is not None and last is not None and "bind_loss" not in first
    assert last["retrieve_attention"] > max(0.5, 3 * first["retrieve_attention"]), (first, last)
    assert train.retrieval_loss(None, [item[:3] for item in items]) is None, "no pairs, no loss"


def test_evaluation_draws_validation_documents_from_another_seed(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import sys

    from evals.reader import evaluate

    drawn: list[int] = []
    real = evaluate.generate_documents

    def recording(count, seed, **kwargs):  # type: ignore[no-untyped-def]
        drawn.append(seed)
        return real(count, seed, **kwargs)

    monkeypatch.setattr(evaluate, "generate_documents", recording)
    warm = str(Path(train.__file__).parent / "warm_start")
    for extra in ([], ["--seed", "700001"]):
        monkeypatch.setattr(sys, "argv", ["evaluate", warm, "--docs", "1", "--min-facts", "3", "--max-facts", "3",
                                          "--standard-only", "--threads", "1", *extra])
        evaluate.main()
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["documents"] == 1
    assert drawn == [evaluate.HELD_OUT_SEED, 700001]

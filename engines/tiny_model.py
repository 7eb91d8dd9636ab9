"""The built-in default generator: a tiny Llama with a locally trained byte-level BPE tokenizer.

The platform needs *some* causal LM on a fresh, offline machine before a trained reader model replaces it. This
module builds one from nothing but a fixed seed and the corpus below, so two builds with the same seed are
byte-identical (weights, tokenizer and configs), and `ensure_default_model` builds it once under the data dir.
Its random weights produce gibberish; it exists so that the whole pipeline (training, serving, LoRA) runs end to end.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_MODEL_DIRNAME = "tiny-llama"
WEIGHTS_FILE = "model.safetensors"
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
CHAT_ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = (PAD, BOS, EOS, *(f"<|{role}|>" for role in CHAT_ROLES))
VOCAB_SIZE = 1024

# Every message is "<|role|>\n{content}\n"; generation starts after "<|assistant|>\n".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# A small, fixed English corpus: enough merges for a ~1k vocabulary of common words and pieces.
CORPUS = """\
The river starts in the hills above the town and runs north to the sea. In spring the water is high and cold.
A knowledge module is a small set of weights that stores what one document says. The model reads the document
once, and later it can answer questions about it without seeing the text again.
What is the name of the city? The city is called Harbor Point, and it was founded in the year 1847.
Who wrote the report? The report was written by a team of three engineers and one doctor.
How many people live there? About twelve thousand people live in the valley, most of them farmers.
Question: When did the bridge open? Answer: The bridge opened in the summer of 1902, after four years of work.
Question: Why did the factory close? Answer: The factory closed because the price of coal rose too fast.
Summarize the preceding passage. The passage describes a small town, its river, its people and their work.
Generate a question-answer pair given the preceding passage.
The teacher sees the whole document and the student sees only the question. The student learns to match the
teacher's predictions, token by token, so that the knowledge moves from the context into the weights.
Large language models are trained on a great deal of text. They predict the next word from the words before it.
A good answer is short, correct and based on the document. If the document does not say, the answer is unknown.
The server keeps many adapters in memory at once and picks the right one for every request. When memory is full,
the adapter that was used least recently is removed first, unless it is pinned.
Numbers, dates and names matter: 0 1 2 3 4 5 6 7 8 9 10 100 1000, January, February, March, April, May, June,
July, August, September, October, November, December, Monday, Tuesday, Wednesday, Thursday, Friday, Saturday.
She walked to the market in the morning and bought bread, apples, cheese and a jar of honey for her mother.
He said that the ship would leave at noon, but the wind was strong and the captain waited until evening.
The library has more than forty thousand books, and the oldest one was printed almost five hundred years ago.
Scientists measured the temperature of the lake every day for ten years and found that it was slowly rising.
You are a helpful assistant. Answer the user's question using only the information you were given.
The committee met on Tuesday to discuss the new rules. After a long debate, they voted to accept the proposal.
Children played in the park while their parents talked under the trees. A dog ran after a red ball.
Water boils at one hundred degrees Celsius at sea level, and it freezes at zero degrees.
The engine turns fuel into motion. The computer turns instructions into results. The writer turns ideas into words.
"""


def build_tokenizer() -> Any:
    """Train the byte-level BPE tokenizer on the built-in corpus (deterministic) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # One "sentence" per line keeps the trainer's input order (and so its tie-breaking) fixed.
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[
        (BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE,
        padding_side="left", model_max_length=2048,
    )


def _llama_config(tokenizer: Any, **overrides: Any) -> Any:
    from transformers import LlamaConfig

    settings: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def build_tiny_model(out_dir: Path, seed: int = 0, **config_overrides: Any) -> Path:
    """Build the tiny Llama + tokenizer with weights drawn from `seed` and save them (safetensors) into `out_dir`.

    `config_overrides` change LlamaConfig fields (e.g. head_dim=64 for attention kernels that need it).
    """
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = _llama_config(tokenizer, **config_overrides)
    # A private generator state: the build is reproducible and leaves the caller's global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = config.pad_token_id
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def ensure_default_model(data_dir: Path, seed: int = 0) -> Path:
    """The default model's directory under `data_dir/models/`, built on first use (atomically, once)."""
    target = Path(data_dir) / "models" / DEFAULT_MODEL_DIRNAME
    if (target / WEIGHTS_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename: a server and a worker starting together never see a half-built model.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        build_tiny_model(staging, seed=seed)
        os.replace(staging, target)
    except OSError:
        if not (target / WEIGHTS_FILE).is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def weights_digest(model_dir: Path) -> str:
    """SHA-256 of the saved weights file (for reproducibility checks)."""
    return hashlib.sha256((Path(model_dir) / WEIGHTS_FILE).read_bytes()).hexdigest()

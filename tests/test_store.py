"""The adapter store: content addressing, atomic writes, verified reads, format checks, gc, blobs, fsspec remotes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fsspec
import pytest
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from registry.adapter_files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    inspect_adapter_dir,
    parse_safetensors_header,
    read_safetensors_header,
)
from registry.config import Settings
from registry.errors import ChecksumError, InvalidAdapterError, NotFoundError, UnsafeFormatError
from registry.store import AdapterStore
from registry.store_format import MANIFEST_NAME
from tests.factories import lora_config, lora_tensors
from tests.tiny import tiny_llama

torch.set_num_threads(2)

REPO_ROOT = Path(__file__).resolve().parent.parent
MEMORY_URL = "memory://kmtest/store"
TARGETS = ["q_proj", "v_proj", "down_proj"]
HOUR = 3600.0


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A real PEFT LoRA saved by `save_pretrained`, and the logits the adapted model gives on fixed input."""
    torch.manual_seed(1)
    # init_lora_weights=False: PEFT's default B=0 would make the adapter a no-op and comparisons trivial.
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                    init_lora_weights=False))
    path = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(str(path))
    with torch.no_grad():
        logits = model(torch.arange(10).unsqueeze(0)).logits
    return path, logits


@pytest.fixture
def adapter_dir(tmp_path: Path, peft_adapter: tuple[Path, torch.Tensor]) -> Path:
    """A private copy of the PEFT adapter that a test may edit."""
    return Path(shutil.copytree(peft_adapter[0], tmp_path / "src"))


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(str(tmp_path / "store"))


@pytest.fixture
def memory_store(tmp_path: Path) -> Iterator[AdapterStore]:
    fs = fsspec.filesystem("memory")
    _clear_memory(fs)
    yield AdapterStore(MEMORY_URL, cache_dir=tmp_path / "cache")
    _clear_memory(fs)


def _clear_memory(fs: Any) -> None:
    # The memory filesystem is one process-wide dict: without this, tests would see each other's files.
    fs.store.clear()
    fs.pseudo_dirs[:] = [""]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def flip_byte(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def age(path: Path, seconds: float) -> None:
    """Backdate a file or a whole directory tree."""
    stamp = time.time() - seconds
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(item, (stamp, stamp))


def edit_config(directory: Path, **changes: Any) -> None:
    config = json.loads((directory / CONFIG_NAME).read_text())
    config.update(changes)
    (directory / CONFIG_NAME).write_text(json.dumps(config))


def stored_weights(store: AdapterStore, key: str) -> Path:
    return Path(store.url) / "adapters" / key / WEIGHTS_NAME


# -- round trips


def test_put_dir_open_load_round_trip(store: AdapterStore, adapter_dir: Path) -> None:
    stored = store.put_dir(adapter_dir)

    assert stored.key == stored.digest == hashlib.sha256((adapter_dir / WEIGHTS_NAME).read_bytes()).hexdigest()
    opened = store.open(stored.key)
    assert sorted(p.name for p in opened.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, MANIFEST_NAME])
    config, tensors = store.load(stored.uri)
    original = load_file(str(adapter_dir / WEIGHTS_NAME))
    assert tensors.keys() == original.keys()
    assert all(torch.equal(tensors[name], original[name]) for name in original)
    assert config == json.loads((adapter_dir / CONFIG_NAME).read_text())
    assert (stored.info.rank, stored.info.alpha, len(stored.info.modules)) == (4, 8.0, 2 * len(TARGETS))
    assert {"peft", "torch", "safetensors"} <= stored.writer_versions.keys()


def test_opened_directory_loads_in_peft_with_same_outputs(
    store: AdapterStore, peft_adapter: tuple[Path, torch.Tensor]
) -> None:
    stored = store.put_dir(peft_adapter[0])

    model = PeftModel.from_pretrained(tiny_llama(), str(store.open(stored.key))).eval()
    with torch.no_grad():
        logits = model(torch.arange(10).unsqueeze(0)).logits
    torch.testing.assert_close(logits, peft_adapter[1])


def test_manifest_records_every_file(store: AdapterStore, adapter_dir: Path) -> None:
    stored = store.put_dir(adapter_dir)

    manifest = json.loads((store.open(stored.key) / MANIFEST_NAME).read_text())
    weights = (adapter_dir / WEIGHTS_NAME).read_bytes()
    assert manifest["files"][WEIGHTS_NAME] == {"size": len(weights), "sha256": stored.digest}
    assert manifest["config_sha256"] == stored.config_sha256
    assert manifest["writer_versions"]["peft"] == stored.writer_versions["peft"]


def test_put_tensors_gives_the_same_key_as_the_peft_directory(store: AdapterStore, adapter_dir: Path) -> None:
    from_dir = store.put_dir(adapter_dir)
    config = json.loads((adapter_dir / CONFIG_NAME).read_text())

    from_tensors = store.put(config, load_file(str(adapter_dir / WEIGHTS_NAME)))

    assert from_tensors.key == from_dir.key
    assert [key for key, _ in store.list_keys()] == [from_dir.key]


def test_identical_content_twice_is_one_copy(store: AdapterStore, adapter_dir: Path) -> None:
    first = store.put_dir(adapter_dir)
    second = store.put_dir(adapter_dir)

    assert first.key == second.key
    assert [key for key, _ in store.list_keys()] == [first.key]
    assert len(list((Path(store.url) / "adapters").iterdir())) == 1
    assert files_under(Path(store.url) / "tmp") == []


def test_concurrent_writers_of_one_adapter_agree(store: AdapterStore, adapter_dir: Path) -> None:
    with ThreadPoolExecutor(max_workers=6) as pool:
        keys = set(pool.map(lambda _: store.put_dir(adapter_dir).key, range(6)))

    assert len(keys) == 1
    assert [key for key, _ in store.list_keys()] == list(keys)
    assert files_under(Path(store.url) / "tmp") == []


def test_same_weights_with_another_config_gets_its_own_key(store: AdapterStore, adapter_dir: Path) -> None:
    first = store.put_dir(adapter_dir)
    edit_config(adapter_dir, lora_dropout=0.1)

    second = store.put_dir(adapter_dir)

    assert second.digest == first.digest
    assert second.key == f"{first.digest}-{second.config_sha256[:12]}"
    assert store.load(first.key)[0]["lora_dropout"] == 0.0
    assert store.load(second.key)[0]["lora_dropout"] == 0.1
    assert store.put_dir(adapter_dir).key == second.key


# -- verified reads


def test_flipped_weight_byte_is_never_loaded(
    store: AdapterStore, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = store.put_dir(adapter_dir)
    flip_byte(stored_weights(store, stored.key))
    calls: list[object] = []
    monkeypatch.setattr(safetensors.torch, "load", lambda *args, **kwargs: calls.append(args))

    with pytest.raises(ChecksumError, match=stored.key):
        store.open(stored.key)
    with pytest.raises(ChecksumError, match="hashes to"):
        store.load(stored.key)
    assert calls == []


def test_flipped_config_byte_raises(store: AdapterStore, adapter_dir: Path) -> None:
    stored = store.put_dir(adapter_dir)
    flip_byte(Path(store.url) / "adapters" / stored.key / CONFIG_NAME, offset=5)

    with pytest.raises(ChecksumError, match=CONFIG_NAME):
        store.load(stored.key)


def test_truncated_stored_file_raises(store: AdapterStore, adapter_dir: Path) -> None:
    stored = store.put_dir(adapter_dir)
    path = stored_weights(store, stored.key)
    path.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(ChecksumError, match="bytes"):
        store.open(stored.key)


def test_truncated_source_file_is_refused(store: AdapterStore, adapter_dir: Path) -> None:
    path = adapter_dir / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(InvalidAdapterError, match="data section"):
        store.put_dir(adapter_dir)
    assert files_under(Path(store.url)) == []


def test_storing_again_repairs_a_damaged_copy(store: AdapterStore, adapter_dir: Path) -> None:
    stored = store.put_dir(adapter_dir)
    flip_byte(stored_weights(store, stored.key))

    assert store.put_dir(adapter_dir).key == stored.key
    store.load(stored.key)


def test_manifest_naming_another_key_is_refused(store: AdapterStore, adapter_dir: Path) -> None:
    stored = store.put_dir(adapter_dir)
    adapters = Path(store.url) / "adapters"
    forged = "0" * 64
    shutil.copytree(adapters / stored.key, adapters / forged)

    with pytest.raises(ChecksumError, match="names key"):
        store.open(forged)
    assert not store.exists(forged)


def test_unknown_and_malformed_keys_are_not_found(store: AdapterStore) -> None:
    with pytest.raises(NotFoundError):
        store.open("f" * 64)
    with pytest.raises(NotFoundError):
        store.open("../../etc")
    assert not store.exists("not-a-key")


# -- format checks


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".pkl"])
def test_pickle_adapter_is_refused_and_nothing_written(store: AdapterStore, adapter_dir: Path, suffix: str) -> None:
    (adapter_dir / WEIGHTS_NAME).unlink()
    torch.save({"w": torch.zeros(2)}, adapter_dir / f"adapter_model{suffix}")

    with pytest.raises(UnsafeFormatError, match=f"adapter_model{suffix}"):
        store.put_dir(adapter_dir)
    assert files_under(Path(store.url)) == []


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_named_safetensors_is_refused(store: AdapterStore, adapter_dir: Path, zip_format: bool) -> None:
    state = {"base_model.model.x.lora_A.weight": torch.zeros(4, 8)}
    torch.save(state, adapter_dir / WEIGHTS_NAME, _use_new_zipfile_serialization=zip_format)

    with pytest.raises(InvalidAdapterError, match="not a valid safetensors file"):
        store.put_dir(adapter_dir)
    assert files_under(Path(store.url)) == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"r": 8}, "rank 8"),
        ({"r": 0}, "'r' must be a positive integer"),
        ({"peft_type": "IA3"}, "'peft_type'"),
        ({"use_dora": True}, "'use_dora'"),
        ({"modules_to_save": ["lm_head"]}, "'modules_to_save'"),
        ({"target_modules": ["q_proj", "v_proj"]}, "not matched by target_modules"),
        ({"lora_alpha": None}, "'lora_alpha' is missing"),
        ({"rank_pattern": {"q_proj": 2}}, "rank 2"),
    ],
)
def test_config_that_does_not_fit_the_tensors_is_refused(
    store: AdapterStore, adapter_dir: Path, changes: dict[str, Any], message: str
) -> None:
    edit_config(adapter_dir, **changes)

    with pytest.raises(InvalidAdapterError, match=message):
        store.put_dir(adapter_dir)
    assert files_under(Path(store.url)) == []


def test_lora_a_without_b_is_refused(store: AdapterStore) -> None:
    tensors = lora_tensors(seed=0)
    del tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]

    with pytest.raises(InvalidAdapterError, match="no lora_B"):
        store.put(lora_config(), tensors)
    assert store.list_keys() == []
    assert files_under(Path(store.url) / "tmp") == []


def test_tensor_outside_peft_naming_is_refused(store: AdapterStore) -> None:
    tensors = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32), **lora_tensors(seed=0)}

    with pytest.raises(InvalidAdapterError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        store.put(lora_config(), tensors)


def test_rank_pattern_sets_per_module_rank(store: AdapterStore) -> None:
    tensors = lora_tensors(seed=0, rank=2)
    tensors.update({name: t for name, t in lora_tensors(seed=1, rank=3).items() if "q_proj" in name})

    stored = store.put(lora_config(rank=2, rank_pattern={"q_proj": 3}, alpha_pattern={"q_proj": 6}), tensors)

    ranks = {module.path.rsplit(".", 1)[-1]: (module.rank, module.alpha) for module in stored.info.modules}
    assert ranks == {"q_proj": (3, 6.0), "down_proj": (2, 4.0)}


def test_header_is_read_without_loading_tensors(peft_adapter: tuple[Path, torch.Tensor]) -> None:
    specs = read_safetensors_header(peft_adapter[0] / WEIGHTS_NAME)
    info = inspect_adapter_dir(peft_adapter[0])

    spec = specs["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    assert (spec.dtype, spec.shape) == ("F32", (4, 64))
    down = next(m for m in info.modules if m.path == "model.layers.1.mlp.down_proj")
    assert (down.in_features, down.out_features, info.dtype, info.scaling) == (64, 32, "F32", 2.0)


@pytest.mark.parametrize(
    ("header", "data_size", "message"),
    [
        (b"[]", 0, "not a JSON object"),
        (b'{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 16, "data section has 16"),
        (b'{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', 4, "do not hold"),
        (b'{"t": {"dtype": "X9", "shape": [1], "data_offsets": [0, 1]}}', 1, "unknown dtype"),
        (b'{"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "t": {}}', 1, "not JSON"),
        (b'{"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},'
         b' "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}', 3, "overlaps"),
    ],
)
def test_malformed_safetensors_headers_are_refused(header: bytes, data_size: int, message: str) -> None:
    with pytest.raises(InvalidAdapterError, match=message):
        parse_safetensors_header(header, data_size=data_size)


def test_registry_store_imports_without_torch() -> None:
    code = ("import sys, registry.store, registry.adapter_files; "
            "sys.exit(1 if 'torch' in sys.modules or 'safetensors.torch' in sys.modules else 0)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


# -- atomicity and gc


def test_crash_before_publish_leaves_nothing_visible_and_gc_clears_it(store: AdapterStore, adapter_dir: Path) -> None:
    # A real crash: the writer process dies at the publishing rename, so no cleanup code runs.
    code = ("import os, sys; from pathlib import Path; from registry.store import AdapterStore; "
            "os.rename = lambda *a: os._exit(17); AdapterStore(sys.argv[1]).put_dir(Path(sys.argv[2]))")
    crash = subprocess.run([sys.executable, "-c", code, store.url, str(adapter_dir)], cwd=REPO_ROOT, check=False)
    tmp = Path(store.url) / "tmp"

    assert crash.returncode == 17
    assert store.list_keys() == []
    assert not store.exists(hashlib.sha256((adapter_dir / WEIGHTS_NAME).read_bytes()).hexdigest())
    assert files_under(tmp) != []
    assert store.gc(set(), grace_seconds=HOUR).temp_removed == 0
    age(tmp, 2 * HOUR)
    report = store.gc(set(), grace_seconds=HOUR)
    assert (report.temp_removed, report.adapters_removed) == (1, 0)
    assert report.bytes_freed > 0
    assert list(tmp.iterdir()) == []


def test_failed_publish_raises_and_cleans_its_stage(
    store: AdapterStore, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_rename(*_args: object) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "rename", broken_rename)

    with pytest.raises(OSError, match="I/O error"):
        store.put_dir(adapter_dir)
    assert store.list_keys() == []
    assert files_under(Path(store.url)) == []


def test_gc_removes_only_old_unreferenced_objects(store: AdapterStore) -> None:
    referenced, old, young = (store.put(lora_config(), lora_tensors(seed)) for seed in range(3))
    kept_blob, old_blob, young_blob = (store.put_blob(text, ".txt") for text in (b"a", b"bb", b"ccc"))
    for path in [Path(referenced.uri), Path(old.uri), Path(kept_blob.uri), Path(old_blob.uri)]:
        age(path, 2 * HOUR)
    old_bytes = sum(path.stat().st_size for path in files_under(Path(old.uri))) + old_blob.size

    report = store.gc({referenced.uri, kept_blob.digest}, grace_seconds=HOUR)

    assert (report.adapters_removed, report.blobs_removed, report.temp_removed) == (1, 1, 0)
    assert report.bytes_freed == old_bytes
    assert [key for key, _ in store.list_keys()] == sorted([referenced.key, young.key])
    assert store.get_blob(kept_blob.uri) == b"a" and store.get_blob(young_blob.digest) == b"ccc"
    with pytest.raises(NotFoundError):
        store.get_blob(old_blob.uri)


def test_gc_keeps_every_config_of_a_referenced_digest(store: AdapterStore) -> None:
    tensors = lora_tensors(seed=0)
    first = store.put(lora_config(), tensors)
    second = store.put(lora_config(lora_dropout=0.1), tensors)
    age(Path(store.url), 2 * HOUR)

    assert store.gc({first.digest}, grace_seconds=HOUR).adapters_removed == 0
    assert {first.key, second.key} == {key for key, _ in store.list_keys()}


def test_restoring_an_old_adapter_renews_its_grace(store: AdapterStore) -> None:
    stored = store.put(lora_config(), lora_tensors(seed=0))
    age(Path(stored.uri), 2 * HOUR)

    store.put(lora_config(), lora_tensors(seed=0))

    assert store.gc(set(), grace_seconds=HOUR).adapters_removed == 0
    assert store.exists(stored.key)


def test_delete_hides_and_removes(store: AdapterStore) -> None:
    stored = store.put(lora_config(), lora_tensors(seed=0))

    assert store.delete(stored.uri) is True
    assert store.delete(stored.key) is False
    assert not store.exists(stored.key)
    assert files_under(Path(store.url)) == []


# -- blobs


def test_blobs_round_trip_by_digest_and_uri(store: AdapterStore) -> None:
    ref = store.put_blob(b"hello world", ".txt")

    assert ref.digest == hashlib.sha256(b"hello world").hexdigest()
    assert ref.uri.endswith(f"{ref.digest}.txt") and ref.size == 11
    assert store.get_blob(ref.uri) == store.get_blob(ref.digest) == b"hello world"
    assert store.put_blob(b"hello world", ".txt") == ref
    assert files_under(Path(store.url) / "tmp") == []


def test_corrupt_blob_raises_checksum(store: AdapterStore) -> None:
    ref = store.put_blob(b"some document text", ".txt")
    flip_byte(Path(ref.uri))

    with pytest.raises(ChecksumError, match=ref.digest):
        store.get_blob(ref.uri)


def test_missing_blob_and_bad_suffix(store: AdapterStore) -> None:
    with pytest.raises(NotFoundError):
        store.get_blob("a" * 64)
    with pytest.raises(ValueError, match="suffix"):
        store.put_blob(b"x", "/../x")


def test_store_from_settings_uses_the_data_dir(tmp_path: Path) -> None:
    store = AdapterStore.from_settings(Settings(data_dir=tmp_path))

    ref = store.put_blob(b"x", ".txt")

    assert Path(ref.uri).is_relative_to(tmp_path / "store" / "blobs")


# -- fsspec (non-local) stores


def test_memory_store_round_trip(memory_store: AdapterStore, adapter_dir: Path, tmp_path: Path) -> None:
    stored = memory_store.put_dir(adapter_dir)

    assert stored.uri.startswith("memory://")
    opened = memory_store.open(stored.uri)
    assert opened.is_relative_to(tmp_path / "cache")
    _, tensors = memory_store.load(stored.key)
    original = load_file(str(adapter_dir / WEIGHTS_NAME))
    assert all(torch.equal(tensors[name], original[name]) for name in original)
    assert memory_store.put_dir(adapter_dir).key == stored.key
    assert [key for key, _ in memory_store.list_keys()] == [stored.key]


def test_memory_directory_without_manifest_is_invisible(memory_store: AdapterStore) -> None:
    stored = memory_store.put(lora_config(), lora_tensors(seed=0))
    fs = fsspec.filesystem("memory")
    fs.rm_file(f"/kmtest/store/adapters/{stored.key}/{MANIFEST_NAME}")

    assert not memory_store.exists(stored.key)
    assert memory_store.list_keys() == []
    with pytest.raises(NotFoundError):
        memory_store.open(stored.key)
    report = memory_store.gc(set(), grace_seconds=0)
    assert (report.temp_removed, report.adapters_removed) == (1, 0)
    assert fs.find("/kmtest/store/adapters") == []


def test_memory_store_finishes_a_half_written_adapter(memory_store: AdapterStore) -> None:
    stored = memory_store.put(lora_config(), lora_tensors(seed=0))
    fsspec.filesystem("memory").rm_file(f"/kmtest/store/adapters/{stored.key}/{MANIFEST_NAME}")

    assert memory_store.put(lora_config(), lora_tensors(seed=0)).key == stored.key
    memory_store.load(stored.key)


def test_memory_corruption_is_caught_after_download(memory_store: AdapterStore, tmp_path: Path) -> None:
    stored = memory_store.put(lora_config(), lora_tensors(seed=0))
    fs = fsspec.filesystem("memory")
    path = f"/kmtest/store/adapters/{stored.key}/{WEIGHTS_NAME}"
    data = bytearray(fs.cat_file(path))
    data[-1] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    shutil.rmtree(tmp_path / "cache" / "adapters", ignore_errors=True)

    with pytest.raises(ChecksumError):
        memory_store.open(stored.key)
    with pytest.raises(ChecksumError):
        memory_store.load(stored.key)
    assert not (tmp_path / "cache" / "adapters" / stored.key).exists()


def test_memory_damaged_cache_copy_is_fetched_again(memory_store: AdapterStore) -> None:
    stored = memory_store.put(lora_config(), lora_tensors(seed=0))
    flip_byte(memory_store.open(stored.key) / WEIGHTS_NAME)

    opened = memory_store.open(stored.key)

    assert load_file(str(opened / WEIGHTS_NAME)).keys() == lora_tensors(seed=0).keys()


def test_memory_gc_and_blobs(memory_store: AdapterStore) -> None:
    kept = memory_store.put(lora_config(), lora_tensors(seed=0))
    dropped = memory_store.put(lora_config(), lora_tensors(seed=1))
    ref = memory_store.put_blob(b"jsonl\n", ".jsonl")

    report = memory_store.gc({kept.key, ref.uri}, grace_seconds=0)

    assert (report.adapters_removed, report.blobs_removed) == (1, 0)
    assert memory_store.exists(kept.key) and not memory_store.exists(dropped.key)
    assert ref.uri.startswith("memory://") and memory_store.get_blob(ref.uri) == b"jsonl\n"

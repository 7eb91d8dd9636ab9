"""Hostile adapter uploads (POST /admin/adapters) against a live loopback server serving the tiny model.

Each upload is refused with a specific 4xx code and message, and leaves nothing behind: no adapter row, no alias,
no store blob, no staging directory. Cases already in test_server_adapters.py (pickle .bin weights, .pt in a files
list, rank above the limit, another model's shapes, unknown modules, config r=8 with r=4 tensors, truncated file,
torch.save() output named .safetensors, size limit) are not repeated here.
"""

from __future__ import annotations

import json
import pickle
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from engines.model_shapes import MSG_RANK_TOO_LARGE, MSG_SHAPE_MISMATCH
from registry.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from registry.config import Settings
from registry.errors import MSG_UNSAFE_FORMAT
from server.app import create_app
from server.services.adapter_uploads import (
    MAX_MODULE_PATH_CHARS,
    MSG_DUPLICATE_FILE,
    MSG_LONG_MODULE,
    MSG_NOT_FINITE,
    MSG_UNSAFE_PATTERN,
    MSG_WEIGHT_RANGE,
    WHY_LONG,
    WHY_MANY,
    WHY_NESTED,
    pattern_risk,
)
from server.state import AppState
from tests.live_server import serve
from tests.tiny import save_lora_for

MAX_RANK = 8
MODEL_NAME = "kmserve-tiny"
Q_PROJ = "model.layers.0.self_attn.q_proj"
V_PROJ = "model.layers.0.self_attn.v_proj"
PREFIX = "base_model.model."
# A refused upload must answer this fast: nothing may backtrack or load for long.
ANSWER_SECONDS = 10.0


@dataclass
class Live:
    """A running server, its state and admin headers, and a valid LoRA (config and tensors) for the tiny model."""

    url: str
    state: AppState
    headers: dict[str, str]
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def upload(self, files: list[tuple[str, tuple[str, bytes]]], lineage: str = "ke:hostile") -> httpx.Response:
        """POST the files as a ke adapter."""
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=60) as client:
            return client.post("/admin/adapters", data={"kind": "ke", "lineage": lineage}, files=files)

    def written(self) -> tuple[int, int, list[tuple[str, float]], list[Path]]:
        """Adapters, aliases, store keys and staging directories: what an upload could leave behind."""
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=60) as client:
            adapters = client.get("/admin/adapters").json()["count"]
            aliases = client.get("/admin/aliases").json()["count"]
        staging = self.state.settings.data_dir / "uploads"
        leftovers = sorted(staging.iterdir()) if staging.exists() else []
        return adapters, aliases, self.state.store.list_keys(), leftovers


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Live]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hostile-adapters")
    lora = save_lora_for(tiny_model_dir, root / "lora", seed=1)
    settings = Settings(data_dir=root / "data", base_model=str(tiny_model_dir), model_name=MODEL_NAME,
                        max_adapter_rank=MAX_RANK)
    app = create_app(settings)
    with serve(app) as url:
        headers = {"Authorization": f"Bearer {settings.admin_key_file.read_text().strip()}"}
        config = json.loads((lora / CONFIG_NAME).read_text())
        yield Live(url, app.state.kmserve, headers, config, load_file(lora / WEIGHTS_NAME))


def pair(config: bytes, weights: bytes, config_name: str = CONFIG_NAME, weights_name: str = WEIGHTS_NAME
         ) -> list[tuple[str, tuple[str, bytes]]]:
    """The two form fields of an upload."""
    return [("adapter_config", (config_name, config)), ("adapter_model", (weights_name, weights))]


def header_file(header: dict[str, Any] | bytes, data: bytes = b"") -> bytes:
    """A safetensors file with the given header (a dict, or raw bytes) and data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def save(tensors: dict[str, torch.Tensor]) -> bytes:
    """The tensors as safetensors bytes."""
    data: bytes = save_tensors(tensors)
    return data


def lora_key(module: str, side: str) -> str:
    return f"{PREFIX}{module}.lora_{side}.weight"


# Each case: what to change in the valid config (None: keep it) and how to build the weights from the valid tensors.
ConfigEdit = dict[str, Any] | bytes | None
WeightsEdit = Callable[[dict[str, torch.Tensor]], bytes]
KEEP: WeightsEdit = save


def _only(side: str) -> WeightsEdit:
    return lambda tensors: save({k: v for k, v in tensors.items() if f"lora_{side}" in k})


def _as(dtype: torch.dtype) -> WeightsEdit:
    return lambda tensors: save({k: (v * 100).to(dtype) for k, v in tensors.items()})


def _filled(value: float, dtype: torch.dtype = torch.float32) -> WeightsEdit:
    return lambda tensors: save({k: torch.full_like(v, value).to(dtype) for k, v in tensors.items()})


def _renamed(module: str) -> WeightsEdit:
    return lambda tensors: save({k.replace("model.layers.0.self_attn.q_proj", module): v for k, v in tensors.items()})


def _b_rank(rank: int) -> WeightsEdit:
    return lambda tensors: save({k: v[:, :rank].contiguous() if "lora_B" in k else v for k, v in tensors.items()})


def _transposed(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.T.contiguous() for k, v in tensors.items()})


def _with_extra(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({**tensors, f"{PREFIX}lm_head.weight": torch.zeros(4, 4)})


def _scalars(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: torch.tensor(0.5) for k in tensors})


def _q_rank(rank: int) -> WeightsEdit:
    """Every q_proj at `rank` (what rank_pattern {"q_proj": rank} declares), v_proj as it is."""
    def resized(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if "q_proj" not in key:
            return tensor
        shape = (rank, tensor.shape[1]) if "lora_A" in key else (tensor.shape[0], rank)
        return torch.full(shape, 0.01)

    return lambda tensors: save({k: resized(k, v) for k, v in tensors.items()})


def _v_out_plus_one(tensors: dict[str, torch.Tensor]) -> bytes:
    b = tensors[lora_key(V_PROJ, "B")]
    return save({**tensors, lora_key(V_PROJ, "B"): torch.zeros(b.shape[0] + 1, b.shape[1])})


def _long_path(tensors: dict[str, torch.Tensor]) -> bytes:
    deep = ".".join(["block"] * 60)
    return save({k.replace("self_attn", deep): v for k, v in tensors.items()})


CASES: list[Any] = [
    # -- not safetensors at all, or a lying header ---------------------------------------------------------------
    pytest.param(None, lambda _: pickle.dumps({"lora_A": [[1.0]]}), 422, "invalid_adapter",
                 "is not a valid safetensors file", id="raw-pickle-as-safetensors"),
    pytest.param(None, lambda _: b"", 422, "invalid_adapter", "header length -1", id="empty-weights"),
    pytest.param(None, lambda _: struct.pack("<Q", 2**63) + b"{}", 422, "invalid_adapter",
                 "header length 9223372036854775808 does not fit", id="header-length-2^63"),
    pytest.param(None, lambda _: header_file({lora_key(Q_PROJ, "A"): {
        "dtype": "F32", "shape": [4, 10**12], "data_offsets": [0, 16 * 10**12]}}), 422, "invalid_adapter",
        "tensors cover 16000000000000 bytes but the data section has 0", id="header-claims-16TB"),
    pytest.param(None, lambda _: header_file(b"[" * 100_000 + b"]" * 100_000), 422, "invalid_adapter",
                 "header is not JSON", id="header-nested-100k"),
    pytest.param(None, lambda _: header_file(b'{"\xff": 1}'), 422, "invalid_adapter", "header is not JSON",
                 id="header-not-utf8"),
    pytest.param(None, lambda _: header_file(
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
        b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4), 422, "invalid_adapter",
        "duplicate keys", id="header-duplicate-keys"),
    pytest.param(None, lambda _: header_file({
        lora_key(Q_PROJ, "A"): {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        lora_key(Q_PROJ, "B"): {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
        422, "invalid_adapter", "overlaps or leaves a gap", id="header-overlapping-tensors"),
    # -- config ------------------------------------------------------------------------------------------------
    pytest.param(b"", KEEP, 422, "invalid_adapter", "is not readable JSON", id="empty-config"),
    pytest.param(b"{r: 4, 'peft_type': LORA", KEEP, 422, "invalid_adapter", "is not readable JSON",
                 id="config-not-json"),
    pytest.param(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", KEEP, 422, "invalid_adapter", "is not readable JSON",
                 id="config-png"),
    pytest.param(b"[]", KEEP, 422, "invalid_adapter", "must hold a JSON object", id="config-array"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, KEEP, 422, "invalid_adapter", "is not readable JSON",
                 id="config-nested-100k"),
    pytest.param({"r": float("nan")}, KEEP, 422, "invalid_adapter", "field 'r' must be a positive integer",
                 id="config-nan-rank"),
    pytest.param({"r": True}, KEEP, 422, "invalid_adapter", "field 'r' must be a positive integer",
                 id="config-bool-rank"),
    pytest.param({"lora_alpha": float("inf")}, KEEP, 422, "invalid_adapter",
                 "field 'lora_alpha' must be a positive finite number", id="config-infinite-alpha"),
    pytest.param({"r": 10**30}, KEEP, 422, "invalid_adapter", f"do not have the config's rank {10**30}",
                 id="config-rank-10^30"),
    pytest.param({"peft_type": "PREFIX_TUNING"}, KEEP, 422, "invalid_adapter", "only LORA adapters are served",
                 id="config-prefix-tuning"),
    pytest.param({"use_dora": True}, KEEP, 422, "invalid_adapter", "DoRA", id="config-dora"),
    pytest.param({"target_modules": []}, KEEP, 422, "invalid_adapter", "non-empty list", id="config-no-targets"),
    # -- tensors that do not match the config or the base model ------------------------------------------------
    pytest.param(None, _only("A"), 422, "invalid_adapter", "has lora_A but no lora_B", id="missing-lora-B"),
    pytest.param(None, _only("B"), 422, "invalid_adapter", "has lora_B but no lora_A", id="missing-lora-A"),
    pytest.param(None, _b_rank(2), 422, "invalid_adapter", "do not have the config's rank 4", id="B-rank-2"),
    pytest.param(None, _transposed, 422, "invalid_adapter", "(lora_A must be [r, in], lora_B [out, r])",
                 id="transposed"),
    pytest.param(None, _scalars, 422, "invalid_adapter", "must be matrices", id="scalar-tensors"),
    pytest.param(None, _with_extra, 422, "invalid_adapter", "is not named base_model.model.<module>.lora_A",
                 id="extra-full-weight"),
    pytest.param(None, _as(torch.int32), 422, "invalid_adapter", "dtype I32 is not float", id="int32"),
    pytest.param(None, _as(torch.uint8), 422, "invalid_adapter", "dtype U8 is not float", id="uint8"),
    pytest.param(None, _as(torch.bool), 422, "invalid_adapter", "dtype BOOL is not float", id="bool"),
    pytest.param(None, _as(torch.float8_e4m3fn), 422, "invalid_adapter", "dtype F8_E4M3 is not float",
                 id="float8"),
    pytest.param(None, _v_out_plus_one, 422, "adapter_base_mismatch", MSG_SHAPE_MISMATCH.split("{", 1)[0],
                 id="v-proj-out-features-off-by-one"),
    pytest.param({"rank_pattern": {"q_proj": 16}}, _q_rank(16), 422, "adapter_rank_too_large",
                 MSG_RANK_TOO_LARGE.format(rank=16, limit=MAX_RANK), id="rank-pattern-above-limit"),
    # -- weights that pass every shape check but cannot be served ----------------------------------------------
    pytest.param(None, _filled(float("nan")), 422, "invalid_adapter_weights",
                 MSG_NOT_FINITE.format(name=lora_key(Q_PROJ, "A")), id="nan-weights"),
    pytest.param(None, _filled(float("-inf"), torch.bfloat16), 422, "invalid_adapter_weights",
                 MSG_NOT_FINITE.format(name=lora_key(Q_PROJ, "A")), id="infinite-bf16-weights"),
    pytest.param(None, _filled(1e30), 422, "invalid_adapter_weights",
                 MSG_WEIGHT_RANGE.format(name=lora_key(Q_PROJ, "A"), peak=1e30, limit=65504.0), id="1e30-weights"),
    # -- module-name regexes that backtrack for hours ------------------------------------------------------------
    pytest.param({"target_modules": "(.*)*x"}, KEEP, 422, "unsafe_adapter_pattern",
                 MSG_UNSAFE_PATTERN.format(field="target_modules", pattern="(.*)*x", why=WHY_NESTED),
                 id="nested-repeat-target"),
    pytest.param({"rank_pattern": {"(q|qq)+_proj": 4}}, KEEP, 422, "unsafe_adapter_pattern", WHY_NESTED,
                 id="repeated-alternation-rank-pattern"),
    pytest.param({"alpha_pattern": {"(a+)+": 8.0}}, KEEP, 422, "unsafe_adapter_pattern", WHY_NESTED,
                 id="nested-repeat-alpha-pattern"),
    pytest.param({"target_modules": ".*a.*b.*c.*d"}, KEEP, 422, "unsafe_adapter_pattern", WHY_MANY,
                 id="many-repeats"),
    pytest.param({"target_modules": "q_proj|" * 40 + "v_proj"}, KEEP, 422, "unsafe_adapter_pattern", WHY_LONG,
                 id="long-pattern"),
    pytest.param({"target_modules": r".*\.(q_proj|v_proj)"}, _long_path, 422, "unsafe_adapter_pattern",
                 MSG_LONG_MODULE.split("{", 1)[0], id="regex-target-over-long-module-paths"),
]


def _config_bytes(live: Live, edit: ConfigEdit) -> bytes:
    if isinstance(edit, bytes):
        return edit
    return json.dumps({**live.config, **(edit or {})}).encode()


@pytest.mark.parametrize(("config", "weights", "status", "code", "message"), CASES)
def test_hostile_adapter_is_refused_and_nothing_is_written(
    live: Live, config: ConfigEdit, weights: WeightsEdit, status: int, code: str, message: str
) -> None:
    before = live.written()
    started = time.monotonic()
    response = live.upload(pair(_config_bytes(live, config), weights(live.tensors)))
    assert time.monotonic() - started < ANSWER_SECONDS
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, response.text
    assert message in error["message"], response.text
    assert live.written() == before


@pytest.mark.parametrize(("files", "message"), [
    pytest.param(lambda c, w: pair(c, w, config_name="adapter_config.pkl"),
                 MSG_UNSAFE_FORMAT.format(name="adapter_config.pkl"), id="config-named-pkl"),
    pytest.param(lambda c, w: pair(c, w, weights_name="adapter_model.CKPT"),
                 MSG_UNSAFE_FORMAT.format(name="adapter_model.CKPT"), id="uppercase-ckpt"),
    pytest.param(lambda c, w: [("files", (CONFIG_NAME, c)), ("files", ("pytorch_model.PICKLE", w))],
                 MSG_UNSAFE_FORMAT.format(name="pytorch_model.PICKLE"), id="files-list-pickle"),
])
def test_pickle_names_are_415_before_anything_is_read(
    live: Live, files: Callable[[bytes, bytes], list[tuple[str, tuple[str, bytes]]]], message: str
) -> None:
    before = live.written()
    response = live.upload(files(_config_bytes(live, None), save(live.tensors)))
    assert response.status_code == 415, response.text
    assert response.json()["error"] == {"code": "unsafe_adapter_format", "message": message}
    assert live.written() == before


def test_the_same_file_twice_is_refused(live: Live) -> None:
    before = live.written()
    config, weights = _config_bytes(live, None), save(live.tensors)
    files = [("files", (CONFIG_NAME, config)), ("files", (WEIGHTS_NAME, weights)), ("files", (WEIGHTS_NAME, weights))]
    response = live.upload(files)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == {"code": "invalid_upload",
                                        "message": MSG_DUPLICATE_FILE.format(name=WEIGHTS_NAME)}
    assert live.written() == before


def test_a_safe_regex_and_edge_weights_are_accepted(live: Live) -> None:
    # The checks above refuse only what is hostile: a PEFT-style regex and weights at the half-precision edge pass.
    config = _config_bytes(live, {"target_modules": r".*\.(q_proj|v_proj)", "rank_pattern": {"q_proj": 4}})
    tensors = {k: torch.full_like(v, -65504.0) if k.endswith("lora_A.weight") else v for k, v in live.tensors.items()}
    response = live.upload(pair(config, save(tensors)), lineage="ke:accepted")
    assert response.status_code == 201, response.text
    assert (response.json()["lineage"], response.json()["rank"]) == ("ke:accepted", 4)


@pytest.mark.parametrize(("pattern", "why"), [
    ("q_proj", None),
    (r".*\.(q_proj|v_proj)", None),
    (r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj", None),
    (".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$", None),
    ("(ab){2}", None),
    ("(", None),  # not a regex: the format check names it
    ("(.*)*x", WHY_NESTED),
    (r"(\w+\.?)*x", WHY_NESTED),
    ("(?:ab|cd)+", WHY_NESTED),
    ("(?=(a+)+b)", WHY_NESTED),
    ("(a|b)?", None),
    ("x" * 257, WHY_LONG),
    (".*.*.*.*", WHY_MANY),
])
def test_pattern_risk(pattern: str, why: str | None) -> None:
    assert pattern_risk(pattern) == why


def test_module_path_limit_leaves_room_for_real_models() -> None:
    real = "base_model.model.vision_tower.vision_model.encoder.layers.31.self_attn.out_proj.lora_A.weight"
    assert len(real) < MAX_MODULE_PATH_CHARS

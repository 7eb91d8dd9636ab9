"""Process settings: one `Settings` object per process, read from `KMSERVE_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EngineName = Literal["auto", "hf", "vllm"]
TrainProfile = Literal["auto", "paper", "fast"]
ENV_PREFIX = "KMSERVE_"


class Settings(BaseSettings):
    """Every knob of kmserve; `KMSERVE_<FIELD>` in the environment (or a `.env` file) overrides the default."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore")

    data_dir: Path = Field(Path(".kmserve"), description="Where the embedded mode keeps its database, index and store.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; unset = SQLite file `kmserve.db` under the data dir."
    )
    store_url: str | None = Field(
        None, description="Adapter store root: a local path or any fsspec URL (s3://bucket/prefix); unset = data dir."
    )
    qdrant_url: str | None = Field(None, description="Qdrant server URL; unset = embedded local folder.")
    qdrant_api_key: SecretStr | None = Field(None, description="API key for the Qdrant server.")
    metrics_token: SecretStr | None = Field(
        None, description="Bearer token `/metrics` requires (Prometheus `authorization` credentials); unset = open."
    )
    embedding_model: str | None = Field(
        None, description="Local sentence-transformers directory for retrieval; unset = the bundled all-MiniLM-L6-v2."
    )
    embedding_batch_size: int = Field(64, ge=1, description="Texts per forward pass when embedding chunks.")
    embedding_device: str = Field("auto", description="Device of the embedder: auto (cuda when present), cpu, cuda.")
    base_model: str | None = Field(
        None, description="HF model id or local path of the generator; unset = the built-in default model."
    )
    model_name: str | None = Field(
        None, description="Name clients use for the base model (`model`); unset = the base model id, or "
                          "kmserve-reader for the default model."
    )
    max_upload_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="Largest document or adapter upload accepted (413 above)."
    )
    max_adapter_rank: int = Field(64, ge=1, description="Largest LoRA rank accepted by adapter uploads.")
    max_request_tokens: int = Field(2048, ge=1, description="Largest max_tokens a query may ask for.")
    engine: EngineName = Field("auto", description="Generation engine: auto (vllm when CUDA and vllm exist), hf, vllm.")
    engine_max_loaded_adapters: int = Field(
        8, ge=1, description="Adapters the engine keeps loaded, least recently used evicted beyond (on vLLM its CPU "
                             "LoRA cache); a working set larger than this reloads adapters from the store."
    )
    engine_max_batch_size: int = Field(16, ge=1, description="Requests the engine generates for in one batch.")
    vllm_max_loras: int = Field(
        8, ge=1, description="Distinct adapters one vLLM batch may use (GPU LoRA slots; each costs GPU memory)."
    )
    vllm_max_lora_rank: int = Field(32, ge=1, description="Largest LoRA rank vLLM reserves slots for; on vLLM, adapter "
                                                             "uploads and training ranks above it are refused.")
    vllm_gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="Share of GPU memory vLLM takes for weights, LoRA slots and KV cache."
    )
    vllm_max_model_len: int | None = Field(
        None, ge=1, description="vLLM's context length; unset = the model's own."
    )
    auth: Literal["on", "off"] = Field("on", description="API-key authentication; `off` only for local tinkering.")
    train_profile: TrainProfile = Field(
        "auto", description="paper (the paper's generation counts and steps) or fast (CPU/CI); auto picks by device."
    )
    host: str = Field("127.0.0.1", description="Address the server binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port the server binds.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    db_pool_size: int = Field(5, ge=1, description="Connection pool size (PostgreSQL).")
    job_lease_seconds: float = Field(60.0, gt=0, description="How long a claimed job stays leased without heartbeat.")
    job_max_attempts: int = Field(3, ge=1, description="Default attempts before a job fails for good.")
    job_retry_backoff_seconds: float = Field(5.0, ge=0, description="First retry delay; doubles per attempt.")
    gc_grace_seconds: float = Field(3600.0, ge=0, description="Orphan blobs younger than this are kept by GC.")
    max_prompt_tokens: int = Field(
        0, ge=0, description="Longest prompt, in the generator's tokens, a request may send (400 above); "
                             "0 = only the model's context limits it."
    )
    rate_limit_rps: float = Field(
        0.0, ge=0, description="Requests per second each API key may make to query routes (query, OpenAI, reads); "
                               "0 = no limit. Counted per server process."
    )
    rate_limit_burst: int = Field(
        0, ge=0, description="Query requests a key may send at once before the rate applies; 0 = twice the rate."
    )
    upload_rate_limit_rps: float = Field(
        0.0, ge=0, description="Requests per second each API key may make to uploads, job commands and /admin; "
                               "0 = no limit. Counted per server process."
    )
    upload_rate_limit_burst: int = Field(
        0, ge=0, description="Upload and admin requests a key may send at once; 0 = twice the rate."
    )
    max_active_jobs_per_tenant: int = Field(
        16, ge=0, description="Training jobs a tenant may have queued or running at once (429 above); 0 = no limit."
    )
    request_timeout_seconds: float = Field(
        300.0, ge=0, description="Deadline of a query or generation request; the generation is aborted and the "
                                 "client gets 504 (streams end with an error event). 0 = none. Uploads are exempt."
    )
    shutdown_drain_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM, how long requests in flight may finish while new ones get 503."
    )

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite under the data dir."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'kmserve.db').resolve()}"

    @property
    def resolved_store_url(self) -> str:
        """The adapter store root, defaulting to `store/` under the data dir."""
        return self.store_url or str((self.data_dir / "store").resolve())

    @property
    def qdrant_path(self) -> Path:
        """The embedded Qdrant folder (used when no Qdrant server URL is set)."""
        return self.data_dir / "qdrant"

    @property
    def admin_key_file(self) -> Path:
        """File (mode 0600) where the first start writes the admin API key."""
        return self.data_dir / "admin.key"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, built once."""
    return Settings()


def env_names() -> set[str]:
    """Every environment variable name `Settings` reads (`KMSERVE_<FIELD>`)."""
    return {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}


def _default_text(value: object) -> str:
    """A default as the README shows it: unset for None, plain text otherwise."""
    if value is None:
        return "unset"
    return f"`{value}`"


def settings_markdown_table() -> str:
    """The configuration table of the README (variable, default, meaning), rendered from `Settings.model_fields`."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {_default_text(field.default)} | {meaning} |")
    return "\n".join(rows) + "\n"

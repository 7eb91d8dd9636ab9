"""Typed errors of the generation engines; each is a `RegistryError` so the server maps it in its one handler."""

from __future__ import annotations

from registry.errors import RegistryError

MSG_INVALID_SAMPLING = "invalid sampling parameter {field}: {detail}"
MSG_INVALID_REQUEST = "invalid generation request: {detail}"
MSG_CONTEXT_LENGTH = (
    "the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}, but the model's context holds "
    "{limit} tokens; shorten the prompt or lower max_tokens."
)
MSG_OVERLOADED = "the engine is overloaded ({detail}); retry shortly."
MSG_CAPACITY = (
    "cannot load adapter {adapter_id}: all {capacity} adapter slots are pinned; unpin or unload one, "
    "or raise max_loaded_adapters."
)
MSG_PIN_LIMIT = (
    "cannot pin adapter {adapter_id}: vLLM keeps pinned adapters in GPU slots and at most {limit} of "
    "max_loras={max_loras} may be pinned; unload a pinned adapter or raise max_loras."
)
MSG_ADAPTER_LOAD = "adapter {adapter_id} could not be loaded from {path}: {detail}"
MSG_NOT_LOADED = "adapter {adapter_id} is not loaded in the engine; load it first."
MSG_ENGINE_UNAVAILABLE = "engine {engine!r} is not available: {detail}"
MSG_ENGINE_CLOSED = "the engine is closed; no new requests are accepted."
MSG_GENERATION_FAILED = "generation failed inside the engine: {detail}"


class EngineError(RegistryError):
    """Base of every error an engine raises on purpose."""

    code = "engine_error"
    status = 500


class InvalidSamplingParamsError(EngineError):
    """A sampling parameter is out of range; the message names the field."""

    code = "invalid_sampling_params"
    status = 422

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(MSG_INVALID_SAMPLING.format(field=field, detail=detail), field=field)


class InvalidRequestError(EngineError):
    """A generation request is malformed (no prompt, both prompt and messages, bad message roles)."""

    code = "invalid_request"
    status = 422

    def __init__(self, detail: str) -> None:
        super().__init__(MSG_INVALID_REQUEST.format(detail=detail))


class ContextLengthError(EngineError):
    """Prompt plus max_tokens do not fit in the model's context window."""

    code = "context_length_exceeded"
    status = 400

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int) -> None:
        super().__init__(
            MSG_CONTEXT_LENGTH.format(prompt_tokens=prompt_tokens, max_tokens=max_tokens, limit=limit),
            prompt_tokens=prompt_tokens, max_tokens=max_tokens, limit=limit,
        )


class EngineOverloadedError(EngineError):
    """The request queue is full or adapter slots stayed busy too long; the client should retry."""

    code = "engine_overloaded"
    status = 503

    def __init__(self, detail: str) -> None:
        super().__init__(MSG_OVERLOADED.format(detail=detail))


class AdapterCapacityError(EngineError):
    """A new adapter is needed but every slot holds a pinned adapter."""

    code = "adapter_capacity"
    status = 503

    def __init__(self, adapter_id: int, capacity: int) -> None:
        super().__init__(MSG_CAPACITY.format(adapter_id=adapter_id, capacity=capacity), adapter_id=adapter_id)


class PinLimitError(AdapterCapacityError):
    """vLLM only: pinning one more adapter would leave no GPU LoRA slot for unpinned adapters."""

    def __init__(self, adapter_id: int, limit: int, max_loras: int) -> None:
        EngineError.__init__(
            self, MSG_PIN_LIMIT.format(adapter_id=adapter_id, limit=limit, max_loras=max_loras), adapter_id=adapter_id
        )


class AdapterLoadError(EngineError):
    """The adapter files exist but the engine could not load them (bad config, shape mismatch, missing files)."""

    code = "adapter_load_failed"
    status = 422

    def __init__(self, adapter_id: int, path: object, detail: str) -> None:
        super().__init__(
            MSG_ADAPTER_LOAD.format(adapter_id=adapter_id, path=path, detail=detail), adapter_id=adapter_id
        )


class AdapterNotLoadedError(EngineError):
    """An admin operation names an adapter the engine does not hold."""

    code = "adapter_not_loaded"
    status = 404

    def __init__(self, adapter_id: int) -> None:
        super().__init__(MSG_NOT_LOADED.format(adapter_id=adapter_id), adapter_id=adapter_id)


class EngineUnavailableError(EngineError):
    """The configured engine cannot run here (e.g. vLLM without a GPU or without the `gpu` extra)."""

    code = "engine_unavailable"
    status = 503

    def __init__(self, engine: str, detail: str) -> None:
        super().__init__(MSG_ENGINE_UNAVAILABLE.format(engine=engine, detail=detail), engine=engine)


class EngineClosedError(EngineError):
    """The engine was closed (shutdown in progress)."""

    code = "engine_closed"
    status = 503

    def __init__(self) -> None:
        super().__init__(MSG_ENGINE_CLOSED)


class GenerationFailedError(EngineError):
    """An unexpected failure inside the model forward; the request is failed, the engine keeps serving."""

    code = "generation_failed"
    status = 500

    def __init__(self, detail: str) -> None:
        super().__init__(MSG_GENERATION_FAILED.format(detail=detail))

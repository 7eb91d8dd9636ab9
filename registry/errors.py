"""Typed domain errors of the registry; the server maps each to its HTTP status and JSON body in one handler.

Every error has a stable snake_case `code`, an HTTP `status` and a message that tells the reader what to do.
Messages are module constants so that tests assert on them.
"""

from __future__ import annotations

from typing import Any

MSG_NOT_FOUND = "{what} {ref} was not found; list them to see what exists."
MSG_ADAPTER_IN_USE = "adapter {adapter_id} is the target of alias(es) {aliases}; move or delete the alias(es) first."
MSG_CHECKSUM = "adapter blob {digest} failed its checksum ({detail}); it was not loaded. Re-upload or retrain it."
MSG_UNSAFE_FORMAT = "{name} is not accepted: only safetensors adapters are loaded (pickle files are refused)."
MSG_INVALID_ADAPTER = "invalid adapter: {detail}"
MSG_INCOMPATIBLE = "adapters cannot be combined: {detail}"
MSG_DUPLICATE = "{what} {ref} already exists."
MSG_INVALID_SCOPE = "unknown scope {scope!r}; use one of {allowed}."
MSG_JOB_STATE = "job {job_id} is {status}; {detail}"
MSG_LEASE_LOST = "job {job_id} is no longer leased to {worker}; stop working on it."
MSG_INDEX_LOCKED = (
    "the embedded vector index {path} is open in another process; run server and worker as one process "
    "(`kmserve up`), or set KMSERVE_QDRANT_URL to a Qdrant server shared by all processes."
)
MSG_INDEX_UNAVAILABLE = "the vector index is unavailable ({detail}); check KMSERVE_QDRANT_URL and the Qdrant server."
MSG_VECTOR_SIZE = (
    "collection {collection} holds {found}-dimensional vectors but {expected} were given; re-index the documents "
    "or set KMSERVE_EMBEDDING_MODEL back to the model that built the index."
)


class RegistryError(Exception):
    """Base of every error the registry raises on purpose."""

    code = "registry_error"
    status = 400

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class NotFoundError(RegistryError):
    """The named object does not exist (or belongs to another tenant)."""

    code = "not_found"
    status = 404

    def __init__(self, what: str, ref: object) -> None:
        super().__init__(MSG_NOT_FOUND.format(what=what, ref=ref), what=what, ref=str(ref))


class ConflictError(RegistryError):
    """The request conflicts with the current state."""

    code = "conflict"
    status = 409


class DuplicateError(ConflictError):
    """An object with that unique name already exists."""

    code = "already_exists"

    def __init__(self, what: str, ref: object) -> None:
        super().__init__(MSG_DUPLICATE.format(what=what, ref=ref), what=what, ref=str(ref))


class AdapterInUseError(ConflictError):
    """An adapter cannot be deleted while an alias points at it."""

    code = "adapter_in_use"

    def __init__(self, adapter_id: int, aliases: list[str]) -> None:
        super().__init__(
            MSG_ADAPTER_IN_USE.format(adapter_id=adapter_id, aliases=", ".join(aliases)),
            adapter_id=adapter_id, aliases=aliases,
        )


class JobStateError(ConflictError):
    """The job is not in a state that allows the operation."""

    code = "job_state"

    def __init__(self, job_id: int, status: str, detail: str) -> None:
        super().__init__(MSG_JOB_STATE.format(job_id=job_id, status=status, detail=detail), job_id=job_id)


class LeaseLostError(ConflictError):
    """A worker acted on a job whose lease it no longer holds (expired and reclaimed, or finished)."""

    code = "lease_lost"

    def __init__(self, job_id: int, worker: str) -> None:
        super().__init__(MSG_LEASE_LOST.format(job_id=job_id, worker=worker), job_id=job_id)


class ChecksumError(RegistryError):
    """A stored blob does not match its recorded digest: corrupted or tampered with; never loaded."""

    code = "adapter_corrupt"
    status = 503

    def __init__(self, digest: str, detail: str) -> None:
        super().__init__(MSG_CHECKSUM.format(digest=digest, detail=detail), digest=digest)


class UnsafeFormatError(RegistryError):
    """A pickle (or otherwise non-safetensors) weight file was offered."""

    code = "unsafe_adapter_format"
    status = 415

    def __init__(self, name: str) -> None:
        super().__init__(MSG_UNSAFE_FORMAT.format(name=name), name=name)


class InvalidAdapterError(RegistryError):
    """An adapter's config or tensors are malformed or inconsistent."""

    code = "invalid_adapter"
    status = 422

    def __init__(self, detail: str) -> None:
        super().__init__(MSG_INVALID_ADAPTER.format(detail=detail))


class IncompatibleAdaptersError(RegistryError):
    """Adapters that cannot be combined into one (different base models, shapes, or unsupported features)."""

    code = "incompatible_adapters"
    status = 422

    def __init__(self, detail: str) -> None:
        super().__init__(MSG_INCOMPATIBLE.format(detail=detail))


class InvalidScopeError(RegistryError):
    """An API key scope outside the known set."""

    code = "invalid_scope"
    status = 422

    def __init__(self, scope: str, allowed: list[str]) -> None:
        super().__init__(MSG_INVALID_SCOPE.format(scope=scope, allowed=", ".join(allowed)))


class VectorIndexError(RegistryError):
    """Base of the vector index's errors: the index cannot serve the request right now."""

    code = "vector_index_error"
    status = 503


class IndexLockedError(VectorIndexError):
    """The embedded (local-folder) Qdrant index is held by another process; local mode admits one client."""

    code = "vector_index_locked"

    def __init__(self, path: object) -> None:
        super().__init__(MSG_INDEX_LOCKED.format(path=path), path=str(path))


class IndexUnavailableError(VectorIndexError):
    """The Qdrant server did not answer or answered with an error."""

    code = "vector_index_unavailable"

    def __init__(self, detail: str) -> None:
        super().__init__(MSG_INDEX_UNAVAILABLE.format(detail=detail))


class VectorSizeError(VectorIndexError):
    """Vectors of another dimension than the collection holds (the embedding model changed)."""

    code = "vector_size_mismatch"
    status = 409

    def __init__(self, collection: str, found: int, expected: int) -> None:
        super().__init__(MSG_VECTOR_SIZE.format(collection=collection, found=found, expected=expected),
                         collection=collection)

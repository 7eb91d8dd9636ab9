"""The kmserve Python SDK: `KmClient` (sync) and `AsyncKmClient` (async), typed results and one exception tree.

    from clients.sdk import KmClient

    with KmClient() as km:  # KMSERVE_URL, KMSERVE_API_KEY or the local admin key file
        doc = km.documents.upload_text("Varo", "The capital of Varo is Meluna.", train={"method": "lm"})
        km.jobs.wait(doc.jobs[-1].id)
        print(km.query("What is the capital of Varo?", document_id=doc.id).answer)

Importing it loads neither torch nor the server.
"""

from clients.sdk._async_client import AsyncKmClient, AsyncQueryStream
from clients.sdk._base import RetryPolicy
from clients.sdk._client import KmClient, QueryStream
from clients.sdk._exceptions import (
    APIError,
    AuthenticationError,
    ConflictError,
    ConnectionError,
    KmError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    TimeoutError,
    UnprocessableError,
    UnsupportedMediaTypeError,
)
from clients.sdk._models import (
    Adapter,
    AdapterList,
    Alias,
    AliasList,
    ApiKey,
    ApiKeyCreated,
    ApiKeyList,
    Document,
    DocumentDetail,
    DocumentList,
    DocumentUpload,
    EngineAdapter,
    EngineStats,
    Job,
    JobEvent,
    JobList,
    Km,
    Passage,
    QueryResult,
    TrainOptions,
    Usage,
)

__all__ = [
    "APIError",
    "Adapter",
    "AdapterList",
    "Alias",
    "AliasList",
    "ApiKey",
    "ApiKeyCreated",
    "ApiKeyList",
    "AsyncKmClient",
    "AsyncQueryStream",
    "AuthenticationError",
    "ConflictError",
    "ConnectionError",
    "Document",
    "DocumentDetail",
    "DocumentList",
    "DocumentUpload",
    "EngineAdapter",
    "EngineStats",
    "Job",
    "JobEvent",
    "JobList",
    "Km",
    "KmClient",
    "KmError",
    "NotFoundError",
    "Passage",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "QueryResult",
    "QueryStream",
    "RateLimitError",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailableError",
    "TimeoutError",
    "TrainOptions",
    "UnprocessableError",
    "UnsupportedMediaTypeError",
    "Usage",
]

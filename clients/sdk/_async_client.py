"""The asynchronous client: `AsyncKmClient(base_url, api_key)`, the same methods as `KmClient`, awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import httpx

from clients.sdk import _endpoints as ep
from clients.sdk import _models as m
from clients.sdk._base import RetryPolicy, client_settings, job_item, query_item, read_response, request_args
from clients.sdk._endpoints import Call, Train
from clients.sdk._exceptions import TimeoutError, error_from_response, translate_transport_error
from clients.sdk._sse import EventParser, ServerEvent

T = TypeVar("T")


class AsyncQueryStream:
    """Iterate for the answer's text deltas; afterwards `result` holds the full `QueryResult`."""

    def __init__(self, events: AsyncIterator[ServerEvent]) -> None:
        self._events = events
        self.result: m.QueryResult | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        async for event in self._events:
            item = query_item(event)
            if isinstance(item, str):
                yield item
            else:
                self.result = item


class AsyncKmClient:
    """A kmserve API client.

    `base_url` defaults to KMSERVE_URL, `api_key` to KMSERVE_API_KEY or the local admin key file. Pass
    `http_client` to use your own `httpx.AsyncClient` (transport, proxies); the caller then closes it.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float | None = None,
                 max_retries: int = 2, retry: RetryPolicy | None = None, http_client: httpx.AsyncClient | None = None,
                 ) -> None:
        settings = client_settings(base_url, api_key, timeout)
        self.base_url: str = settings["base_url"]
        self._headers: dict[str, str] = settings["headers"]
        self._timeout: float = settings["timeout"]
        self._retry = retry or RetryPolicy(max_retries=max_retries)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=self._timeout)
        self.documents = Documents(self)
        self.jobs = Jobs(self)
        self.adapters = Adapters(self)
        self.aliases = Aliases(self)
        self.keys = Keys(self)
        self.admin_jobs = AdminJobs(self)

    async def __aenter__(self) -> AsyncKmClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connections (unless the http_client was given)."""
        if self._owns_http:
            await self._http.aclose()

    async def send(self, call: Call[T]) -> T:
        """Send a call, retrying idempotent ones on 429/503 and connection errors; its parsed result."""
        attempt = 0
        while True:
            try:
                response = await self._http.request(call.method, self.base_url + call.path, headers=self._headers,
                                              timeout=self._timeout, **request_args(call))
            except httpx.TransportError as exc:
                if not self._retry.retry_error(call, exc, attempt):
                    raise translate_transport_error(exc) from exc
                await asyncio.sleep(self._retry.delay(attempt))
            else:
                if not self._retry.retry_response(call, response, attempt):
                    return read_response(call, response)
                await asyncio.sleep(self._retry.delay(attempt, response))
            attempt += 1

    async def stream(self, call: Call[Any]) -> AsyncIterator[ServerEvent]:
        """The server-sent events of a streaming call."""
        try:
            async with self._http.stream(call.method, self.base_url + call.path, headers=self._headers,
                                   timeout=self._timeout, **request_args(call)) as response:
                if response.is_error:
                    await response.aread()
                    raise error_from_response(response)
                parser = EventParser()
                async for line in response.aiter_lines():
                    if (event := parser.feed(line)) is not None:
                        yield event
        except httpx.TransportError as exc:
            raise translate_transport_error(exc) from exc

    @overload
    async def query(self, question: str, *, document_id: int | None = ..., km: str | None = ..., rerank: bool = ...,
              stream: Literal[False] = ..., **options: Any) -> m.QueryResult: ...

    @overload
    async def query(self, question: str, *, document_id: int | None = ..., km: str | None = ..., rerank: bool = ...,
              stream: Literal[True], **options: Any) -> AsyncQueryStream: ...

    async def query(self, question: str, *, document_id: int | None = None, km: str | None = None, rerank: bool = False,
              stream: bool = False, **options: Any) -> m.QueryResult | AsyncQueryStream:
        """Ask a question about a document (its KM) or a model name; options: ke, rag (top_k or dict), compress,
        max_tokens, temperature, ... With `stream=True`, an `AsyncQueryStream` of text deltas."""
        body = ep.query_body(question, document_id, km, rerank, options)
        if stream:
            return AsyncQueryStream(self.stream(ep.query({**body, "stream": True})))
        return await self.send(ep.query(body))

    async def engine(self) -> m.EngineStats:
        """The generation engine's resident adapters and cache statistics (admin)."""
        return await self.send(ep.engine())

    async def train(self, kind: str, payload: Mapping[str, Any] | None = None, document_id: int | None = None) -> m.Job:
        """Queue a training job: train_ke, train_compressor, train_reranker, train_reasoner or train_km (admin)."""
        return await self.send(ep.train(kind, payload, document_id))


class _Resource:
    def __init__(self, client: AsyncKmClient) -> None:
        self._client = client


class Documents(_Resource):
    """/v1/documents."""

    async def upload_text(self, title: str, text: str, *, metadata: Mapping[str, Any] | None = None,
                    train: Train = None) -> m.DocumentUpload:
        """Upload text; its ingest and KM training are queued (`train`: method, steps, rank)."""
        return await self._client.send(ep.upload_text(title, text, metadata, train))

    async def upload_file(self, path: str | Path, *, title: str | None = None,
                          metadata: Mapping[str, Any] | None = None, train: Train = None) -> m.DocumentUpload:
        """Upload a .txt, .md or .pdf file."""
        return await self._client.send(ep.upload_file(Path(path), title, metadata, train))

    async def revise(self, document_id: int, *, text: str | None = None, path: str | Path | None = None,
               title: str | None = None, metadata: Mapping[str, Any] | None = None, train: Train = None,
               ) -> m.DocumentUpload:
        """Give a document new content (`text` with `title`, or a file `path`); it is trained again."""
        if path is not None:
            return await self._client.send(ep.upload_file(Path(path), title, metadata, train, document_id))
        return await self._client.send(ep.upload_text(title or "", text or "", metadata, train, document_id))

    async def list(self, *, status: str | None = None, limit: int = 100, offset: int = 0) -> m.DocumentList:
        """The tenant's documents, newest first."""
        return await self._client.send(ep.list_documents(status, limit, offset))

    async def get(self, document_id: int) -> m.DocumentDetail:
        """A document with its jobs."""
        return await self._client.send(ep.get_document(document_id))

    async def delete(self, document_id: int) -> None:
        """Delete a document, its vectors and its KMs."""
        await self._client.send(ep.delete_document(document_id))


class Jobs(_Resource):
    """/v1/jobs."""

    async def get(self, job_id: int) -> m.Job:
        """A job's status, progress, metrics and error."""
        return await self._client.send(ep.get_job(job_id))

    async def cancel(self, job_id: int) -> m.Job:
        """Cancel a job (409 once it has ended)."""
        return await self._client.send(ep.cancel_job(job_id))

    async def events(self, job_id: int, *, after: int | None = None) -> AsyncIterator[m.JobEvent | m.Job]:
        """The job's events as they happen; the last item is the final `Job`."""
        async for event in self._client.stream(ep.job_events(job_id, after)):
            yield job_item(event)

    async def wait(self, job_id: int, timeout: float | None = None, poll: float = 1.0) -> m.Job:
        """Poll until the job ends and return it; `TimeoutError` after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (job := await self.get(job_id)).is_final:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s")
            await asyncio.sleep(poll)
        return job


class Adapters(_Resource):
    """/admin/adapters (admin)."""

    async def list(self, *, kind: str | None = None, document_id: int | None = None, lineage: str | None = None,
             limit: int = 100, offset: int = 0) -> m.AdapterList:
        """Adapter versions, newest first."""
        return await self._client.send(ep.list_adapters(kind, document_id, lineage, limit, offset))

    async def get(self, adapter_id: int) -> m.Adapter:
        """One adapter version."""
        return await self._client.send(ep.get_adapter(adapter_id))

    async def upload(self, directory: str | Path, *, kind: str, document_id: int | None = None,
               lineage: str | None = None, alias: str | None = None) -> m.Adapter:
        """Upload a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
        return await self._client.send(ep.upload_adapter(Path(directory), kind, document_id, lineage, alias))

    async def delete(self, adapter_id: int) -> None:
        """Delete an adapter version (409 while an alias points at it)."""
        await self._client.send(ep.delete_adapter(adapter_id))

    async def load(self, adapter_id: int, *, pin: bool = False) -> m.EngineAdapter:
        """Load an adapter into the engine (and pin it)."""
        return await self._client.send(ep.engine_action(adapter_id, "load", {"pin": pin}))

    async def unload(self, adapter_id: int) -> m.EngineAdapter:
        """Unload an adapter from the engine."""
        return await self._client.send(ep.engine_action(adapter_id, "unload", {}))

    async def pin(self, adapter_id: int, *, pinned: bool = True) -> m.EngineAdapter:
        """Pin (or unpin) a loaded adapter."""
        return await self._client.send(ep.engine_action(adapter_id, "pin", {"pinned": pinned}))


class Aliases(_Resource):
    """/admin/aliases (admin)."""

    async def list(self) -> m.AliasList:
        """Every alias and its adapter version."""
        return await self._client.send(ep.list_aliases())

    async def set(self, name: str, adapter_id: int) -> m.Alias:
        """Point an alias at an adapter version (hot swap)."""
        return await self._client.send(ep.set_alias(name, adapter_id))

    async def delete(self, name: str) -> None:
        """Delete an alias."""
        await self._client.send(ep.delete_alias(name))


class Keys(_Resource):
    """/admin/keys (admin)."""

    async def create(self, name: str, scopes: Sequence[str]) -> m.ApiKeyCreated:
        """Create a key with scopes query, upload and/or admin; its secret is in `key`."""
        return await self._client.send(ep.create_key(name, scopes))

    async def list(self, *, include_revoked: bool = False) -> m.ApiKeyList:
        """The tenant's keys."""
        return await self._client.send(ep.list_keys(include_revoked))

    async def revoke(self, key_id: int) -> m.ApiKey:
        """Revoke a key."""
        return await self._client.send(ep.revoke_key(key_id))


class AdminJobs(_Resource):
    """/admin/jobs (admin)."""

    async def list(self, *, status: str | None = None, kind: str | None = None, document_id: int | None = None,
             limit: int = 50, offset: int = 0) -> m.JobList:
        """The tenant's jobs, newest first."""
        return await self._client.send(ep.list_jobs(status, kind, document_id, limit, offset))

    async def retry(self, job_id: int) -> m.Job:
        """Queue a failed or cancelled job again."""
        return await self._client.send(ep.retry_job(job_id))

"""The `kmserve` commands that talk to a running server over HTTP through the SDK: docs, ask, jobs, adapters, keys.

Exit codes: 0 ok, 1 the server said no (its message is printed), 2 usage error.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clients.cli_progress import JobProgress
from clients.sdk import APIError, KmClient, KmError, QueryResult, TrainOptions

console = Console()
err_console = Console(stderr=True)

docs_app = typer.Typer(help="Upload, list and delete documents.", no_args_is_help=True)
jobs_app = typer.Typer(help="Follow jobs.", no_args_is_help=True)
adapters_app = typer.Typer(help="Adapters and aliases (admin).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (admin).", no_args_is_help=True)


class Method(enum.StrEnum):
    """How a document's knowledge module is trained."""

    SDCD = "sdcd"
    DDCD = "ddcd"
    LM = "lm"
    NONE = "none"


class Compression(enum.StrEnum):
    """How retrieved passages are compressed."""

    EXTRACTIVE = "extractive"
    ABSTRACTIVE = "abstractive"


class Scope(enum.StrEnum):
    """What an API key may do."""

    QUERY = "query"
    UPLOAD = "upload"
    ADMIN = "admin"


@dataclass(frozen=True)
class RemoteOptions:
    """The server and key the global `--url` and `--api-key` options name (None: environment or key file)."""

    url: str | None = None
    api_key: str | None = None


@contextmanager
def remote(ctx: typer.Context) -> Iterator[KmClient]:
    """A client for the global options; an SDK error prints its message and exits 1."""
    options = ctx.obj if isinstance(ctx.obj, RemoteOptions) else RemoteOptions()
    try:
        with KmClient(options.url, options.api_key) as km:
            yield km
    except KmError as exc:
        where = f" ({exc.status} {exc.code})" if isinstance(exc, APIError) else ""
        err_console.print(f"[red]error{where}:[/red] {escape(exc.message)}")
        raise typer.Exit(1) from exc


def _watch(km: KmClient, job_ids: list[int]) -> None:
    failed = JobProgress(km, console).watch(job_ids)
    if failed is not None:
        err_console.print(f"[red]job {failed.id} ({failed.kind}) {failed.status}:[/red] "
                          f"{escape(failed.error or failed.message)}")
        raise typer.Exit(1)


@docs_app.command("add")
def docs_add(
    ctx: typer.Context, file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help=".txt, .md or .pdf")],
    title: Annotated[str | None, typer.Option(help="Title (default: the file name).")] = None,
    method: Annotated[Method, typer.Option(help="How to train the knowledge module.")] = Method.SDCD,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps (default: the server's profile).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until training ends.")] = False,
) -> None:
    """Upload a document; its ingest and knowledge-module training are queued."""
    with remote(ctx) as km:
        doc = km.documents.upload_file(file, title=title, train=TrainOptions(method=method.value, steps=steps))
        note = "uploaded" if doc.created else "already uploaded"
        console.print(f"document [bold]{doc.id}[/bold] {note}: jobs {', '.join(str(j.id) for j in doc.jobs)}")
        if wait:
            _watch(km, [job.id for job in doc.jobs])
            done = km.documents.get(doc.id)
            console.print(f"document {done.id} {done.status}" + (f", km version {done.km.version}" if done.km else ""))


@docs_app.command("ls")
def docs_ls(ctx: typer.Context, limit: Annotated[int, typer.Option(min=1, max=500)] = 100) -> None:
    """List documents, newest first."""
    with remote(ctx) as km:
        page = km.documents.list(limit=limit)
    table = Table("id", "title", "status", "km", "bytes", "created")
    for doc in page.data:
        table.add_row(str(doc.id), escape(doc.title), doc.status, f"v{doc.km.version}" if doc.km else "-",
                      str(doc.size_bytes), doc.created_at.strftime("%Y-%m-%d %H:%M"))
    console.print(table)
    console.print(f"{page.count} document(s)")


@docs_app.command("rm")
def docs_rm(ctx: typer.Context, document_id: int) -> None:
    """Delete a document, its vectors and its knowledge modules."""
    with remote(ctx) as km:
        km.documents.delete(document_id)
    console.print(f"document {document_id} deleted")


def ask(
    ctx: typer.Context, doc: Annotated[str, typer.Argument(help="Document id, or a model name (alias, km:<id>).")],
    question: str, ke: Annotated[str | None, typer.Option(help="Knowledge extractor to add.")] = None,
    rag: Annotated[int | None, typer.Option(min=1, max=50, help="Retrieve this many passages.")] = None,
    rerank: Annotated[bool, typer.Option("--rerank", help="Rerank retrieved passages.")] = False,
    compress: Annotated[Compression | None, typer.Option(help="Compress retrieved passages.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = 128,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also print adapters, passages, timings.")] = False,
) -> None:
    """Ask a question about a document through its knowledge module."""
    document_id, model = (int(doc), None) if doc.isdigit() else (None, doc)
    with remote(ctx) as km:
        result = km.query(question, document_id=document_id, km=model, ke=ke, rag=rag, rerank=rerank,
                          compress=compress.value if compress else None, max_tokens=max_tokens)
    console.print(result.answer, markup=False, highlight=False)
    if verbose:
        _explain(result)


def _explain(result: QueryResult) -> None:
    adapters = Table("role", "adapter", title="adapters")
    for role, adapter in result.adapters.items():
        adapters.add_row(role, escape(", ".join(f"{k}={v}" for k, v in (adapter or {}).items()) or "-"))
    console.print(adapters)
    for passage in result.passages:
        console.print(f"[dim]passage doc {passage.document_id} #{passage.index} ({passage.score:.3f}):[/dim] "
                      f"{escape(passage.text)}")
    console.print("timings ms: " + ", ".join(f"{k}={v:.1f}" for k, v in result.timings_ms.items()))
    console.print(f"tokens: prompt {result.usage.prompt_tokens}, completion {result.usage.completion_tokens}")


@jobs_app.command("watch")
def jobs_watch(ctx: typer.Context, job_id: int) -> None:
    """Show a job's progress until it ends."""
    with remote(ctx) as km:
        _watch(km, [job_id])


@adapters_app.command("ls")
def adapters_ls(
    ctx: typer.Context, kind: Annotated[str | None, typer.Option(help="km, ke, compressor, ...")] = None,
    document: Annotated[int | None, typer.Option(help="Only this document's adapters.")] = None,
) -> None:
    """List adapter versions, newest first."""
    with remote(ctx) as km:
        page = km.adapters.list(kind=kind, document_id=document)
    table = Table("id", "kind", "lineage", "version", "rank", "aliases")
    for adapter in page.data:
        table.add_row(str(adapter.id), adapter.kind, escape(adapter.lineage), str(adapter.version),
                      str(adapter.rank), escape(", ".join(adapter.aliases)))
    console.print(table)


@adapters_app.command("alias")
def adapters_alias(ctx: typer.Context, name: str, adapter_id: int) -> None:
    """Point an alias at an adapter version (hot swap)."""
    with remote(ctx) as km:
        alias = km.aliases.set(name, adapter_id)
    console.print(f"{escape(alias.name)} -> adapter {alias.adapter_id} ({escape(alias.lineage)} v{alias.version})")


@adapters_app.command("rm")
def adapters_rm(ctx: typer.Context, adapter_id: int) -> None:
    """Delete an adapter version."""
    with remote(ctx) as km:
        km.adapters.delete(adapter_id)
    console.print(f"adapter {adapter_id} deleted")


@adapters_app.command("upload")
def adapters_upload(
    ctx: typer.Context, directory: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
    kind: Annotated[str, typer.Option(help="km, ke, compressor, reranker or reasoner.")],
    document: Annotated[int | None, typer.Option(help="The document (required for km).")] = None,
    lineage: Annotated[str | None, typer.Option()] = None, alias: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Upload a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    with remote(ctx) as km:
        adapter = km.adapters.upload(directory, kind=kind, document_id=document, lineage=lineage, alias=alias)
    console.print(f"adapter [bold]{adapter.id}[/bold]: {escape(adapter.lineage)} v{adapter.version}")


@keys_app.command("create")
def keys_create(
    ctx: typer.Context, name: str,
    scope: Annotated[list[Scope], typer.Option(help="query, upload or admin; repeat for several.")],
) -> None:
    """Create an API key and print its secret (shown once)."""
    with remote(ctx) as km:
        created = km.keys.create(name, [s.value for s in scope])
    console.print(f"key {created.id} ({escape(created.name)}, {', '.join(created.scopes)}):")
    console.print(created.key, markup=False, highlight=False)


@keys_app.command("ls")
def keys_ls(ctx: typer.Context) -> None:
    """List API keys (never their secrets)."""
    with remote(ctx) as km:
        page = km.keys.list()
    table = Table("id", "name", "prefix", "scopes")
    for key in page.data:
        table.add_row(str(key.id), escape(key.name), key.prefix, ", ".join(key.scopes))
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, key_id: int) -> None:
    """Revoke an API key."""
    with remote(ctx) as km:
        km.keys.revoke(key_id)
    console.print(f"key {key_id} revoked")


def register(app: typer.Typer) -> None:
    """Add the HTTP commands to the `kmserve` app."""
    app.add_typer(docs_app, name="docs")
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(adapters_app, name="adapters")
    app.add_typer(keys_app, name="keys")
    app.command()(ask)

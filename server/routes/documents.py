"""Document routes: upload (JSON text or a .txt/.md/.pdf file), list, read, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.status import HTTP_200_OK, HTTP_202_ACCEPTED, HTTP_204_NO_CONTENT

from registry.models import DocumentStatus
from server.deps import QueryPrincipal, RetrievalDep, StateDep, TenantQuery, UploadPrincipal
from server.schemas.common import IdPath, OffsetQuery
from server.schemas.documents import DocumentDetailPublic, DocumentsPublic, DocumentUploadPublic, upload_openapi
from server.services.documents import DocumentService
from server.uploads import read_document_upload

router = APIRouter(prefix="/v1/documents", tags=["documents"])


def get_document_service(state: StateDep, retrieval: RetrievalDep) -> DocumentService:
    """The document service over the app's state; a deleted document's vectors leave the index with it."""
    return DocumentService(state, on_delete=[retrieval.forget_document])


DocumentServiceDep = Annotated[DocumentService, Depends(get_document_service)]

UPLOAD_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"model": DocumentUploadPublic, "description": "The same content was uploaded before: that document."},
    413: {"description": "Larger than KMSERVE_MAX_UPLOAD_BYTES."},
    415: {"description": "Not a .txt, .md or .pdf, or the bytes do not match the name."},
    422: {"description": "Empty document or invalid fields."},
}


@router.post("", response_model=DocumentUploadPublic, status_code=HTTP_202_ACCEPTED,
             responses=UPLOAD_RESPONSES, openapi_extra=upload_openapi())
async def upload_document(
    request: Request, response: Response, principal: UploadPrincipal, service: DocumentServiceDep,
    tenant: TenantQuery = None,
) -> DocumentUploadPublic:
    """Upload a document and queue its ingest and knowledge-module training."""
    owner = principal.acting_for(tenant)
    upload = await read_document_upload(request, service.max_upload_bytes)
    created = await run_in_threadpool(service.create, upload, owner)
    if not created.created:
        response.status_code = HTTP_200_OK
    return created


@router.put("/{document_id}", response_model=DocumentUploadPublic, status_code=HTTP_202_ACCEPTED,
            responses={**UPLOAD_RESPONSES, 200: {"model": DocumentUploadPublic, "description": "Content unchanged."},
                       409: {"description": "Another document already has this content."}},
            openapi_extra=upload_openapi())
async def revise_document(
    document_id: IdPath, request: Request, response: Response, principal: UploadPrincipal, service: DocumentServiceDep
) -> DocumentUploadPublic:
    """Give a document new content: it is ingested and trained again, and its KM gets the next version."""
    upload = await read_document_upload(request, service.max_upload_bytes)
    before = await run_in_threadpool(service.get, document_id, principal.reach)
    revised = await run_in_threadpool(service.revise, document_id, upload, principal.reach)
    if revised.revision == before.revision:
        response.status_code = HTTP_200_OK
    return revised


@router.get("", response_model=DocumentsPublic)
def list_documents(
    principal: QueryPrincipal, service: DocumentServiceDep, status: DocumentStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100, offset: OffsetQuery = 0,
    tenant: TenantQuery = None,
) -> DocumentsPublic:
    """List the tenant's documents, newest first (an operator sees every tenant's)."""
    return service.list_documents(principal.listing(tenant), status=status, limit=limit, offset=offset)


@router.get("/{document_id}", response_model=DocumentDetailPublic)
def get_document(document_id: IdPath, principal: QueryPrincipal, service: DocumentServiceDep) -> DocumentDetailPublic:
    """A document with its jobs and current knowledge-module version."""
    return service.get(document_id, principal.reach)


@router.delete("/{document_id}", status_code=HTTP_204_NO_CONTENT)
def delete_document(document_id: IdPath, principal: UploadPrincipal, service: DocumentServiceDep) -> None:
    """Delete a document, cancel its unfinished jobs and drop its knowledge modules."""
    service.delete(document_id, principal.reach)

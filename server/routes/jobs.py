"""Job routes: read, follow (server-sent events) and cancel a job; admin listing, retry and training jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.status import HTTP_202_ACCEPTED

from registry.models import JobStatus
from server.deps import AdminPrincipal, QueryPrincipal, StateDep, TenantQuery, UploadPrincipal
from server.schemas.common import DB_INT_MAX, IdPath, IdQuery, NameQuery, OffsetQuery
from server.schemas.jobs import JobPublic, JobsPublic, TrainJobCreate
from server.services.jobs import JobService
from server.sse import MEDIA_TYPE, StreamSettings, event_stream_response, get_stream_settings, poll_stream, resume_after


def get_job_service(state: StateDep) -> JobService:
    """The job service over the app's state."""
    return JobService(state)


JobServiceDep = Annotated[JobService, Depends(get_job_service)]
StreamSettingsDep = Annotated[StreamSettings, Depends(get_stream_settings)]

public = APIRouter(prefix="/v1/jobs", tags=["jobs"])
admin = APIRouter(prefix="/admin", tags=["admin"])

EVENTS_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"content": {MEDIA_TYPE: {}},
          "description": "One event per job event (`id:` = its id, `event:` = its type), then `event: end`."},
}


@public.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: IdPath, principal: QueryPrincipal, service: JobServiceDep) -> JobPublic:
    """A job: kind, status, progress, message, metrics and error."""
    return service.get(job_id, principal.reach)


@public.get("/{job_id}/events", response_class=StreamingResponse, responses=EVENTS_RESPONSES)
async def follow_job(
    job_id: IdPath, request: Request, principal: QueryPrincipal, service: JobServiceDep, pacing: StreamSettingsDep,
    after: Annotated[int | None, Query(
        ge=0, le=DB_INT_MAX, description="Send events after this id (or send Last-Event-ID).")] = None,
) -> StreamingResponse:
    """Follow a job as server-sent events until it ends."""
    feed = await run_in_threadpool(service.feed, job_id, principal.reach, resume_after(request, after))
    return event_stream_response(poll_stream(feed.poll, request.is_disconnected, pacing))


@public.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: IdPath, principal: UploadPrincipal, service: JobServiceDep) -> JobPublic:
    """Cancel a queued job, or ask a running one to stop; 409 once it has ended."""
    return service.cancel(job_id, principal.reach)


@admin.get("/jobs", response_model=JobsPublic)
def list_jobs(
    principal: AdminPrincipal, service: JobServiceDep, status: JobStatus | None = None, kind: NameQuery = None,
    document_id: IdQuery = None, limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: OffsetQuery = 0, tenant: TenantQuery = None,
) -> JobsPublic:
    """List the tenant's jobs (an operator: every tenant's), newest first, filtered by status, kind and document."""
    return service.list_jobs(principal.listing(tenant), status=status, kind=kind, document_id=document_id,
                             limit=limit, offset=offset)


@admin.post("/jobs/{job_id}/retry", response_model=JobPublic)
def retry_job(job_id: IdPath, principal: AdminPrincipal, service: JobServiceDep) -> JobPublic:
    """Queue a failed or cancelled job again, with the jobs that waited on it."""
    return service.retry(job_id, principal.reach)


@admin.post("/train", response_model=JobPublic, status_code=HTTP_202_ACCEPTED)
def train(body: TrainJobCreate, principal: AdminPrincipal, service: JobServiceDep, tenant: TenantQuery = None
          ) -> JobPublic:
    """Queue a training job: knowledge extractor, compressor, reranker, reasoner or knowledge module."""
    return service.submit_training(body, principal.acting_for(tenant))


router = APIRouter()
router.include_router(public)
router.include_router(admin)

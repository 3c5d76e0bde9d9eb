"""REST API of the job queue: create, list, get (with progress), edit, cancel, retry."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from server.db.models import JobState
from server.deps import IdPath, OperatorDep, ReaderDep, SessionDep
from server.jobs import queue
from server.jobs.schemas import CancelBody, JobCreate, JobKindName, JobOut, JobUpdate
from server.schemas import Page

router = APIRouter(prefix="/api/v1", tags=["jobs"])
MAX_ID = 2**31 - 1
OptId = Annotated[int | None, Query(ge=1, le=MAX_ID)]


@router.post("/jobs", status_code=201)
def create_job(data: JobCreate, db: SessionDep, _: OperatorDep) -> JobOut:
    job = queue.create_job(
        db,
        data.kind,
        data.params,
        subject_id=data.subject_id,
        session_id=data.session_id,
        depends_on_id=data.depends_on_id,
        max_attempts=data.max_attempts,
    )
    return JobOut.model_validate(job)


@router.get("/jobs")
def list_jobs(
    db: SessionDep,
    _: ReaderDep,
    kind: JobKindName | None = None,
    state: JobState | None = None,
    subject_id: OptId = None,
    session_id: OptId = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> Page[JobOut]:
    filt = queue.JobFilter(
        kind=kind,
        state=state.value if state else None,
        subject_id=subject_id,
        session_id=session_id,
    )
    rows, total = queue.list_jobs(db, filt, limit, offset)
    return Page[JobOut](
        items=[JobOut.model_validate(j) for j in rows], total=total, limit=limit, offset=offset
    )


@router.get("/jobs/{job_id}")
def get_job(job_id: IdPath, db: SessionDep, _: ReaderDep) -> JobOut:
    return JobOut.model_validate(queue.get_job(db, job_id))


@router.patch("/jobs/{job_id}")
def edit_job(job_id: IdPath, data: JobUpdate, db: SessionDep, _: OperatorDep) -> JobOut:
    return JobOut.model_validate(queue.update_params(db, job_id, data.params))


@router.post("/jobs/{job_id}/cancel")
def cancel_job(
    job_id: IdPath, db: SessionDep, _: OperatorDep, body: CancelBody | None = None
) -> JobOut:
    return JobOut.model_validate(queue.cancel(db, job_id, body.reason if body else ""))


@router.post("/jobs/{job_id}/retry")
def retry_job(job_id: IdPath, db: SessionDep, _: OperatorDep) -> JobOut:
    return JobOut.model_validate(queue.retry(db, job_id))

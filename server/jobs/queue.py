"""The job queue, kept in the ``job`` table: create, claim, renew, complete, fail, cancel, retry.

States: ``queued -> running -> succeeded | failed | cancelled``. A running job goes back to
``queued`` when its worker fails with attempts left, or when its lease expires (the worker died):
the next claim takes it again and counts one more attempt. A job with ``depends_on_id`` waits
until that job has succeeded; when the dependency fails or is cancelled, the dependent is
cancelled too (and re-queued if the dependency is retried).

Claiming is one statement, ``UPDATE job SET ... WHERE id = (SELECT ... LIMIT 1) RETURNING id``:
on PostgreSQL the inner select takes ``FOR UPDATE SKIP LOCKED``, so several workers on several
machines share one queue without ever taking the same job; on SQLite the database's single
writer lock serialises claims and the outer ``WHERE`` re-checks the state (one worker per SQLite
database is the supported setup).

A job's results are written in the same transaction that marks it succeeded (``complete``), and
that transaction first re-checks that this worker still owns the job, so a worker that lost its
lease (cancelled, or presumed dead and reclaimed) can never commit a second copy of the results.
Lease times are naive UTC from the worker's clock; keep worker clocks NTP-synchronised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from server.db.base import utcnow
from server.db.models import Job, JobState
from server.db.session import transaction
from server.errors import Conflict, Invalid, NotFound

JOB_KINDS: tuple[str, ...] = ("fit", "synthesize", "evaluate", "export")
TERMINAL_STATES = frozenset(
    {JobState.succeeded.value, JobState.failed.value, JobState.cancelled.value}
)
DEPENDENCY_MARK = "dependency job"  # prefix of the error of a job cancelled with its dependency

Committer = Callable[[Session], dict[str, Any]]


class LeaseLost(Exception):
    """This worker no longer owns the job: it was cancelled, or reclaimed after its lease expired."""


class JobError(Exception):
    """A failure that retrying cannot fix (bad parameters, missing data): the job fails at once."""


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs of a job it has claimed (a detached snapshot of the row)."""

    id: int
    kind: str
    params: dict[str, Any]
    attempts: int
    max_attempts: int
    subject_id: int | None
    session_id: int | None
    depends_on_id: int | None
    owner: str


def create_job(
    db: Session,
    kind: str,
    params: dict[str, Any] | None = None,
    *,
    subject_id: int | None = None,
    session_id: int | None = None,
    depends_on_id: int | None = None,
    max_attempts: int = 3,
) -> Job:
    if kind not in JOB_KINDS:
        raise Invalid(f"unknown job kind {kind!r}; choose one of {', '.join(JOB_KINDS)}")
    if max_attempts < 1:
        raise Invalid(f"max_attempts must be >= 1, got {max_attempts}")
    if depends_on_id is not None and db.get(Job, depends_on_id) is None:
        raise Invalid(f"depends_on_id {depends_on_id}: job {depends_on_id} does not exist")
    job = Job(
        kind=kind,
        params=dict(params or {}),
        state=JobState.queued.value,
        progress=0.0,
        progress_message="",
        attempts=0,
        max_attempts=max_attempts,
        subject_id=subject_id,
        session_id=session_id,
        depends_on_id=depends_on_id,
    )
    db.add(job)
    db.flush()
    return job


def get_job(db: Session, job_id: int) -> Job:
    job = db.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} does not exist")
    return job


@dataclass(frozen=True)
class JobFilter:
    kind: str | None = None
    state: str | None = None
    subject_id: int | None = None
    session_id: int | None = None


def list_jobs(db: Session, filt: JobFilter, limit: int, offset: int) -> tuple[list[Job], int]:
    query = select(Job)
    if filt.kind is not None:
        query = query.where(Job.kind == filt.kind)
    if filt.state is not None:
        query = query.where(Job.state == filt.state)
    if filt.subject_id is not None:
        query = query.where(Job.subject_id == filt.subject_id)
    if filt.session_id is not None:
        query = query.where(Job.session_id == filt.session_id)
    total = db.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = db.scalars(query.order_by(Job.id.desc()).limit(limit).offset(offset))
    return list(rows), total


def _claimable(table: Any, now: datetime) -> Any:
    return or_(
        table.state == JobState.queued.value,
        and_(table.state == JobState.running.value, table.lease_expires_at < now),
    )


def _sweep(db: Session, now: datetime) -> None:
    """Fail jobs whose last attempt lost its worker; cancel jobs whose dependency ended badly."""
    db.execute(
        update(Job)
        .where(
            Job.state == JobState.running.value,
            Job.lease_expires_at < now,
            Job.attempts >= Job.max_attempts,
        )
        .values(
            state=JobState.failed.value,
            error="its worker stopped renewing the lease (crashed or was killed) on the last "
            "allowed attempt; retry the job to run it again",
            lease_owner=None,
            lease_expires_at=None,
            finished_at=now,
        )
    )
    dep = aliased(Job, name="dep")
    doomed = select(dep.id).where(dep.state.in_([JobState.failed.value, JobState.cancelled.value]))
    db.execute(
        update(Job)
        .where(Job.state == JobState.queued.value, Job.depends_on_id.in_(doomed))
        .values(
            state=JobState.cancelled.value,
            error=f"{DEPENDENCY_MARK} failed or was cancelled; retry it to run this job",
            finished_at=now,
        )
    )


def claim_next(
    factory: sessionmaker[Session],
    owner: str,
    kinds: Sequence[str],
    lease_s: float,
    *,
    now: datetime | None = None,
) -> ClaimedJob | None:
    """Claim the oldest claimable job of ``kinds`` for ``owner``, or return None."""
    if lease_s <= 0:
        raise ValueError(f"lease_s must be > 0, got {lease_s}")
    at = now or utcnow()
    with transaction(factory) as db:
        _sweep(db, at)
        cand = aliased(Job, name="cand")
        dep = aliased(Job, name="dep")
        inner = (
            select(cand.id)
            .where(
                cand.kind.in_(list(kinds)),
                _claimable(cand, at),
                or_(
                    cand.depends_on_id.is_(None),
                    exists().where(
                        dep.id == cand.depends_on_id, dep.state == JobState.succeeded.value
                    ),
                ),
            )
            .order_by(cand.id)
            .limit(1)
        )
        if db.get_bind().dialect.name == "postgresql":
            inner = inner.with_for_update(skip_locked=True, of=cand)
        claimed_id = db.execute(
            update(Job)
            .where(Job.id == inner.scalar_subquery(), _claimable(Job, at))
            .values(
                state=JobState.running.value,
                lease_owner=owner,
                lease_expires_at=at + timedelta(seconds=lease_s),
                attempts=Job.attempts + 1,
                started_at=at,
                progress=0.0,
                progress_message=f"claimed by {owner}",
            )
            .returning(Job.id)
        ).scalar_one_or_none()
        if claimed_id is None:
            return None
        job = db.get(Job, claimed_id, populate_existing=True)
        assert job is not None
        return ClaimedJob(
            id=job.id,
            kind=job.kind,
            params=dict(job.params or {}),
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            subject_id=job.subject_id,
            session_id=job.session_id,
            depends_on_id=job.depends_on_id,
            owner=owner,
        )


def renew_lease(
    factory: sessionmaker[Session],
    job_id: int,
    owner: str,
    lease_s: float,
    *,
    progress: float | None = None,
    message: str | None = None,
) -> bool:
    """Extend the lease (and record progress); False when this worker no longer owns the job."""
    values: dict[str, Any] = {"lease_expires_at": utcnow() + timedelta(seconds=lease_s)}
    if progress is not None:
        values["progress"] = min(1.0, max(0.0, float(progress)))
    if message is not None:
        values["progress_message"] = message[:2000]
    with transaction(factory) as db:
        owned = db.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.running.value)
            .values(**values)
            .returning(Job.id)
        ).scalar_one_or_none()
    return owned is not None


def _take_ownership(db: Session, job_id: int, owner: str, values: dict[str, Any]) -> bool:
    """Conditional update that also takes the row (write) lock first in the transaction."""
    taken = db.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.running.value)
        .values(**values)
        .returning(Job.id)
    ).scalar_one_or_none()
    return taken is not None


def complete(factory: sessionmaker[Session], job: ClaimedJob, commit: Committer) -> dict[str, Any]:
    """Run ``commit(db)`` and mark the job succeeded with its result, in ONE transaction.

    Raises LeaseLost (and writes nothing) when the job is no longer this worker's.
    """
    at = utcnow()
    with transaction(factory) as db:
        if not _take_ownership(
            db,
            job.id,
            job.owner,
            {
                "state": JobState.succeeded.value,
                "progress": 1.0,
                "progress_message": "done",
                "finished_at": at,
                "lease_expires_at": None,
                "error": None,
            },
        ):
            raise LeaseLost(f"job {job.id} is no longer owned by {job.owner}; results discarded")
        result = commit(db)
        db.execute(update(Job).where(Job.id == job.id).values(result=result))
    return result


def fail(
    factory: sessionmaker[Session], job: ClaimedJob, error: str, *, permanent: bool
) -> str | None:
    """Record a failed attempt. Returns the new state (queued: it will be retried; failed), or
    None when the job is no longer this worker's."""
    at = utcnow()
    retry = not permanent and job.attempts < job.max_attempts
    state = JobState.queued.value if retry else JobState.failed.value
    note = f"attempt {job.attempts} of {job.max_attempts} failed: {error}"
    with transaction(factory) as db:
        if not _take_ownership(
            db,
            job.id,
            job.owner,
            {
                "state": state,
                "error": note[:20_000],
                "lease_owner": None,
                "lease_expires_at": None,
                "finished_at": None if retry else at,
                "progress_message": "waiting for a retry" if retry else "failed",
            },
        ):
            return None
    return state


def release(factory: sessionmaker[Session], job: ClaimedJob) -> bool:
    """Give a claimed job back to the queue (worker shutting down); the attempt is not counted."""
    with transaction(factory) as db:
        return _take_ownership(
            db,
            job.id,
            job.owner,
            {
                "state": JobState.queued.value,
                "attempts": Job.attempts - 1,
                "lease_owner": None,
                "lease_expires_at": None,
                "progress_message": f"released by {job.owner} (worker stopped)",
            },
        )


def _dependents(db: Session, job_id: int) -> list[Job]:
    return list(db.scalars(select(Job).where(Job.depends_on_id == job_id).order_by(Job.id)))


def cancel(db: Session, job_id: int, reason: str = "") -> Job:
    """Cancel a queued or running job (a running worker stops at its next lease renewal) and,
    transitively, the queued jobs that depend on it."""
    job = get_job(db, job_id)
    if job.state in TERMINAL_STATES:
        raise Conflict(
            f"job {job_id} is {job.state}; only a queued or running job can be cancelled"
        )
    at = utcnow()
    job.state = JobState.cancelled.value
    job.error = f"cancelled by an operator{': ' + reason if reason else ''}"
    job.lease_expires_at = None
    job.finished_at = at
    pending = _dependents(db, job.id)
    while pending:
        child = pending.pop()
        if child.state == JobState.queued.value:
            child.state = JobState.cancelled.value
            child.error = f"{DEPENDENCY_MARK} {job_id} was cancelled; retry it to run this job"
            child.finished_at = at
            pending.extend(_dependents(db, child.id))
    db.flush()
    return job


def retry(db: Session, job_id: int) -> Job:
    """Queue a failed or cancelled job again with fresh attempts, and the jobs that were
    cancelled because of it."""
    job = get_job(db, job_id)
    if job.state not in (JobState.failed.value, JobState.cancelled.value):
        raise Conflict(
            f"job {job_id} is {job.state}; only a failed or cancelled job can be retried"
        )
    pending = [job]
    while pending:
        item = pending.pop()
        item.state = JobState.queued.value
        item.attempts = 0
        item.error = None
        item.result = None
        item.progress = 0.0
        item.progress_message = "queued again by an operator"
        item.lease_owner = None
        item.lease_expires_at = None
        item.started_at = None
        item.finished_at = None
        pending.extend(
            child
            for child in _dependents(db, item.id)
            if child.state == JobState.cancelled.value
            and (child.error or "").startswith(DEPENDENCY_MARK)
        )
    db.flush()
    return job


def update_params(db: Session, job_id: int, params: dict[str, Any]) -> Job:
    """Edit the parameters of a job that has not started yet (keys given replace, None deletes)."""
    job = get_job(db, job_id)
    if job.state != JobState.queued.value:
        raise Conflict(f"job {job_id} is {job.state}; only a queued job's parameters can be edited")
    merged = dict(job.params or {})
    for key, value in params.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    job.params = merged
    db.flush()
    return job


def dependency_result(db: Session, job_id: int) -> dict[str, Any]:
    """The result of the job ``job_id`` depends on ({} when it has none)."""
    job = get_job(db, job_id)
    if job.depends_on_id is None:
        return {}
    dep = get_job(db, job.depends_on_id)
    return dict(dep.result or {})

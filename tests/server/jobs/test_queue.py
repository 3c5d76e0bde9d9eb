"""The job queue on a real database: claim order, kinds, dependencies, leases, attempts, results."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from server.db.base import utcnow
from server.db.models import Job, StimulusSet
from server.db.session import make_engine, make_sessionmaker, transaction
from server.errors import Conflict, Invalid
from server.jobs import queue


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


def _create(factory: sessionmaker[Session], kind: str = "fit", **kwargs: Any) -> int:
    with transaction(factory) as db:
        return queue.create_job(db, kind, kwargs.pop("params", {"x": 1}), **kwargs).id


def _job(factory: sessionmaker[Session], job_id: int) -> Job:
    with transaction(factory) as db:
        job = db.get(Job, job_id)
        assert job is not None
        db.expunge(job)
        return job


def test_claim_takes_oldest_of_the_asked_kinds(factory: sessionmaker[Session]) -> None:
    fit1 = _create(factory, "fit")
    evaluate = _create(factory, "evaluate")
    fit2 = _create(factory, "fit")
    first = queue.claim_next(factory, "w1", ["evaluate"], 30)
    assert first is not None and first.id == evaluate and first.kind == "evaluate"
    second = queue.claim_next(factory, "w1", ["fit", "synthesize"], 30)
    assert second is not None and second.id == fit1 and second.attempts == 1
    third = queue.claim_next(factory, "w2", ["fit"], 30)
    assert third is not None and third.id == fit2
    assert queue.claim_next(factory, "w2", ["fit", "evaluate"], 30) is None
    row = _job(factory, fit1)
    assert row.state == "running" and row.lease_owner == "w1" and row.attempts == 1
    assert row.lease_expires_at is not None and row.lease_expires_at > utcnow()


def test_unknown_kind_and_missing_dependency_are_refused(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as db, pytest.raises(Invalid, match="unknown job kind 'train'"):
        queue.create_job(db, "train")
    with transaction(factory) as db, pytest.raises(Invalid, match="job 999 does not exist"):
        queue.create_job(db, "fit", depends_on_id=999)


def test_complete_commits_results_and_state_together(factory: sessionmaker[Session]) -> None:
    job_id = _create(factory, "synthesize")
    claimed = queue.claim_next(factory, "w1", ["synthesize"], 30)
    assert claimed is not None

    def commit(db: Session) -> dict[str, Any]:
        stimulus_set = StimulusSet(name=f"set-of-job-{claimed.id}", kind="synthetic")
        db.add(stimulus_set)
        db.flush()
        return {"stimulus_set_id": stimulus_set.id}

    result = queue.complete(factory, claimed, commit)
    row = _job(factory, job_id)
    assert row.state == "succeeded" and row.progress == 1.0 and row.result == result
    assert row.finished_at is not None and row.error is None


def test_a_failing_commit_leaves_nothing_behind(factory: sessionmaker[Session]) -> None:
    job_id = _create(factory, "synthesize")
    claimed = queue.claim_next(factory, "w1", ["synthesize"], 30)
    assert claimed is not None

    def commit(db: Session) -> dict[str, Any]:
        db.add(StimulusSet(name="half-written", kind="synthetic"))
        db.flush()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        queue.complete(factory, claimed, commit)
    with transaction(factory) as db:
        assert db.scalar(select(func.count()).select_from(StimulusSet)) == 0
    assert _job(factory, job_id).state == "running"  # still ours; the worker then calls fail()


def test_expired_lease_is_reclaimed_and_the_old_owner_cannot_commit(
    factory: sessionmaker[Session],
) -> None:
    job_id = _create(factory, "synthesize")
    dead = queue.claim_next(factory, "dead-worker", ["synthesize"], 5)
    assert dead is not None
    # not yet expired: nobody else may take it
    assert queue.claim_next(factory, "w2", ["synthesize"], 5) is None
    later = utcnow() + timedelta(seconds=6)
    again = queue.claim_next(factory, "w2", ["synthesize"], 5, now=later)
    assert again is not None and again.id == job_id and again.attempts == 2
    assert not queue.renew_lease(factory, job_id, "dead-worker", 5)
    with pytest.raises(queue.LeaseLost):
        queue.complete(factory, dead, lambda db: {"who": "dead"})
    assert queue.fail(factory, dead, "late failure", permanent=False) is None
    queue.complete(factory, again, lambda db: {"who": "w2"})
    row = _job(factory, job_id)
    assert row.state == "succeeded" and row.result == {"who": "w2"} and row.attempts == 2


def test_lease_lost_on_the_last_attempt_fails_the_job(factory: sessionmaker[Session]) -> None:
    job_id = _create(factory, "fit", max_attempts=1)
    assert queue.claim_next(factory, "dead-worker", ["fit"], 5) is not None
    later = utcnow() + timedelta(seconds=6)
    assert queue.claim_next(factory, "w2", ["fit"], 5, now=later) is None
    row = _job(factory, job_id)
    assert row.state == "failed" and "stopped renewing the lease" in (row.error or "")


def test_renew_records_progress_and_extends_the_lease(factory: sessionmaker[Session]) -> None:
    job_id = _create(factory)
    claimed = queue.claim_next(factory, "w1", ["fit"], 1)
    assert claimed is not None
    before = _job(factory, job_id).lease_expires_at
    assert queue.renew_lease(factory, job_id, "w1", 60, progress=0.25, message="epoch 3/12")
    row = _job(factory, job_id)
    assert row.progress == 0.25 and row.progress_message == "epoch 3/12"
    assert before is not None and row.lease_expires_at is not None
    assert row.lease_expires_at - before > timedelta(seconds=50)
    assert not queue.renew_lease(factory, job_id, "somebody-else", 60)


def test_failures_are_retried_until_attempts_run_out(factory: sessionmaker[Session]) -> None:
    job_id = _create(factory, max_attempts=2)
    first = queue.claim_next(factory, "w1", ["fit"], 30)
    assert first is not None
    assert queue.fail(factory, first, "CUDA out of memory", permanent=False) == "queued"
    assert "attempt 1 of 2 failed: CUDA out of memory" in (_job(factory, job_id).error or "")
    second = queue.claim_next(factory, "w1", ["fit"], 30)
    assert second is not None and second.attempts == 2
    assert queue.fail(factory, second, "CUDA out of memory", permanent=False) == "failed"
    assert queue.claim_next(factory, "w1", ["fit"], 30) is None
    assert _job(factory, job_id).state == "failed"


def test_permanent_error_fails_at_once(factory: sessionmaker[Session]) -> None:
    job_id = _create(factory, max_attempts=5)
    claimed = queue.claim_next(factory, "w1", ["fit"], 30)
    assert claimed is not None
    assert (
        queue.fail(factory, claimed, "session 7 has no presentations", permanent=True) == "failed"
    )
    assert _job(factory, job_id).attempts == 1


def test_dependencies_wait_then_cancel_and_retry_together(factory: sessionmaker[Session]) -> None:
    fit = _create(factory, "fit")
    synth = _create(factory, "synthesize", depends_on_id=fit)
    assert queue.claim_next(factory, "w1", ["synthesize"], 30) is None  # waits for the fit
    claimed = queue.claim_next(factory, "w1", ["fit"], 30)
    assert claimed is not None
    assert queue.fail(factory, claimed, "bad data", permanent=True) == "failed"
    assert queue.claim_next(factory, "w1", ["synthesize"], 30) is None
    row = _job(factory, synth)
    assert row.state == "cancelled" and (row.error or "").startswith(queue.DEPENDENCY_MARK)
    with transaction(factory) as db:
        queue.retry(db, fit)
    assert _job(factory, synth).state == "queued"
    claimed = queue.claim_next(factory, "w1", ["fit", "synthesize"], 30)
    assert claimed is not None and claimed.id == fit and claimed.attempts == 1
    queue.complete(factory, claimed, lambda db: {"model_id": 42})
    with transaction(factory) as db:
        assert queue.dependency_result(db, synth) == {"model_id": 42}
    claimed = queue.claim_next(factory, "w1", ["fit", "synthesize"], 30)
    assert claimed is not None and claimed.id == synth


def test_cancel_running_job_stops_its_lease_and_dependents(factory: sessionmaker[Session]) -> None:
    fit = _create(factory, "fit")
    synth = _create(factory, "synthesize", depends_on_id=fit)
    claimed = queue.claim_next(factory, "w1", ["fit"], 30)
    assert claimed is not None
    with transaction(factory) as db:
        queue.cancel(db, fit, "wrong sessions")
    assert not queue.renew_lease(factory, fit, "w1", 30)
    with pytest.raises(queue.LeaseLost):
        queue.complete(factory, claimed, lambda db: {})
    assert _job(factory, fit).state == "cancelled"
    assert "wrong sessions" in (_job(factory, fit).error or "")
    assert _job(factory, synth).state == "cancelled"
    with transaction(factory) as db, pytest.raises(Conflict, match="only a queued or running"):
        queue.cancel(db, fit)
    other = _create(factory, "evaluate")
    claimed = queue.claim_next(factory, "w1", ["evaluate"], 30)
    assert claimed is not None and claimed.id == other
    queue.complete(factory, claimed, lambda db: {})
    with transaction(factory) as db, pytest.raises(Conflict, match="only a failed or cancelled"):
        queue.retry(db, other)


def test_edit_params_only_while_queued(factory: sessionmaker[Session]) -> None:
    job_id = _create(factory, "synthesize", params={"max_targets": 8, "seed": 1})
    with transaction(factory) as db:
        job = queue.update_params(db, job_id, {"max_targets": 4, "seed": None})
        assert job.params == {"max_targets": 4}
    assert queue.claim_next(factory, "w1", ["synthesize"], 30) is not None
    with transaction(factory) as db, pytest.raises(Conflict, match="only a queued job"):
        queue.update_params(db, job_id, {"max_targets": 2})


def test_release_returns_the_job_without_counting_the_attempt(
    factory: sessionmaker[Session],
) -> None:
    job_id = _create(factory)
    claimed = queue.claim_next(factory, "w1", ["fit"], 30)
    assert claimed is not None
    assert queue.release(factory, claimed)
    row = _job(factory, job_id)
    assert row.state == "queued" and row.attempts == 0 and row.lease_owner is None


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite has one writer
def test_postgres_claim_skips_a_locked_job_instead_of_waiting(
    database_url: str, engine: Engine, factory: sessionmaker[Session]
) -> None:
    assert database_url.startswith("postgresql")
    first = _create(factory, "fit")
    second = _create(factory, "fit")
    with engine.connect() as other:  # another worker in the middle of claiming `first`
        other.execute(select(Job.id).where(Job.id == first).with_for_update())
        got: list[queue.ClaimedJob | None] = []
        claimer = threading.Thread(
            target=lambda: got.append(queue.claim_next(factory, "w2", ["fit"], 30))
        )
        claimer.start()
        claimer.join(timeout=10)
        waited = claimer.is_alive()
        other.rollback()  # releases the lock (and a claimer stuck behind it)
        claimer.join()
    assert not waited, "the claim waited for the locked job instead of skipping it"
    assert got[0] is not None and got[0].id == second
    claimed = queue.claim_next(factory, "w3", ["fit"], 30)
    assert claimed is not None and claimed.id == first

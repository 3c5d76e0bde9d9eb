"""The worker loop: heartbeat, progress, cancellation, retries; two worker processes sharing a queue."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from server.config import Settings
from server.db.models import Job
from server.db.session import make_engine, make_sessionmaker, transaction
from server.jobs import queue
from server.stimuli.blobs import BlobStore
from server.worker import JobContext, WorkerConfig, resolve_device, run_one, run_worker

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


def _job(factory: sessionmaker[Session], job_id: int) -> Job:
    with transaction(factory) as db:
        job = db.get(Job, job_id)
        assert job is not None
        db.expunge(job)
        return job


def _wait_for(predicate: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        time.sleep(0.02)


def test_progress_is_written_by_the_heartbeat_and_result_committed(
    factory: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    with transaction(factory) as db:
        job_id = queue.create_job(db, "export", {"n": 3}).id
    seen = threading.Event()

    def handler(ctx: JobContext) -> queue.Committer:
        ctx.progress(0.5, "half way")
        _wait_for(lambda: _job(factory, job_id).progress_message == "half way")
        seen.set()
        return lambda db: {"n": ctx.params["n"] * 2}

    config = WorkerConfig(kinds=("export",), lease_s=5, heartbeat_s=0.05)
    ran = run_one(factory, BlobStore(tmp_path), settings, config, {"export": handler})
    assert ran is not None and ran.id == job_id and seen.is_set()
    row = _job(factory, job_id)
    assert row.state == "succeeded" and row.result == {"n": 6} and row.progress == 1.0


def test_cancelling_a_running_job_stops_its_handler(
    factory: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    with transaction(factory) as db:
        job_id = queue.create_job(db, "export").id
    committed: list[int] = []

    def handler(ctx: JobContext) -> queue.Committer:
        ctx.sleep(30)  # raises LeaseLost once the heartbeat finds the job cancelled
        return lambda db: committed.append(1) or {}

    def cancel_when_running() -> None:
        _wait_for(lambda: _job(factory, job_id).state == "running")
        with transaction(factory) as db:
            queue.cancel(db, job_id, "operator changed their mind")

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    started = time.monotonic()
    config = WorkerConfig(kinds=("export",), lease_s=5, heartbeat_s=0.05)
    run_one(factory, BlobStore(tmp_path), settings, config, {"export": handler})
    canceller.join()
    assert time.monotonic() - started < 20
    assert committed == []
    assert _job(factory, job_id).state == "cancelled"


def test_errors_are_retried_then_fail_and_job_errors_fail_at_once(
    factory: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    with transaction(factory) as db:
        flaky = queue.create_job(db, "export", {"fail_times": 1}, max_attempts=3).id
        broken = queue.create_job(db, "evaluate", {}, max_attempts=3).id
    calls: Counter[int] = Counter()

    def export(ctx: JobContext) -> queue.Committer:
        calls[ctx.job.id] += 1
        if calls[ctx.job.id] <= ctx.params["fail_times"]:
            raise RuntimeError("transient network glitch")
        return lambda db: {"calls": calls[ctx.job.id]}

    def evaluate(ctx: JobContext) -> queue.Committer:
        calls[ctx.job.id] += 1
        raise queue.JobError("session 3 showed no synthetic images")

    config = WorkerConfig(kinds=("export", "evaluate"), lease_s=5, poll_s=0.01)
    ran = run_worker(
        factory,
        BlobStore(tmp_path),
        settings,
        config,
        handlers={"export": export, "evaluate": evaluate},
        exit_when_idle=True,
    )
    assert ran == 3
    row = _job(factory, flaky)
    assert row.state == "succeeded" and row.attempts == 2 and row.result == {"calls": 2}
    row = _job(factory, broken)
    assert row.state == "failed" and row.attempts == 1 and calls[broken] == 1
    assert "no synthetic images" in (row.error or "")


def test_worker_config_and_device_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown job kinds"):
        WorkerConfig(kinds=("train",))
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")


def test_two_worker_processes_never_run_the_same_job(
    factory: sessionmaker[Session], database_url: str, tmp_path: Path
) -> None:
    n_jobs = 120
    with transaction(factory) as db:
        ids = [queue.create_job(db, "export", {"i": i}).id for i in range(n_jobs)]
    go = tmp_path / "go"
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.server.jobs.worker_proc",
                database_url,
                str(log),
                str(go),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for log in logs
    ]
    _wait_for(lambda: all(log.with_suffix(".ready").exists() for log in logs), 60)
    go.touch()  # both workers start claiming at the same moment
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    runs = [[int(x) for x in log.read_text().split()] for log in logs]
    every = Counter(runs[0] + runs[1])
    assert sorted(every) == ids, "every job ran"
    assert max(every.values()) == 1, f"jobs run twice: {[j for j, n in every.items() if n > 1]}"
    assert all(len(r) > 0 for r in runs), f"both workers took jobs: {[len(r) for r in runs]}"
    with transaction(factory) as db:
        states = Counter(db.scalars(select(Job.state)))
        pids = {j.result["pid"] for j in db.scalars(select(Job)) if j.result}
    assert states == {"succeeded": n_jobs} and len(pids) == 2


def test_interrupted_worker_gives_the_job_back(
    factory: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    with transaction(factory) as db:
        job_id = queue.create_job(db, "export").id

    def handler(ctx: JobContext) -> queue.Committer:
        raise KeyboardInterrupt  # Ctrl-C, or SIGTERM under `popcontrol worker`

    config = WorkerConfig(kinds=("export",), lease_s=30)
    with pytest.raises(KeyboardInterrupt):
        run_one(factory, BlobStore(tmp_path), settings, config, {"export": handler})
    row = _job(factory, job_id)
    assert row.state == "queued" and row.attempts == 0 and row.lease_owner is None

"""Kill -9 a worker process in the middle of a synthesize job: a second worker finishes the job
after the first one's lease expires, and exactly one stimulus set results."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, select

from server.config import Settings
from server.db.models import Job, Stimulus, StimulusKind, StimulusSet
from server.db.session import make_engine, make_sessionmaker, transaction
from server.jobs import queue
from server.loop.fitjob import FitParams, fit_subject
from server.stimuli.blobs import BlobStore
from tests.server.loop.world import PlantedPopulation, build_world, record, schedule

REPO = Path(__file__).resolve().parents[3]


def _wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


def _worker(settings: Settings, lease_s: float, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "POPCONTROL_DATABASE_URL": settings.resolved_database_url,
        "POPCONTROL_DATA_DIR": str(settings.data_dir),
        "PYTHONPATH": str(REPO),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "worker",
            "--device",
            "cpu",
            "--kinds",
            "synthesize",
            "--lease-s",
            str(lease_s),
            "--poll-s",
            "0.1",
        ],
        cwd=REPO,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def test_killed_worker_mid_synthesize_leaves_one_stimulus_set(
    settings: Settings, tmp_path: Path
) -> None:
    engine = make_engine(settings.resolved_database_url)
    factory = make_sessionmaker(engine)
    blobs = BlobStore(settings.resolved_blob_dir)
    world = build_world(factory, blobs, n_sites=4, n_natural=12, n_normalizer=4)
    session_id = schedule(factory, world, [(world.normalizer_set_id, 4), (world.natural_set_id, 6)])
    record(factory, blobs, session_id, PlantedPopulation(4, seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random backbone weights
        model_id = fit_subject(
            factory,
            blobs,
            world.subject_id,
            FitParams(input_size=64, cv_folds=3, readout="ridge"),
        )
    with transaction(factory) as db:
        job_id = queue.create_job(
            db,
            "synthesize",
            {
                "model_id": model_id,
                "targets": world.site_ids[:2],
                "steps": 4,
                "size_px": 64,
                "images_per_target": 1,
                "n_candidates": 1,
                "pause_before_commit_s": 600,  # first attempt: hold the results until killed
            },
            subject_id=world.subject_id,
        ).id

    def job() -> Job:
        with transaction(factory) as db:
            row = db.get(Job, job_id)
            assert row is not None
            db.expunge(row)
            return row

    first = _worker(settings, lease_s=2.0, log=tmp_path / "first.log")
    try:
        _wait_for(
            lambda: job().progress_message.startswith("holding results"),
            120,
            "the first worker to finish synthesizing (see first.log)",
        )
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    held = job()
    assert held.state == "running" and held.attempts == 1 and held.lease_owner is not None
    with transaction(factory) as db:
        assert (
            db.scalar(
                select(func.count()).select_from(StimulusSet).where(StimulusSet.kind == "synthetic")
            )
            == 0
        ), "nothing was committed before the kill"
        n_images_on_disk = len(list(blobs.root.glob("*/*.png")))

    second = _worker(settings, lease_s=2.0, log=tmp_path / "second.log")
    try:
        _wait_for(
            lambda: job().state in ("succeeded", "failed"),
            180,
            "the second worker to finish the job (see second.log)",
        )
    finally:
        second.send_signal(signal.SIGINT)
        try:
            second.wait(timeout=30)
        except subprocess.TimeoutExpired:
            second.kill()
    done = job()
    assert done.state == "succeeded", (done.error, (tmp_path / "second.log").read_text()[-3000:])
    assert done.attempts == 2 and done.lease_owner != held.lease_owner
    assert done.result is not None
    with transaction(factory) as db:
        sets = list(db.scalars(select(StimulusSet).where(StimulusSet.kind == "synthetic")))
        assert [s.id for s in sets] == [done.result["stimulus_set_id"]]
        (synthetic_set,) = sets
        # 2 targets x 2 objectives x 1 image; deterministic synthesis: the retry made the same PNGs
        assert len(synthetic_set.members) == 4 == done.result["n_images"]
        synthetic = list(
            db.scalars(select(Stimulus).where(Stimulus.kind == StimulusKind.synthetic.value))
        )
        assert {s.id for s in synthetic} == {m.stimulus_id for m in synthetic_set.members}
        assert all(s.provenance["model_id"] == model_id for s in synthetic)
        assert all(s.provenance["job_id"] == job_id for s in synthetic)
    assert len(list(blobs.root.glob("*/*.png"))) == n_images_on_disk
    engine.dispose()

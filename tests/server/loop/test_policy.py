"""The closed loop over two simulated days, through the REST API and a real in-process worker:
complete day 1 -> fit, synthesize, next session scheduled; complete day 2 -> evaluate, refit,
synthesize, day 3 scheduled. Pause, resume, edit and override."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from server.config import Settings
from server.db.models import Job, RecordingSession, StimulusSet
from server.db.session import make_engine, make_sessionmaker, transaction
from server.stimuli.blobs import BlobStore
from server.worker import WorkerConfig, run_worker
from tests.conftest import auth
from tests.server.loop.world import PlantedPopulation, World, build_world, record, schedule

FAST_FIT = {"input_size": 64, "cv_folds": 3, "readout": "ridge"}
FAST_SYNTH = {
    "steps": 4,
    "size_px": 64,
    "images_per_target": 1,
    "n_candidates": 1,
    "max_targets": 2,
    "min_ncev": -1.0,
}


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.resolved_database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


def _drain(factory: sessionmaker[Session], settings: Settings) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random backbone weights
        return run_worker(
            factory,
            BlobStore(settings.resolved_blob_dir),
            settings,
            WorkerConfig(lease_s=30, poll_s=0.01),
            exit_when_idle=True,
        )


def _record_running(
    factory: sessionmaker[Session], settings: Settings, session_id: int, seed: int
) -> None:
    """Record every block of a scheduled session (started, not completed)."""
    record(
        factory,
        BlobStore(settings.resolved_blob_dir),
        session_id,
        PlantedPopulation(5, seed=3),
        seed=seed,
        complete=False,
    )


def _jobs(factory: sessionmaker[Session]) -> list[tuple[str, str, int | None]]:
    with transaction(factory) as db:
        return [(j.kind, j.state, j.session_id) for j in db.scalars(select(Job).order_by(Job.id))]


def _world(factory: sessionmaker[Session], settings: Settings, client: TestClient) -> World:
    return build_world(factory, BlobStore(settings.resolved_blob_dir), n_sites=5, n_natural=12)


def test_two_days_of_closed_loop(
    client: TestClient, tokens: dict[str, str], settings: Settings, factory: sessionmaker[Session]
) -> None:
    op = auth(tokens["operator"])
    world = _world(factory, settings, client)
    r = client.put(
        f"/api/v1/loop/subjects/{world.subject_id}",
        json={
            "closed_loop": True,
            "config": {
                "fit": FAST_FIT,
                "synthesize": FAST_SYNTH,
                "evaluate": {"n_boot": 200},
                "reference_count": 6,
                "synthetic_repetitions": 4,
                "reference_repetitions": 4,
            },
        },
        headers=op,
    )
    assert r.status_code == 200, r.text
    assert r.json()["closed_loop"] and r.json()["cycles"] == []

    day1 = schedule(factory, world, [(world.normalizer_set_id, 4), (world.natural_set_id, 6)])
    _record_running(factory, settings, day1, seed=1)
    r = client.post(f"/api/v1/sessions/{day1}/complete", headers=op)
    assert r.status_code == 200, r.text
    assert _jobs(factory) == [("fit", "queued", day1), ("synthesize", "queued", day1)]

    assert _drain(factory, settings) == 2
    status = client.get(f"/api/v1/loop/subjects/{world.subject_id}", headers=op).json()
    (cycle,) = status["cycles"]
    assert cycle["trigger_session_id"] == day1
    assert {k: v["state"] for k, v in cycle["jobs"].items()} == {
        "fit": "succeeded",
        "synthesize": "succeeded",
    }
    day2 = cycle["next_session_id"]
    assert day2 is not None and len(cycle["targets"]) == 2
    session = client.get(f"/api/v1/sessions/{day2}", headers=op).json()
    assert session["state"] == "scheduled" and session["scheduled_date"] == "2026-11-02"
    blocks = session["blocks"]
    assert [b["stimulus_set_id"] for b in blocks][:2] == [
        world.normalizer_set_id,
        cycle["stimulus_set_id"],
    ]
    assert [b["repetitions"] for b in blocks] == [4, 4, 4]
    reference = client.get(f"/api/v1/stimulus-sets/{blocks[2]['stimulus_set_id']}", headers=op)
    assert reference.json()["kind"] == "natural"
    assert len(reference.json()["stimulus_ids"]) == 6
    assert set(reference.json()["stimulus_ids"]) <= set(world.natural_ids)
    models = client.get(f"/api/v1/models?subject_id={world.subject_id}", headers=op).json()
    assert len(models) == 1 and models[0]["session_ids"] == [day1]
    metrics = models[0]["metrics"]
    assert {"site_id", "cv_r", "ceiling", "ncev", "reliable", "unstable"} <= set(
        metrics["sites"][0]
    )
    assert len(metrics["scatter"]["pred"]) == len(metrics["scatter"]["meas"]) > 0

    # day 2: the loop's session; completing it evaluates, refits on both days, synthesizes again
    _record_running(factory, settings, day2, seed=2)
    r = client.post(f"/api/v1/sessions/{day2}/complete", headers=op)
    assert r.status_code == 200, r.text
    kinds = [(k, s) for k, s, sid in _jobs(factory) if sid == day2]
    assert kinds == [("evaluate", "queued"), ("fit", "queued"), ("synthesize", "queued")]
    assert _drain(factory, settings) == 3
    evaluations = client.get(f"/api/v1/evaluations?session_id={day2}", headers=op).json()
    assert len(evaluations) == 1
    summary = evaluations[0]["summary"]
    assert summary["n_stretch_targets"] == 2 and summary["n_onehot_targets"] == 2
    assert summary["median_stretch_ratio"] is not None and summary["overprediction"] is not None
    assert {p["site_id"] for p in evaluations[0]["per_site"]} == set(cycle["targets"])
    models = client.get(f"/api/v1/models?subject_id={world.subject_id}", headers=op).json()
    assert models[0]["session_ids"] == [day1, day2]
    status = client.get(f"/api/v1/loop/subjects/{world.subject_id}", headers=op).json()
    assert [c["trigger_session_id"] for c in status["cycles"]] == [day1, day2]
    day3 = status["cycles"][1]["next_session_id"]
    assert client.get(f"/api/v1/sessions/{day3}", headers=op).json()["scheduled_date"] == (
        "2026-11-03"
    )
    assert status["cycles"][1]["evaluation_id"] == evaluations[0]["id"]


def test_pause_resume_and_overrides(
    client: TestClient, tokens: dict[str, str], settings: Settings, factory: sessionmaker[Session]
) -> None:
    op = auth(tokens["operator"])
    world = _world(factory, settings, client)
    config: dict[str, Any] = {"fit": FAST_FIT, "synthesize": FAST_SYNTH, "paused": True}
    r = client.put(
        f"/api/v1/loop/subjects/{world.subject_id}",
        json={"closed_loop": True, "config": config},
        headers=op,
    )
    assert r.status_code == 200 and r.json()["config"]["paused"] is True
    day1 = schedule(factory, world, [(world.normalizer_set_id, 4), (world.natural_set_id, 6)])
    _record_running(factory, settings, day1, seed=1)
    assert client.post(f"/api/v1/sessions/{day1}/complete", headers=op).status_code == 200
    assert _jobs(factory) == []  # paused: nothing queued

    # resuming catches up: a cycle from the latest completed session
    r = client.put(
        f"/api/v1/loop/subjects/{world.subject_id}", json={"config": {"paused": False}}, headers=op
    )
    assert [c["trigger_session_id"] for c in r.json()["cycles"]] == [day1]
    assert [k for k, _, _ in _jobs(factory)] == ["fit", "synthesize"]

    # edit the queued synthesize job, then pause before it commits: the set is not scheduled
    synth_id = r.json()["cycles"][0]["jobs"]["synthesize"]["id"]
    r = client.patch(f"/api/v1/jobs/{synth_id}", json={"params": {"max_targets": 1}}, headers=op)
    assert r.status_code == 200 and r.json()["params"]["max_targets"] == 1
    client.put(
        f"/api/v1/loop/subjects/{world.subject_id}", json={"config": {"paused": True}}, headers=op
    )
    assert _drain(factory, settings) == 2
    status = client.get(f"/api/v1/loop/subjects/{world.subject_id}", headers=op).json()
    (cycle,) = status["cycles"]
    assert cycle["next_session_id"] is None and len(cycle["targets"]) == 1
    r = client.put(
        f"/api/v1/loop/subjects/{world.subject_id}", json={"config": {"paused": False}}, headers=op
    )
    (cycle,) = r.json()["cycles"]
    assert cycle["next_session_id"] is not None  # scheduled on resume
    with transaction(factory) as db:
        sessions = list(db.scalars(select(RecordingSession).order_by(RecordingSession.id)))
        assert [s.state for s in sessions] == ["completed", "scheduled"]

    # overrides: start a cycle from a session, schedule a session for a set
    r = client.post(
        f"/api/v1/loop/subjects/{world.subject_id}/trigger", json={"session_id": day1}, headers=op
    )
    assert r.status_code == 201 and set(r.json()) == {"fit", "synthesize"}
    r = client.post(
        f"/api/v1/loop/subjects/{world.subject_id}/schedule",
        json={"stimulus_set_id": cycle["stimulus_set_id"]},
        headers=op,
    )
    assert r.status_code == 201, r.text
    assert r.json()["blocks"][1]["stimulus_set_id"] == cycle["stimulus_set_id"]

    # bad settings are refused with a message naming them
    r = client.put(
        f"/api/v1/loop/subjects/{world.subject_id}",
        json={"config": {"synthetic_reps": 3}},
        headers=op,
    )
    assert r.status_code == 422 and "synthetic_reps" in r.json()["detail"]
    r = client.put(
        f"/api/v1/loop/subjects/{world.subject_id}",
        json={"closed_loop": False},
        headers=auth(tokens["viewer"]),
    )
    assert r.status_code == 403
    with transaction(factory) as db:
        assert db.scalar(select(StimulusSet).where(StimulusSet.kind == "synthetic")) is not None

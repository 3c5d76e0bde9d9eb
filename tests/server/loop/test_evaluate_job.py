"""The evaluate job on a real database with planted presentations: hand-computed ratio, one-hot
scores, predicted-vs-measured r and over-prediction; stored and served by the API."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.config import Settings
from server.db.models import Presentation, StimulusKind
from server.db.session import make_engine, make_sessionmaker, transaction
from server.jobs import queue
from server.loop.evaluate import EvaluateParams, evaluate_session
from server.sessions.service import get_session, transition
from server.stimuli.blobs import BlobStore
from server.stimuli.images import canonicalize
from server.stimuli.schemas import StimulusSetCreate
from server.stimuli.service import create_set, store_stimulus
from server.worker import WorkerConfig, run_one
from tests.conftest import auth
from tests.server.loop.world import build_world, schedule, smooth_image

SQRT5 = math.sqrt(5.0)


def test_evaluate_planted_session(
    client: TestClient, tokens: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    engine = make_engine(settings.resolved_database_url)
    factory = make_sessionmaker(engine)
    blobs = BlobStore(settings.resolved_blob_dir)
    world = build_world(factory, blobs, n_sites=3, n_natural=2, n_normalizer=2)
    s0, s1, s2 = world.site_ids
    rng = np.random.default_rng(5)
    # synthetic images: two stretch images of site s0, one one-hot image of site s1;
    # predictions in model units (z with the session's normalizers)
    planted = [("stretch", s0, 3.0), ("stretch", s0, 4.0), ("one_hot", s1, 2.0)]
    with transaction(factory) as db:
        synthetic = []
        for kind, target, z in planted:
            image = canonicalize(smooth_image(rng, 48))
            predicted = {str(s0): 0.0, str(s1): 0.0, str(s2): 0.0, str(target): z}
            stim, _ = store_stimulus(
                db,
                blobs,
                image,
                kind=StimulusKind.synthetic.value,
                provenance={
                    "objective_kind": kind,
                    "target_site": target,
                    "predicted": predicted,
                    "predicted_target": z,
                },
            )
            synthetic.append(stim.id)
        syn_set = create_set(
            db, StimulusSetCreate(name="syn", kind="synthetic", stimulus_ids=synthetic)
        ).id
    session_id = schedule(
        factory,
        world,
        [(world.normalizer_set_id, 2), (syn_set, 2), (world.natural_set_id, 2)],
    )
    n0, n1 = world.normalizer_ids
    a, b = world.natural_ids
    st2, st3, oh4 = synthetic
    reps = {
        n0: [[2, 2, 2], [4, 4, 4]],  # normalizer presentations 2, 4, 6, 8 at every site:
        n1: [[6, 6, 6], [8, 8, 8]],  # mean 5, std sqrt(5)
        a: [[4, 2, 1], [6, 2, 3]],  # mean [5, 2, 2]
        b: [[8, 4, 2], [8, 6, 2]],  # mean [8, 5, 2]
        st2: [[10, 1, 1], [14, 1, 1]],  # mean [12, 1, 1]
        st3: [[9, 0, 2], [11, 2, 2]],  # mean [10, 1, 2]
        oh4: [[2, 9, 0], [2, 7, 0]],  # mean [2, 8, 0]
    }
    with transaction(factory) as db:
        session = get_session(db, session_id)
        transition(db, session, "start")
        block_of = {}
        for block in session.blocks:
            for stim_id in reps:
                block_of.setdefault(stim_id, block.id)  # any block of the session will do
        for n, (stim_id, rows) in enumerate(reps.items()):
            for r, counts in enumerate(rows):
                db.add(
                    Presentation(
                        id=str(uuid.uuid4()),
                        session_id=session_id,
                        block_id=block_of[stim_id],
                        stimulus_id=stim_id,
                        trial_index=n,
                        position=r,
                        onset_source="photodiode",
                        fixation_ok=True,
                        valid=True,
                        spike_counts=np.array(counts, "<u2").tobytes(),
                    )
                )
        db.add(  # an invalid presentation with a huge count must not count
            Presentation(
                id=str(uuid.uuid4()),
                session_id=session_id,
                block_id=block_of[st3],
                stimulus_id=st3,
                trial_index=99,
                position=0,
                onset_source="photodiode",
                fixation_ok=False,
                valid=False,
                invalid_reason="fixation_break",
                spike_counts=np.array([500, 500, 500], "<u2").tobytes(),
            )
        )
        transition(db, session, "complete")

    with transaction(factory) as db:
        outcome = evaluate_session(db, session_id, EvaluateParams(n_boot=500, seed=1))
    summary = outcome["summary"]
    assert summary["valid_presentations"] == 14 and summary["sites"] == 3
    # stretch: max synthetic 12 / max natural 8
    assert summary["median_stretch_ratio"] == pytest.approx(1.5)
    assert summary["stretch_success_fraction"] == 1.0
    per_site = {p["site_id"]: p for p in outcome["per_site"]}
    assert per_site[s0]["stretch_ratio"] == pytest.approx(1.5)
    low, high = per_site[s0]["stretch_ci"]
    assert 1.25 <= low <= 1.5 <= high <= 1.75
    assert per_site[s0]["best_stretch_stimulus"] == st2
    assert per_site[s0]["best_natural_stimulus"] == b
    # one-hot at s1: z of oh4 = [-3, 3, -2] -> e^3 / (e^-3 + e^3 + e^-2); best natural b:
    # z [1, 1, 0] -> e / (2e + 1)
    assert per_site[s1]["onehot_synthetic_score"] == pytest.approx(0.990867, abs=1e-6)
    assert per_site[s1]["onehot_natural_score"] == pytest.approx(0.422319, abs=1e-6)
    assert summary["onehot_improved_fraction"] == 1.0
    # predictions back to counts with the normalizers (mean 5, std sqrt 5):
    # (3 + 4 + 2) sqrt5 + 15 = 35.125 predicted vs 12 + 10 + 8 = 30 measured
    assert summary["overprediction"] == pytest.approx((9 * SQRT5 + 15) / 30)
    # r of z [3, 4, 2] vs measured [12, 10, 8]: cov 2, var 2 and 8 -> 0.5
    assert summary["predicted_measured_r"] == pytest.approx(0.5)

    # the same through the job: stored and served
    with transaction(factory) as db:
        job_id = queue.create_job(
            db, "evaluate", {"n_boot": 500, "seed": 1}, session_id=session_id
        ).id
    ran = run_one(factory, blobs, settings, WorkerConfig(kinds=("evaluate",), lease_s=30))
    assert ran is not None and ran.id == job_id
    served = client.get(
        f"/api/v1/evaluations?session_id={session_id}", headers=auth(tokens["viewer"])
    ).json()
    assert len(served) == 1 and served[0]["job_id"] == job_id
    assert served[0]["summary"]["median_stretch_ratio"] == pytest.approx(1.5)
    assert served[0]["summary"]["overprediction"] == pytest.approx(summary["overprediction"])
    one = client.get(f"/api/v1/evaluations/{served[0]['id']}", headers=auth(tokens["viewer"]))
    assert one.status_code == 200 and one.json()["per_site"] == served[0]["per_site"]
    job = client.get(f"/api/v1/jobs/{job_id}", headers=auth(tokens["viewer"])).json()
    assert job["state"] == "succeeded" and job["result"]["evaluation_id"] == served[0]["id"]
    engine.dispose()


def test_evaluate_refuses_a_session_without_synthetic_images(settings: Settings) -> None:
    engine = make_engine(settings.resolved_database_url)
    factory = make_sessionmaker(engine)
    blobs = BlobStore(settings.resolved_blob_dir)
    world = build_world(factory, blobs, n_sites=2, n_natural=3, n_normalizer=2)
    from tests.server.loop.world import PlantedPopulation, record

    session_id = schedule(factory, world, [(world.natural_set_id, 2)])
    record(factory, blobs, session_id, PlantedPopulation(2, seed=0))
    with transaction(factory) as db:
        job_id = queue.create_job(db, "evaluate", {"session_id": session_id}).id
    run_one(factory, blobs, settings, WorkerConfig(kinds=("evaluate",), lease_s=30))
    with transaction(factory) as db:
        job = queue.get_job(db, job_id)
        assert job.state == "failed" and job.attempts == 1
        assert "showed no synthetic images" in (job.error or "")
    engine.dispose()


def test_export_job_writes_the_response_matrix(settings: Settings) -> None:
    engine = make_engine(settings.resolved_database_url)
    factory = make_sessionmaker(engine)
    blobs = BlobStore(settings.resolved_blob_dir)
    world = build_world(factory, blobs, n_sites=3, n_natural=3, n_normalizer=2)
    from tests.server.loop.world import PlantedPopulation, record

    session_id = schedule(factory, world, [(world.natural_set_id, 2)])
    n = record(factory, blobs, session_id, PlantedPopulation(3, seed=0))
    with transaction(factory) as db:
        job_id = queue.create_job(db, "export", session_id=session_id).id
        missing = queue.create_job(db, "export", {"session_id": 999}).id
    config = WorkerConfig(kinds=("export",), lease_s=30)
    run_one(factory, blobs, settings, config)
    run_one(factory, blobs, settings, config)
    with transaction(factory) as db:
        job = queue.get_job(db, job_id)
        assert job.state == "succeeded" and job.result is not None
        assert job.result["n_presentations"] == n == 6
        data = np.load(blobs.root / job.result["path"])
        assert data["counts"].shape == (6, 3) and list(data["site_ids"]) == world.site_ids
        failed = queue.get_job(db, missing)
        assert failed.state == "failed" and "session 999 does not exist" in (failed.error or "")
    engine.dispose()

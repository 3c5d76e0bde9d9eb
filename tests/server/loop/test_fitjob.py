"""The fit job's data preparation: per-session normalizer z-scoring, unstable sites, and a real
fit that leaves unstable sites out and stores its artifact and metrics."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest

from server.config import Settings
from server.db.models import NeuronModel
from server.db.session import make_engine, make_sessionmaker, transaction
from server.jobs.queue import JobError
from server.loop.fitjob import (
    FitParams,
    fit_subject,
    judge_stability,
    normalize_session,
    normalizer_reliability,
    normalizer_stability,
    prepare,
)
from server.stimuli.blobs import BlobStore
from tests.server.loop.world import PlantedPopulation, build_world, record, schedule


def test_normalize_session_by_hand() -> None:
    counts = np.array([[2.0, 10], [4, 10], [6, 30], [100, 0]])
    is_norm = np.array([True, True, True, False])
    z, how = normalize_session(counts, is_norm)
    # site 0: normalizers 2, 4, 6 -> mean 4, std sqrt(8/3); site 1: 10, 10, 30 -> 50/3, sqrt(800/9)
    assert how == "normalizer"
    assert z[3, 0] == pytest.approx((100 - 4) / np.sqrt(8 / 3))
    assert z[3, 1] == pytest.approx((0 - 50 / 3) / np.sqrt(800 / 9))
    z, how = normalize_session(counts, np.array([False, False, False, True]))
    assert how == "session"  # fewer than 2 normalizer presentations: the session's own stats
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-12)


def test_normalizer_stability_by_hand() -> None:
    day1 = np.array([[1.0, 1, 5], [2, 2, 5], [3, 3, 5]])  # (images, sites)
    day2 = np.array([[2.0, 3, 5], [4, 2, 5], [6, 1, 5]])  # site 1 reversed, site 2 flat
    r = normalizer_stability([day1, day2])
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(-1.0) and r[2] == -1.0
    assert np.isnan(normalizer_stability([day1])).all()  # one day: nothing to compare


def test_normalizer_reliability_by_hand() -> None:
    first = np.array([[1.0, 1, 4], [2, 3, 4], [3, 2, 4]])  # (images, sites); site 2 flat
    second = np.array([[1.0, 2, 4], [2, 1, 4], [3, 3, 4]])
    index = np.array([0, 1, 2, 0, 1, 2])  # each image twice: first, then second presentation
    rel = normalizer_reliability([(np.concatenate([first, second]), index)])
    # site 0: r = 1 -> 1; site 1: r = -0.5 -> 2(-0.5)/(1-0.5) = -2; flat: no reliability (0)
    assert rel[0] == pytest.approx(1.0) and rel[1] == pytest.approx(-2.0) and rel[2] == 0.0
    both = normalizer_reliability(
        [(np.concatenate([first, second]), index), (np.concatenate([first, first]), index)]
    )
    assert both[1] == pytest.approx((-2.0 + 1.0) / 2)  # mean over sessions
    two_images = (np.concatenate([first[:2], second[:2]]), np.array([0, 1, 0, 1]))
    assert np.isnan(normalizer_reliability([two_images])).all()  # < 3 images


def test_only_reliable_normalizer_profiles_are_judged_unstable() -> None:
    stability = np.array([0.9, 0.1, 0.1, np.nan])
    reliability = np.array([0.8, 0.8, 0.2, 0.9])  # site 2: too noisy to say it drifted
    kept, unstable = judge_stability(stability, reliability, threshold=0.3, min_reliability=0.5)
    assert unstable.tolist() == [False, True, False, False]
    assert kept[0] == 0.9 and kept[1] == 0.1 and np.isnan(kept[2]) and np.isnan(kept[3])


def test_prepare_and_fit_flag_an_unstable_site(settings: Settings, tmp_path: Path) -> None:
    engine = make_engine(settings.resolved_database_url)
    factory = make_sessionmaker(engine)
    blobs = BlobStore(settings.resolved_blob_dir)
    world = build_world(factory, blobs, n_sites=4, n_natural=12, n_normalizer=6)
    population = PlantedPopulation(4, seed=3, gain=1.0)
    drifted = copy.deepcopy(population)
    drifted.weights[2] = -drifted.weights[2]  # site 2 now responds to other images
    blocks = [(world.normalizer_set_id, 12), (world.natural_set_id, 4)]
    day1 = schedule(factory, world, blocks, day=0)
    record(factory, blobs, day1, population, seed=1)
    day2 = schedule(factory, world, blocks, day=1)
    record(factory, blobs, day2, drifted, seed=2, gain_drift=2.0)  # and twice the gain

    with transaction(factory) as db:
        data = prepare(db, world.subject_id, FitParams())
    assert data.session_ids == [day1, day2] and data.normalization == ["normalizer", "normalizer"]
    assert data.unstable.tolist() == [False, False, True, False], data.stability_r
    # the doubled gain is gone after z-scoring: natural-image means agree across days
    natural = np.isin(data.stimulus_index, [data.stimulus_ids.index(s) for s in world.natural_ids])
    raw = [data.counts[natural & (data.session_of == k)][:, 0].mean() for k in (0, 1)]
    z = [data.normalized[natural & (data.session_of == k)][:, 0].mean() for k in (0, 1)]
    assert raw[1] / raw[0] == pytest.approx(2.0, rel=0.15)
    assert abs(z[1] - z[0]) < 0.3

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random backbone weights
        model_id = fit_subject(
            factory, blobs, world.subject_id, FitParams(input_size=64, cv_folds=3, readout="ridge")
        )
    with transaction(factory) as db:
        model = db.get(NeuronModel, model_id)
        assert model is not None
        assert model.site_ids == [s for i, s in enumerate(world.site_ids) if i != 2]
        assert model.session_ids == [day1, day2]
        sites = {s["site_id"]: s for s in model.metrics["sites"]}
        assert sites[world.site_ids[2]]["unstable"] and not sites[world.site_ids[2]]["fitted"]
        assert all(sites[s]["ceiling"] is not None for s in model.site_ids)
        assert model.metrics["n_unstable"] == 1 and model.metrics["n_fitted"] == 3
        assert model.artifact_path == f"models/{model_id}.safetensors"
        assert (blobs.root / model.artifact_path).is_file()
        assert model.params["natural_stats"] is not None

    with transaction(factory) as db, pytest.raises(JobError, match="do not exist"):
        prepare(db, world.subject_id, FitParams(session_ids=(9999,)))
    engine.dispose()

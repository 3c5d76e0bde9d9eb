"""Synthesis that starts from each target's best natural image (``start: "image"``)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from sqlalchemy import select

from server.config import Settings
from server.db.models import Presentation
from server.db.session import make_engine, make_sessionmaker, transaction
from server.jobs.queue import JobError
from server.loop.synthjob import _start_images, best_natural_stimuli
from server.stimuli.blobs import BlobStore
from tests.server.loop.world import PlantedPopulation, build_world, record, schedule


def test_best_natural_stimuli_is_each_sites_top_mean_natural_image(settings: Settings) -> None:
    engine = make_engine(settings.resolved_database_url)
    factory = make_sessionmaker(engine)
    blobs = BlobStore(settings.resolved_blob_dir)
    world = build_world(factory, blobs, n_sites=4, n_natural=10, n_normalizer=3)
    session_id = schedule(factory, world, [(world.normalizer_set_id, 2), (world.natural_set_id, 3)])
    record(factory, blobs, session_id, PlantedPopulation(4, seed=1), seed=2)
    with transaction(factory) as db:
        best = best_natural_stimuli(db, world.subject_id)
        rows = db.execute(select(Presentation.stimulus_id, Presentation.spike_counts)).all()
    # by hand: mean count per natural image per site, then the argmax per site
    sums: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(4))
    reps: dict[str, int] = defaultdict(int)
    for stimulus_id, counts in rows:
        if stimulus_id in world.natural_ids:
            sums[stimulus_id] += np.frombuffer(counts, "<u2")
            reps[stimulus_id] += 1
    for column, site in enumerate(world.site_ids):
        top = max(sums, key=lambda s: sums[s][column] / reps[s])
        assert best[site] == top
    assert set(best.values()) <= set(world.natural_ids)  # normalizers never start a synthesis

    class ImageStart:
        start = "image"
        size_px = 16

    images = _start_images(ImageStart(), world.site_ids[:2], best, blobs)
    assert images is not None and sorted(images) == sorted(world.site_ids[:2])
    for image in images.values():
        assert (
            tuple(image.shape) == (1, 16, 16) and 0 <= float(image.min()) <= float(image.max()) <= 1
        )
    with pytest.raises(JobError, match="natural image with recorded responses"):
        _start_images(ImageStart(), [world.site_ids[0], 999_999], best, blobs)
    engine.dispose()

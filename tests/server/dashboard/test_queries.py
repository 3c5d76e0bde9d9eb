"""The dashboard's aggregates against numbers computed independently from the same rows."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.config import Settings
from server.dashboard import queries
from server.db.models import Evaluation, NeuronModel, Presentation, RecordingSession, Stimulus
from server.db.session import engine_for, make_sessionmaker
from tests.server.dashboard.seed import RASTER_META, Lab


@pytest.fixture
def db(settings: Settings, lab: Lab) -> Iterator[Session]:
    engine = engine_for(settings)
    with make_sessionmaker(engine)() as session:
        yield session
    engine.dispose()


def _recent_rows(db: Session, session_id: int) -> list[Presentation]:
    """All the session's presentations, newest first."""
    return list(
        db.scalars(
            select(Presentation)
            .where(Presentation.session_id == session_id)
            .order_by(Presentation.received_at.desc(), Presentation.id.desc())
        )
    )


def test_heatmap_uses_only_the_recent_window(db: Session, lab: Lab) -> None:
    rows = _recent_rows(db, lab.session_id)
    snap = queries.live_snapshot(db, lab.session_id, recent_n=20)
    window = [r for r in rows[:20] if r.valid]
    assert 0 < len(window) < 20, "the seeded rows mix valid and invalid presentations"
    expected = np.stack([np.frombuffer(r.spike_counts, "<u2") for r in window]).mean(axis=0)
    assert snap["heatmap"]["window"] == len(window)
    np.testing.assert_allclose(snap["heatmap"]["mean_counts"], expected, atol=1e-3)
    every_valid = [np.frombuffer(r.spike_counts, "<u2") for r in rows if r.valid]
    assert not np.allclose(expected, np.mean(every_valid, axis=0), atol=1e-3)
    assert [a["n_sites"] for a in snap["heatmap"]["arrays"]] == [len(lab.site_ids)]


def test_psth_is_the_mean_rate_of_each_recent_image(db: Session, lab: Lab) -> None:
    snap = queries.live_snapshot(db, lab.session_id)
    assert snap["psth"]
    item = snap["psth"][0]
    rasters = [
        np.frombuffer(r.raster, "<u2").reshape(-1, RASTER_META["bins"]).mean(axis=0)
        for r in _recent_rows(db, lab.session_id)[: queries.RECENT_N]
        if r.valid and r.raster is not None and r.stimulus_id == item["stimulus_id"]
    ]
    expected_hz = np.mean(rasters, axis=0) / (RASTER_META["bin_ms"] / 1000)
    assert item["n"] == len(rasters)
    np.testing.assert_allclose(item["rate_hz"], expected_hz, atol=0.01)
    assert item["start_ms"] == RASTER_META["start_ms"]


def test_a_raster_that_does_not_fit_its_meta_is_skipped() -> None:
    raster = np.arange(30, dtype="<u2").tobytes()
    assert queries._psth_from(raster, {"n_bins": 7, "bin_ms": 10}) is None
    assert queries._psth_from(raster, {"n_bins": 10, "bin_ms": 0}) is None
    start, bin_ms, mean = queries._psth_from(raster, {"n_bins": 10, "bin_ms": 5, "start_ms": -50})  # type: ignore[misc]
    assert (start, bin_ms) == (-50, 5)
    np.testing.assert_allclose(mean, np.arange(30).reshape(3, 10).mean(axis=0))


def test_decode_counts_pads_short_vectors() -> None:
    blobs = [np.array([1, 2, 3], "<u2").tobytes(), np.array([4, 5], "<u2").tobytes()]
    np.testing.assert_array_equal(queries.decode_counts(blobs, 3), [[1, 2, 3], [4, 5, 0]])


def test_model_sites_reads_the_list_and_the_column_forms(db: Session, lab: Lab) -> None:
    model = db.get(NeuronModel, lab.model_id)
    assert model is not None
    listed = queries.model_sites(model.metrics)
    assert [s["site_id"] for s in listed] == lab.site_ids
    columns = {
        "site_ids": [s["site_id"] for s in listed],
        "cv_r": [s["cv_r"] for s in listed],
        "ceiling": [s["ceiling"] for s in listed],
        "ncev": [None, *[s["ncev"] for s in listed[1:]]],
        "reliable": [s["reliable"] for s in listed],
    }
    from_columns = queries.model_sites(columns)
    assert [s["cv_r"] for s in from_columns] == [s["cv_r"] for s in listed]
    assert from_columns[0]["ncev"] is None
    assert queries.model_sites({"sites": 288}) == []
    assert queries.rf_mask([[0, 1], [1, 0]]) is not None
    assert queries.rf_mask([[0, 1], [1]]) is None
    assert queries.rf_mask([[float("nan")]]) is None


def test_gallery_measured_mean_is_the_target_sites_mean(db: Session, lab: Lab) -> None:
    groups = queries.gallery(db)
    images = {img["id"]: (g["site_id"], img) for g in groups for img in g["images"]}
    assert set(images) == set(lab.synthetic_ids)
    stim_id = lab.synthetic_ids[0]
    target, img = images[stim_id]
    column = lab.site_ids.index(target)
    values = [
        np.frombuffer(r.spike_counts, "<u2")[column]
        for r in db.scalars(
            select(Presentation).where(
                Presentation.stimulus_id == stim_id, Presentation.valid.is_(True)
            )
        )
    ]
    assert img["n"] == len(values) > 0
    assert img["measured"] == pytest.approx(float(np.mean(values)))
    stimulus = db.get(Stimulus, stim_id)
    assert stimulus is not None
    assert img["predicted"] == stimulus.provenance["predicted"][str(target)]
    assert queries.gallery(db, model_id=lab.model_id + 1000) == []


def test_loop_overview_reads_both_summary_spellings(db: Session, lab: Lab) -> None:
    overview = queries.loop_overview(db, lab.subject_id)
    assert [d["session_id"] for d in overview["days"]] == lab.evaluation_session_ids
    ev = db.scalar(select(Evaluation).where(Evaluation.session_id == lab.session_id))
    assert ev is not None
    last = overview["days"][-1]
    assert last["stretch_ratio_median"] == pytest.approx(ev.summary["median_stretch_ratio"])
    assert queries._summary_value({"stretch_ratio_median": 1.5}, "stretch_ratio_median") == 1.5
    assert queries._summary_value({"overprediction": float("nan")}, "overprediction") is None
    assert len(overview["sites"]) == len({s["site_id"] for s in ev.per_site})


def test_calendar_places_sessions_on_their_day(db: Session, lab: Lab) -> None:
    session = db.get(RecordingSession, lab.session_id)
    assert session is not None
    day = session.scheduled_date
    weeks = queries.month_calendar(db, day.year, day.month)
    cells = {c.day: c for week in weeks for c in week}
    assert lab.session_id in [s["id"] for s in cells[day].sessions]
    assert all(len(week) == 7 for week in weeks)

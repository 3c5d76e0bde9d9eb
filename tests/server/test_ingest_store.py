"""RecordStore: validation against the database and idempotent batch commits."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.db.models import Presentation
from server.db.session import make_engine, make_sessionmaker
from server.ingest import IngestRecord, RecordStore
from tests.rig.ingest_fixtures import World, build_world


def make_record(world: World, i: int, **changes: object) -> IngestRecord:
    counts = (np.arange(world.n_sites, dtype="<u2") + i) % 50
    rec = IngestRecord(
        presentation_id=str(uuid.UUID(int=i + 1)),
        session_id=world.session_id,
        block_id=world.block_id,
        stimulus_id=world.stimulus_ids[i % len(world.stimulus_ids)],
        trial_index=i // 5,
        position=i % 5,
        onset_sample=30_000 + 9_000 * i,
        onset_source="photodiode",
        fixation_ok=True,
        dropped_frames=0,
        valid=True,
        invalid_reason=None,
        window_start_ms=70.0,
        window_end_ms=170.0,
        n_sites=world.n_sites,
        spike_counts=counts.astype("<u2").tobytes(),
    )
    return replace(rec, **changes)  # type: ignore[arg-type]


def test_store_validates_and_is_idempotent(database_url: str) -> None:
    world = build_world(database_url)
    engine = make_engine(database_url)
    factory = make_sessionmaker(engine)
    store = RecordStore(factory)
    good = [make_record(world, i) for i in range(50)]
    bad = {
        "rejected:unknown_session": make_record(world, 100, session_id=999_999),
        "rejected:session_not_running": make_record(
            world, 101, session_id=world.scheduled_session_id, block_id=world.other_block_id
        ),
        "rejected:unknown_block": make_record(world, 102, block_id=999_999),
        "rejected:block_not_in_session": make_record(world, 103, block_id=world.other_block_id),
        "rejected:unknown_stimulus": make_record(world, 104, stimulus_id="f" * 64),
        "rejected:stimulus_not_in_block": make_record(
            world, 105, stimulus_id=world.outsider_stimulus_id
        ),
        "rejected:wrong_site_count": make_record(
            world, 106, n_sites=world.n_sites - 1, spike_counts=b"\0\0" * (world.n_sites - 1)
        ),
        "rejected:wrong_rig": make_record(world, 107),
        "rejected:bad_field": make_record(world, 108, trial_index=2**40),
    }
    batch: list[tuple[IngestRecord, int | None]] = [(r, world.rig_id) for r in good]
    for status, rec in bad.items():
        batch.append((rec, world.rig_id + 1000 if status.endswith("wrong_rig") else world.rig_id))
    batch.append((good[0], world.rig_id))  # the same id twice in one batch
    statuses = store.commit(batch)
    assert statuses[:50] == ["stored"] * 50
    assert statuses[50:-1] == list(bad)
    assert statuses[-1] == "duplicate"
    # a re-send of everything: the stored ones are duplicates, the bad ones stay rejected
    again = store.commit(batch)
    assert again[:50] == ["duplicate"] * 50
    assert again[50:-1] == list(bad)
    with factory() as db:
        assert db.scalar(select(func.count()).select_from(Presentation)) == 50
        row = db.get(Presentation, good[7].presentation_id)
        assert row is not None
        assert row.rig_id == world.rig_id
        assert np.array_equal(
            np.frombuffer(row.spike_counts, "<u2"), np.frombuffer(good[7].spike_counts, "<u2")
        )
        assert row.trial_index == good[7].trial_index and row.onset_sample == good[7].onset_sample
    engine.dispose()


def test_concurrent_writer_race_settles_as_duplicate(database_url: str) -> None:
    """Another ingest stored a record between validation and insert: the batch falls back."""
    world = build_world(database_url)
    engine = make_engine(database_url)
    factory = make_sessionmaker(engine)
    recs = [make_record(world, i) for i in range(5)]
    RecordStore(factory).commit([(recs[2], None)])
    store = RecordStore(factory)
    original = store._validate

    def validate_then_race(
        db: Session, batch: Sequence[tuple[IngestRecord, int | None]], statuses: list[str | None]
    ) -> None:
        original(db, batch, statuses)
        statuses[2] = None  # as if validation had run before the other writer committed

    store._validate = validate_then_race  # type: ignore[method-assign]
    assert store.commit([(r, None) for r in recs]) == [
        "stored",
        "stored",
        "duplicate",
        "stored",
        "stored",
    ]
    with factory() as db:
        assert db.scalar(select(func.count()).select_from(Presentation)) == 5
    engine.dispose()

"""A small but complete recording set-up in a real database, for ingest and daemon tests."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np

from rig import protocol
from server.db.models import (
    Array,
    Block,
    BlockState,
    RecordingSession,
    Rig,
    SessionState,
    Site,
    Stimulus,
    StimulusSet,
    StimulusSetMember,
    Subject,
)
from server.db.session import make_engine, make_sessionmaker, transaction


@dataclass(frozen=True)
class World:
    database_url: str
    rig_name: str
    rig_id: int
    session_id: int  # running, on rig_name
    block_id: int  # block 0 of session_id
    other_block_id: int  # a block of another (scheduled) session
    scheduled_session_id: int  # not running
    stimulus_ids: list[str]  # members of block_id's set
    outsider_stimulus_id: str  # a stimulus that exists but is not in block_id's set
    n_sites: int


def stimulus_id(i: int) -> str:
    return hashlib.sha256(f"stimulus-{i}".encode()).hexdigest()


def build_world(
    database_url: str,
    *,
    channels_per_array: tuple[int, ...] = (96, 192),
    n_stimuli: int = 20,
    rig_name: str = "rig-1",
    rig_public_key: str | None = None,
) -> World:
    engine = make_engine(database_url)
    try:
        with transaction(make_sessionmaker(engine)) as db:
            subject = Subject(name="monkey-1")
            db.add(subject)
            rig = Rig(name=rig_name, curve_public_key=rig_public_key)
            db.add(rig)
            db.flush()
            for a, n in enumerate(channels_per_array):
                array = Array(subject_id=subject.id, name=f"array-{a}", n_channels=n)
                array.sites = [Site(channel=c, label=f"{a}-{c}") for c in range(n)]
                db.add(array)
            stimuli = [stimulus_id(i) for i in range(n_stimuli + 1)]
            for sid in stimuli:
                db.add(Stimulus(id=sid, width_px=64, height_px=64, mode="L", n_bytes=100))
            sset = StimulusSet(name="set-1")
            sset.members = [
                StimulusSetMember(position=i, stimulus_id=sid)
                for i, sid in enumerate(stimuli[:n_stimuli])
            ]
            db.add(sset)
            db.flush()
            running = RecordingSession(
                subject_id=subject.id,
                rig_id=rig.id,
                scheduled_date=date(2026, 1, 1),
                state=SessionState.running.value,
            )
            running.blocks = [
                Block(index=0, stimulus_set_id=sset.id, repetitions=100, state=BlockState.running)
            ]
            scheduled = RecordingSession(
                subject_id=subject.id,
                rig_id=rig.id,
                scheduled_date=date(2026, 1, 2),
                state=SessionState.scheduled.value,
            )
            scheduled.blocks = [
                Block(index=0, stimulus_set_id=sset.id, repetitions=1, state=BlockState.pending)
            ]
            db.add_all([running, scheduled])
            db.flush()
            return World(
                database_url=database_url,
                rig_name=rig_name,
                rig_id=rig.id,
                session_id=running.id,
                block_id=running.blocks[0].id,
                other_block_id=scheduled.blocks[0].id,
                scheduled_session_id=scheduled.id,
                stimulus_ids=stimuli[:n_stimuli],
                outsider_stimulus_id=stimuli[n_stimuli],
                n_sites=sum(channels_per_array),
            )
    finally:
        engine.dispose()


def presentation_id(i: int) -> str:
    return str(uuid.UUID(int=i + 1))


def make_message(world: World, i: int, **changes: Any) -> protocol.PresentationRecord:
    """Presentation ``i`` of the running session; its counts are a known function of i."""
    fields: dict[str, Any] = {
        "rig": world.rig_name,
        "stream": "pres",
        "seq": i,
        "presentation_id": presentation_id(i),
        "session_id": world.session_id,
        "block_id": world.block_id,
        "stimulus_id": world.stimulus_ids[i % len(world.stimulus_ids)],
        "trial_index": i // 5,
        "position": i % 5,
        "onset_sample": 30_000 + 9_000 * i,
        "onset_source": "photodiode",
        "fixation_ok": True,
        "dropped_frames": 0,
        "valid": True,
        "invalid_reason": None,
        "window_start_ms": 70.0,
        "window_end_ms": 170.0,
        "spike_counts": expected_counts(world.n_sites, i),
    }
    fields.update(changes)
    return protocol.PresentationRecord(**fields)


def expected_counts(n_sites: int, i: int) -> np.ndarray:
    return ((np.arange(n_sites) * 7 + i) % 41).astype("<u2")  # (n_sites,)

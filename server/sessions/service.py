"""Scheduling, the session state machine, next-block and response matrices.

Functions flush, never commit; the request (or job) owns the transaction.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.catalog.service import get_rig_by_name, get_subject, site_ids_for_subject
from server.db.base import utcnow
from server.db.models import (
    Block,
    BlockState,
    Presentation,
    RecordingSession,
    Rig,
    SessionState,
    StimulusSet,
)
from server.errors import Conflict, Invalid, NotFound
from server.sessions.schemas import (
    BlockOut,
    BlockProgress,
    NextBlockItem,
    NextBlockOut,
    SessionCreate,
    SessionOut,
)

TRANSITIONS: dict[str, dict[str, str]] = {
    "start": {SessionState.scheduled: SessionState.running},
    "complete": {SessionState.running: SessionState.completed},
    "abort": {
        SessionState.scheduled: SessionState.aborted,
        SessionState.running: SessionState.aborted,
    },
}


def schedule_session(db: Session, data: SessionCreate) -> RecordingSession:
    get_subject(db, data.subject_id)
    rig = get_rig_by_name(db, data.rig)
    for i, block in enumerate(data.blocks):
        if db.get(StimulusSet, block.stimulus_set_id) is None:
            raise Invalid(f"block {i}: stimulus set {block.stimulus_set_id} does not exist")
    protocol = data.protocol.model_dump()
    if protocol["response_window_end_ms"] <= protocol["response_window_start_ms"]:
        raise Invalid("response_window_end_ms must be greater than response_window_start_ms")
    session = RecordingSession(
        subject_id=data.subject_id,
        rig_id=rig.id,
        scheduled_date=data.scheduled_date,
        protocol=protocol,
        notes=data.notes,
        state=SessionState.scheduled.value,
    )
    seed_base = random.SystemRandom().randrange(2**31)
    session.blocks = [
        Block(
            index=i,
            stimulus_set_id=b.stimulus_set_id,
            repetitions=b.repetitions,
            rsvp=b.rsvp.model_dump(exclude_none=True),
            state=BlockState.pending.value,
            seed=b.seed if b.seed is not None else seed_base + i,
            shown_counts={},
        )
        for i, b in enumerate(data.blocks)
    ]
    db.add(session)
    db.flush()
    return session


def get_session(db: Session, session_id: int) -> RecordingSession:
    session = db.get(RecordingSession, session_id)
    if session is None:
        raise NotFound(f"session {session_id} does not exist")
    return session


def session_out(db: Session, session: RecordingSession) -> SessionOut:
    rig = db.get(Rig, session.rig_id)
    return SessionOut(
        id=session.id,
        subject_id=session.subject_id,
        rig=rig.name if rig else "",
        scheduled_date=session.scheduled_date,
        state=session.state,
        state_reason=session.state_reason,
        protocol=session.protocol,
        notes=session.notes,
        created_at=session.created_at,
        started_at=session.started_at,
        ended_at=session.ended_at,
        blocks=[BlockOut.model_validate(b) for b in session.blocks],
    )


@dataclass(frozen=True)
class SessionFilter:
    subject_id: int | None = None
    rig: str | None = None
    state: str | None = None
    date_from: date | None = None
    date_to: date | None = None


def list_sessions(
    db: Session, filt: SessionFilter, limit: int, offset: int
) -> tuple[list[RecordingSession], int]:
    query = select(RecordingSession)
    if filt.subject_id is not None:
        query = query.where(RecordingSession.subject_id == filt.subject_id)
    if filt.rig is not None:
        query = query.join(Rig, Rig.id == RecordingSession.rig_id).where(Rig.name == filt.rig)
    if filt.state is not None:
        query = query.where(RecordingSession.state == filt.state)
    if filt.date_from is not None:
        query = query.where(RecordingSession.scheduled_date >= filt.date_from)
    if filt.date_to is not None:
        query = query.where(RecordingSession.scheduled_date <= filt.date_to)
    total = db.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = db.scalars(
        query.order_by(RecordingSession.scheduled_date.desc(), RecordingSession.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(rows), total


def transition(
    db: Session, session: RecordingSession, action: str, reason: str = ""
) -> RecordingSession:
    allowed = TRANSITIONS[action]
    if session.state not in allowed:
        sources = " or ".join(sorted(allowed))
        raise Conflict(
            f"cannot {action} session {session.id}: it is {session.state}, "
            f"and only a {sources} session can {action}"
        )
    if action == "start":
        running = db.scalar(
            select(RecordingSession.id).where(
                RecordingSession.rig_id == session.rig_id,
                RecordingSession.state == SessionState.running.value,
                RecordingSession.id != session.id,
            )
        )
        if running is not None:
            raise Conflict(
                f"rig already runs session {running}; complete or abort it before starting {session.id}"
            )
        session.started_at = utcnow()
    else:
        session.ended_at = utcnow()
    session.state = allowed[session.state]
    session.state_reason = reason
    db.flush()
    if session.state == SessionState.completed.value:
        # The closed-loop policy queues the next steps, whoever completed the session
        # (REST API, dashboard, demo). It never fails the transition.
        from server.loop.policy import on_session_completed

        on_session_completed(db, session)
    return session


def valid_counts_by_stimulus(db: Session, block_id: int) -> Counter[str]:
    rows = db.execute(
        select(Presentation.stimulus_id, func.count())
        .where(Presentation.block_id == block_id, Presentation.valid.is_(True))
        .group_by(Presentation.stimulus_id)
    )
    return Counter({sid: int(n) for sid, n in rows})


def remaining_for_block(db: Session, block: Block) -> dict[str, int]:
    """Valid repetitions each image of the block still needs (in set order)."""
    stimulus_set = db.get(StimulusSet, block.stimulus_set_id)
    assert stimulus_set is not None, f"block {block.id} names a missing stimulus set"
    ingested = valid_counts_by_stimulus(db, block.id)
    needed: Counter[str] = Counter()
    for member in stimulus_set.members:
        needed[member.stimulus_id] += block.repetitions
    remaining: dict[str, int] = {}
    for sid, want in needed.items():
        shown = max(ingested.get(sid, 0), int(block.shown_counts.get(sid, 0)))
        remaining[sid] = max(0, want - shown)
    return remaining


def running_session_for_rig(db: Session, rig_id: int) -> RecordingSession | None:
    return db.scalar(
        select(RecordingSession).where(
            RecordingSession.rig_id == rig_id, RecordingSession.state == SessionState.running.value
        )
    )


def next_block(db: Session, rig: Rig, api_prefix: str = "/api/v1") -> NextBlockOut | None:
    """The block the rig's presenter should show next, or None when nothing is due."""
    session = running_session_for_rig(db, rig.id)
    if session is None:
        return None
    for block in session.blocks:
        if block.state == BlockState.completed.value:
            continue
        remaining = remaining_for_block(db, block)
        if not any(remaining.values()):
            block.state = BlockState.completed.value
            db.flush()
            continue
        block.state = BlockState.running.value
        db.flush()
        rng = random.Random(block.seed * 1_000_003 + sum(block.shown_counts.values()))
        items = [
            NextBlockItem(
                stimulus_id=sid, image_url=f"{api_prefix}/stimuli/{sid}/image", remaining=n
            )
            for sid, n in remaining.items()
            if n > 0
        ]
        rng.shuffle(items)
        sequence = [item.stimulus_id for item in items for _ in range(item.remaining)]
        rng.shuffle(sequence)
        rsvp = {
            key: session.protocol.get(key)
            for key in ("on_ms", "off_ms", "images_per_trial", "fixation_ms")
        }
        rsvp.update(block.rsvp)
        return NextBlockOut(
            session_id=session.id,
            block_id=block.id,
            block_index=block.index,
            seed=block.seed,
            rsvp=rsvp,
            protocol=session.protocol,
            items=items,
            sequence=sequence,
        )
    return None


def get_block(db: Session, block_id: int) -> Block:
    block = db.get(Block, block_id)
    if block is None:
        raise NotFound(f"block {block_id} does not exist")
    return block


def record_progress(db: Session, block: Block, progress: BlockProgress) -> Block:
    session = block.session
    if session.state != SessionState.running.value:
        raise Conflict(
            f"session {session.id} is {session.state}; progress is only taken while it runs"
        )
    stimulus_set = db.get(StimulusSet, block.stimulus_set_id)
    members = {m.stimulus_id for m in stimulus_set.members} if stimulus_set else set()
    unknown = set(progress.shown_counts) - members
    if unknown:
        raise Invalid(
            f"{len(unknown)} stimulus ids are not in block {block.id}'s set, e.g. {sorted(unknown)[0]}"
        )
    if any(n < 0 for n in progress.shown_counts.values()):
        raise Invalid("shown counts must be ≥ 0")
    merged = dict(block.shown_counts)
    for sid, n in progress.shown_counts.items():
        merged[sid] = max(int(merged.get(sid, 0)), int(n))
    block.shown_counts = merged
    if block.state != BlockState.completed.value:
        block.state = progress.state
    if progress.state == "completed" and any(remaining_for_block(db, block).values()):
        block.state = BlockState.running.value
    db.flush()
    return block


def site_ids_for_session(db: Session, session_id: int) -> list[int]:
    """Site order of a session's response vectors: its subject's arrays by id, sites by channel."""
    return site_ids_for_subject(db, get_session(db, session_id).subject_id)


@dataclass(frozen=True)
class ResponseMatrix:
    presentation_ids: list[str]
    stimulus_ids: list[str]
    block_ids: list[int]
    site_ids: list[int]
    counts: np.ndarray  # (presentations, sites) uint16


def response_matrix(
    db: Session, session_ids: Sequence[int], valid_only: bool = True
) -> ResponseMatrix:
    """All presentations of the sessions as one (presentations × sites) matrix."""
    sessions = [get_session(db, sid) for sid in session_ids]
    site_ids = site_ids_for_subject(db, sessions[0].subject_id) if sessions else []
    query = select(
        Presentation.id, Presentation.stimulus_id, Presentation.block_id, Presentation.spike_counts
    ).where(Presentation.session_id.in_(list(session_ids)))
    if valid_only:
        query = query.where(Presentation.valid.is_(True))
    rows = db.execute(
        query.order_by(
            Presentation.session_id,
            Presentation.block_id,
            Presentation.trial_index,
            Presentation.position,
        )
    ).all()
    n_sites = len(site_ids)
    counts = np.zeros((len(rows), n_sites), dtype=np.uint16)
    for i, row in enumerate(rows):
        vec = np.frombuffer(row[3], dtype="<u2")
        counts[i, : min(n_sites, vec.size)] = vec[:n_sites]
    return ResponseMatrix(
        presentation_ids=[r[0] for r in rows],
        stimulus_ids=[r[1] for r in rows],
        block_ids=[int(r[2]) for r in rows],
        site_ids=site_ids,
        counts=counts,
    )

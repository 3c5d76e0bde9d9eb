from __future__ import annotations

import csv
import io
from datetime import date
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Path, Query, Response
from sqlalchemy import select

from server.auth.tokens import require_rig_access
from server.catalog.service import get_rig_by_name
from server.db.models import Presentation, SessionState
from server.deps import IdPath, OperatorDep, ReaderDep, RigOrOperatorDep, SessionDep
from server.schemas import Page
from server.sessions import service
from server.sessions.schemas import (
    BlockOut,
    BlockProgress,
    NextBlockOut,
    PresentationOut,
    SessionCreate,
    SessionOut,
    TransitionBody,
)

router = APIRouter(prefix="/api/v1", tags=["sessions"])
MAX_ID = 2**31 - 1
OptId = Annotated[int | None, Query(ge=1, le=MAX_ID)]


@router.post("/sessions", status_code=201)
def schedule_session(data: SessionCreate, db: SessionDep, _: OperatorDep) -> SessionOut:
    return service.session_out(db, service.schedule_session(db, data))


@router.get("/sessions")
def list_sessions(
    db: SessionDep,
    _: ReaderDep,
    subject_id: OptId = None,
    rig: Annotated[str | None, Query(max_length=100)] = None,
    state: SessionState | None = None,
    date_from: date | None = None,
    date_to: date | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> Page[SessionOut]:
    filt = service.SessionFilter(
        subject_id=subject_id,
        rig=rig,
        state=state.value if state else None,
        date_from=date_from,
        date_to=date_to,
    )
    rows, total = service.list_sessions(db, filt, limit, offset)
    return Page[SessionOut](
        items=[service.session_out(db, s) for s in rows], total=total, limit=limit, offset=offset
    )


@router.get("/sessions/{session_id}")
def get_session(session_id: IdPath, db: SessionDep, _: ReaderDep) -> SessionOut:
    return service.session_out(db, service.get_session(db, session_id))


@router.post("/sessions/{session_id}/{action}")
def transition_session(
    session_id: IdPath,
    action: Literal["start", "complete", "abort"],
    db: SessionDep,
    principal: RigOrOperatorDep,
    body: TransitionBody | None = None,
) -> SessionOut:
    session = service.get_session(db, session_id)
    require_rig_access(principal, session.rig_id)
    service.transition(db, session, action, body.reason if body else "")
    return service.session_out(db, session)


@router.get(
    "/rigs/{name}/next-block",
    response_model=NextBlockOut,
    responses={204: {"description": "nothing is due on this rig"}},
)
def next_block(
    name: Annotated[str, Path(min_length=1, max_length=100)],
    db: SessionDep,
    principal: RigOrOperatorDep,
) -> NextBlockOut | Response:
    rig = get_rig_by_name(db, name)
    require_rig_access(principal, rig.id)
    block = service.next_block(db, rig)
    if block is None:
        return Response(status_code=204)
    return block


@router.get("/blocks/{block_id}")
def get_block(block_id: IdPath, db: SessionDep, _: ReaderDep) -> BlockOut:
    return BlockOut.model_validate(service.get_block(db, block_id))


@router.post("/blocks/{block_id}/progress")
def block_progress(
    block_id: IdPath, data: BlockProgress, db: SessionDep, principal: RigOrOperatorDep
) -> BlockOut:
    block = service.get_block(db, block_id)
    require_rig_access(principal, block.session.rig_id)
    return BlockOut.model_validate(service.record_progress(db, block, data))


@router.get("/presentations")
def list_presentations(
    db: SessionDep,
    _: ReaderDep,
    session_id: OptId = None,
    block_id: OptId = None,
    stimulus_id: Annotated[str | None, Query(pattern=r"^[0-9a-f]{64}$")] = None,
    valid: bool | None = None,
    include_counts: bool = False,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> list[PresentationOut]:
    query = select(Presentation)
    if session_id is not None:
        query = query.where(Presentation.session_id == session_id)
    if block_id is not None:
        query = query.where(Presentation.block_id == block_id)
    if stimulus_id is not None:
        query = query.where(Presentation.stimulus_id == stimulus_id)
    if valid is not None:
        query = query.where(Presentation.valid.is_(valid))
    query = query.order_by(Presentation.received_at, Presentation.id).limit(limit).offset(offset)
    out = []
    for row in db.scalars(query):
        fields = {name: getattr(row, name) for name in PresentationOut.model_fields}
        fields["spike_counts"] = (
            np.frombuffer(row.spike_counts, dtype="<u2").tolist() if include_counts else None
        )
        out.append(PresentationOut(**fields))
    return out


@router.get("/sessions/{session_id}/responses", response_class=Response)
def session_responses(
    session_id: IdPath,
    db: SessionDep,
    _: ReaderDep,
    format: Literal["npz", "csv"] = "npz",
    valid_only: bool = True,
) -> Response:
    """The (presentations × sites) spike-count matrix with stimulus ids, as .npz or CSV."""
    matrix = service.response_matrix(db, [session_id], valid_only=valid_only)
    if format == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(
            ["presentation_id", "stimulus_id", "block_id", *[f"site_{s}" for s in matrix.site_ids]]
        )
        for i, pid in enumerate(matrix.presentation_ids):
            writer.writerow(
                [pid, matrix.stimulus_ids[i], matrix.block_ids[i], *matrix.counts[i].tolist()]
            )
        return Response(
            buf.getvalue(),
            media_type="text/csv",
            headers={
                "Content-Disposition": f'attachment; filename="session-{session_id}-responses.csv"'
            },
        )
    out = io.BytesIO()
    np.savez_compressed(
        out,
        counts=matrix.counts,
        stimulus_ids=np.array(matrix.stimulus_ids, dtype="U64"),
        presentation_ids=np.array(matrix.presentation_ids, dtype="U36"),
        block_ids=np.array(matrix.block_ids, dtype=np.int64),
        site_ids=np.array(matrix.site_ids, dtype=np.int64),
    )
    return Response(
        out.getvalue(),
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="session-{session_id}-responses.npz"'
        },
    )

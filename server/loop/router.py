"""REST API of the closed loop (``/api/v1/loop``), evaluations and fitted models."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from server.db.models import Evaluation, NeuronModel, RecordingSession
from server.deps import IdPath, OperatorDep, ReaderDep, SessionDep
from server.errors import NotFound
from server.loop import policy
from server.loop.schemas import (
    EvaluationOut,
    LoopStatusOut,
    LoopUpdate,
    ModelOut,
    ScheduleBody,
    TriggerBody,
)
from server.sessions.schemas import SessionOut

router = APIRouter(prefix="/api/v1", tags=["closed loop"])
MAX_ID = 2**31 - 1
OptId = Annotated[int | None, Query(ge=1, le=MAX_ID)]


@router.get("/loop/subjects/{subject_id}")
def get_loop(subject_id: IdPath, db: SessionDep, _: ReaderDep) -> LoopStatusOut:
    return LoopStatusOut.model_validate(policy.loop_status(db, subject_id))


@router.put("/loop/subjects/{subject_id}")
def update_loop(
    subject_id: IdPath, data: LoopUpdate, db: SessionDep, _: OperatorDep
) -> LoopStatusOut:
    status = policy.update_loop(db, subject_id, closed_loop=data.closed_loop, config=data.config)
    return LoopStatusOut.model_validate(status)


@router.post("/loop/subjects/{subject_id}/trigger", status_code=201)
def trigger_cycle(
    subject_id: IdPath, data: TriggerBody, db: SessionDep, _: OperatorDep
) -> dict[str, int]:
    """Start a cycle (evaluate?, fit, synthesize) from a completed session now."""
    return policy.trigger_cycle(db, subject_id, data.session_id)


@router.post("/loop/subjects/{subject_id}/schedule", status_code=201)
def schedule_next(
    subject_id: IdPath, data: ScheduleBody, db: SessionDep, _: OperatorDep
) -> SessionOut:
    """Schedule the next session for a synthetic set now (normalizers + set + references)."""
    from server.sessions.service import session_out

    session = policy.schedule_for_set(db, subject_id, data.stimulus_set_id, data.trigger_session_id)
    return session_out(db, session)


@router.get("/evaluations")
def list_evaluations(
    db: SessionDep,
    _: ReaderDep,
    session_id: OptId = None,
    subject_id: OptId = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[EvaluationOut]:
    query = select(Evaluation)
    if session_id is not None:
        query = query.where(Evaluation.session_id == session_id)
    if subject_id is not None:
        query = query.join(RecordingSession, RecordingSession.id == Evaluation.session_id).where(
            RecordingSession.subject_id == subject_id
        )
    rows = db.scalars(query.order_by(Evaluation.id.desc()).limit(limit))
    return [EvaluationOut.model_validate(r) for r in rows]


@router.get("/evaluations/{evaluation_id}")
def get_evaluation(evaluation_id: IdPath, db: SessionDep, _: ReaderDep) -> EvaluationOut:
    row = db.get(Evaluation, evaluation_id)
    if row is None:
        raise NotFound(f"evaluation {evaluation_id} does not exist")
    return EvaluationOut.model_validate(row)


@router.get("/models")
def list_models(
    db: SessionDep,
    _: ReaderDep,
    subject_id: OptId = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[ModelOut]:
    query = select(NeuronModel)
    if subject_id is not None:
        query = query.where(NeuronModel.subject_id == subject_id)
    rows = db.scalars(query.order_by(NeuronModel.id.desc()).limit(limit))
    return [ModelOut.model_validate(r) for r in rows]


@router.get("/models/{model_id}")
def get_model(model_id: IdPath, db: SessionDep, _: ReaderDep) -> ModelOut:
    row = db.get(NeuronModel, model_id)
    if row is None:
        raise NotFound(f"model {model_id} does not exist")
    return ModelOut.model_validate(row)

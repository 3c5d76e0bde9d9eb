from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from server.schemas import ORMModel

MAX_ID = 2**31 - 1


class LoopUpdate(BaseModel):
    closed_loop: bool | None = Field(default=None, description="switch closed-loop mode")
    config: dict[str, Any] | None = Field(
        default=None,
        description="LoopConfig keys to replace (paused, rig, days_between, fit, synthesize, "
        "evaluate, normalizer_set_id, reference_set_id, reference_count, ...); null removes",
    )


class LoopJobOut(BaseModel):
    id: int
    state: str
    progress: float
    progress_message: str
    error: str | None


class LoopCycleOut(BaseModel):
    trigger_session_id: int
    jobs: dict[str, LoopJobOut]
    stimulus_set_id: int | None = None
    next_session_id: int | None = None
    targets: list[int] | None = None
    evaluation_id: int | None = None


class LoopStatusOut(BaseModel):
    subject_id: int
    closed_loop: bool
    config: dict[str, Any]
    cycles: list[LoopCycleOut]


class TriggerBody(BaseModel):
    session_id: int = Field(ge=1, le=MAX_ID, description="a completed session of the subject")


class ScheduleBody(BaseModel):
    stimulus_set_id: int = Field(ge=1, le=MAX_ID)
    trigger_session_id: int | None = Field(
        default=None, ge=1, le=MAX_ID, description="default: the latest completed session"
    )


class EvaluationOut(ORMModel):
    id: int
    session_id: int
    model_id: int | None
    job_id: int | None
    summary: dict[str, Any]
    per_site: list[dict[str, Any]]
    created_at: datetime


class ModelOut(ORMModel):
    id: int
    subject_id: int
    backbone_id: str
    weights_sha256: str
    layer: str
    readout_kind: str
    session_ids: list[int]
    site_ids: list[int]
    metrics: dict[str, Any]
    params: dict[str, Any]
    artifact_path: str
    job_id: int | None
    created_at: datetime

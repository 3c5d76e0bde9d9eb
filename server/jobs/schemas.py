from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from server.schemas import ORMModel

MAX_ID = 2**31 - 1
JobKindName = Literal["fit", "synthesize", "evaluate", "export"]


class JobCreate(BaseModel):
    kind: JobKindName
    params: dict[str, Any] = Field(default_factory=dict)
    subject_id: int | None = Field(default=None, ge=1, le=MAX_ID)
    session_id: int | None = Field(default=None, ge=1, le=MAX_ID)
    depends_on_id: int | None = Field(
        default=None, ge=1, le=MAX_ID, description="run only after this job has succeeded"
    )
    max_attempts: int = Field(default=3, ge=1, le=100)


class JobUpdate(BaseModel):
    params: dict[str, Any] = Field(
        description="keys replace the queued job's parameters; a null value removes the key"
    )


class CancelBody(BaseModel):
    reason: str = Field(default="", max_length=2000)


class JobOut(ORMModel):
    id: int
    kind: str
    state: str
    params: dict[str, Any]
    progress: float = Field(description="0..1, updated with each lease renewal")
    progress_message: str
    attempts: int
    max_attempts: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    error: str | None
    result: dict[str, Any] | None
    subject_id: int | None
    session_id: int | None
    depends_on_id: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

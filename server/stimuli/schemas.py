from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field

from server.schemas import ORMModel

StimulusId = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class StimulusOut(ORMModel):
    id: str
    kind: str
    width_px: int
    height_px: int
    mode: str
    n_bytes: int
    name: str
    provenance: dict[str, Any]
    created_at: datetime


class StimulusSetCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    kind: str = Field(default="natural", max_length=20)
    description: str = Field(default="", max_length=10_000)
    stimulus_ids: list[StimulusId] = Field(min_length=1, max_length=100_000)


class StimulusSetOut(BaseModel):
    id: int
    name: str
    kind: str
    description: str
    created_at: datetime
    stimulus_ids: list[str]

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from server.schemas import ORMModel

MAX_ID = 2**31 - 1


class Protocol(BaseModel):
    """RSVP and counting parameters of a session; a block may override the RSVP ones."""

    on_ms: float = Field(default=100.0, gt=0, le=10_000)
    off_ms: float = Field(default=100.0, ge=0, le=10_000)
    images_per_trial: int = Field(default=8, ge=1, le=100)
    fixation_ms: float = Field(default=300.0, ge=0, le=10_000)
    image_size_deg: float = Field(default=8.0, gt=0, le=90)
    fixation_window_deg: float = Field(default=2.0, gt=0, le=45)
    response_window_start_ms: float = Field(default=70.0, ge=0, le=5_000)
    response_window_end_ms: float = Field(default=170.0, gt=0, le=5_000)


class RSVPOverride(BaseModel):
    on_ms: float | None = Field(default=None, gt=0, le=10_000)
    off_ms: float | None = Field(default=None, ge=0, le=10_000)
    images_per_trial: int | None = Field(default=None, ge=1, le=100)
    fixation_ms: float | None = Field(default=None, ge=0, le=10_000)


class BlockCreate(BaseModel):
    stimulus_set_id: int = Field(ge=1, le=MAX_ID)
    repetitions: int = Field(ge=1, le=1000)
    rsvp: RSVPOverride = Field(default_factory=RSVPOverride)
    seed: int | None = Field(default=None, ge=0, le=2**62)


class SessionCreate(BaseModel):
    subject_id: int = Field(ge=1, le=MAX_ID)
    rig: str = Field(min_length=1, max_length=100, description="rig name")
    scheduled_date: date
    protocol: Protocol = Field(default_factory=Protocol)
    blocks: list[BlockCreate] = Field(min_length=1, max_length=100)
    notes: str = Field(default="", max_length=10_000)


class BlockOut(ORMModel):
    id: int
    index: int
    stimulus_set_id: int
    repetitions: int
    rsvp: dict[str, Any]
    state: str
    seed: int
    shown_counts: dict[str, int]


class SessionOut(BaseModel):
    id: int
    subject_id: int
    rig: str
    scheduled_date: date
    state: str
    state_reason: str
    protocol: dict[str, Any]
    notes: str
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    blocks: list[BlockOut]


class TransitionBody(BaseModel):
    reason: str = Field(default="", max_length=2000)


class NextBlockItem(BaseModel):
    stimulus_id: str
    image_url: str
    remaining: int


class NextBlockOut(BaseModel):
    session_id: int
    block_id: int
    block_index: int
    seed: int
    rsvp: dict[str, Any]
    protocol: dict[str, Any]
    items: list[NextBlockItem]
    sequence: list[str] = Field(description="stimulus ids in seeded shuffled order, with repeats")


class BlockProgress(BaseModel):
    state: Literal["running", "stopped", "completed"] = "running"
    shown_counts: dict[str, int] = Field(default_factory=dict, max_length=100_000)


class PresentationOut(BaseModel):
    id: str
    session_id: int
    block_id: int
    stimulus_id: str
    trial_index: int
    position: int
    onset_sample: int | None
    onset_source: str
    fixation_ok: bool
    dropped_frames: int
    valid: bool
    invalid_reason: str | None
    received_at: datetime
    spike_counts: list[int] | None = None

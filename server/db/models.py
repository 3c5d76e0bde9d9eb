"""ORM tables. Every table of the project is imported here so Alembic sees it.

Times are naive UTC. Responses are stored per presentation as one packed little-endian
uint16 vector in the session's site order (see ``server.sessions.service.site_ids_for_session``).
"""

from __future__ import annotations

import enum
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from server.db.base import Base, utcnow


class SessionState(enum.StrEnum):
    scheduled = "scheduled"
    running = "running"
    completed = "completed"
    aborted = "aborted"


class BlockState(enum.StrEnum):
    pending = "pending"
    running = "running"
    stopped = "stopped"  # ended early by the operator; resumable
    completed = "completed"


class StimulusKind(enum.StrEnum):
    natural = "natural"
    synthetic = "synthetic"
    normalizer = "normalizer"
    other = "other"


class JobState(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class Role(enum.StrEnum):
    operator = "operator"
    rig = "rig"
    worker = "worker"
    viewer = "viewer"


class Subject(Base):
    __tablename__ = "subject"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    species: Mapped[str] = mapped_column(String(100), default="macaca mulatta")
    notes: Mapped[str] = mapped_column(Text, default="")
    closed_loop: Mapped[bool] = mapped_column(Boolean, default=False)
    loop_params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    arrays: Mapped[list[Array]] = relationship(
        back_populates="subject", order_by="Array.id", cascade="all, delete-orphan"
    )


class Array(Base):
    __tablename__ = "array"
    __table_args__ = (UniqueConstraint("subject_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subject_id: Mapped[int] = mapped_column(
        ForeignKey("subject.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(100))
    area: Mapped[str] = mapped_column(String(50), default="V4")
    n_channels: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    subject: Mapped[Subject] = relationship(back_populates="arrays")
    sites: Mapped[list[Site]] = relationship(
        back_populates="array", order_by="Site.channel", cascade="all, delete-orphan"
    )


class Site(Base):
    __tablename__ = "site"
    __table_args__ = (UniqueConstraint("array_id", "channel"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    array_id: Mapped[int] = mapped_column(ForeignKey("array.id", ondelete="CASCADE"), index=True)
    channel: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(100), default="")

    array: Mapped[Array] = relationship(back_populates="sites")


class Rig(Base):
    __tablename__ = "rig"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    curve_public_key: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Stimulus(Base):
    __tablename__ = "stimulus"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of canonical PNG
    kind: Mapped[str] = mapped_column(String(20), default=StimulusKind.natural.value, index=True)
    width_px: Mapped[int] = mapped_column(Integer)
    height_px: Mapped[int] = mapped_column(Integer)
    mode: Mapped[str] = mapped_column(String(10))  # PIL mode of the canonical PNG: L, RGB
    n_bytes: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(255), default="")
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class StimulusSet(Base):
    __tablename__ = "stimulus_set"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(20), default="natural")
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    members: Mapped[list[StimulusSetMember]] = relationship(
        back_populates="stimulus_set",
        order_by="StimulusSetMember.position",
        cascade="all, delete-orphan",
    )


class StimulusSetMember(Base):
    __tablename__ = "stimulus_set_member"

    stimulus_set_id: Mapped[int] = mapped_column(
        ForeignKey("stimulus_set.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    stimulus_id: Mapped[str] = mapped_column(ForeignKey("stimulus.id"), index=True)

    stimulus_set: Mapped[StimulusSet] = relationship(back_populates="members")


class RecordingSession(Base):
    """One recording session of a subject on a rig (table ``session``)."""

    __tablename__ = "session"
    __table_args__ = (Index("ix_session_rig_state", "rig_id", "state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subject_id: Mapped[int] = mapped_column(ForeignKey("subject.id"), index=True)
    rig_id: Mapped[int] = mapped_column(ForeignKey("rig.id"), index=True)
    scheduled_date: Mapped[date] = mapped_column(Date, index=True)
    state: Mapped[str] = mapped_column(String(20), default=SessionState.scheduled.value)
    protocol: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    notes: Mapped[str] = mapped_column(Text, default="")
    state_reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    blocks: Mapped[list[Block]] = relationship(
        back_populates="session", order_by="Block.index", cascade="all, delete-orphan"
    )


class Block(Base):
    __tablename__ = "block"
    __table_args__ = (UniqueConstraint("session_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("session.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    stimulus_set_id: Mapped[int] = mapped_column(ForeignKey("stimulus_set.id"), index=True)
    repetitions: Mapped[int] = mapped_column(Integer)
    rsvp: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(20), default=BlockState.pending.value)
    seed: Mapped[int] = mapped_column(BigInteger, default=0)
    shown_counts: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)

    session: Mapped[RecordingSession] = relationship(back_populates="blocks")


class Presentation(Base):
    __tablename__ = "presentation"
    __table_args__ = (
        Index("ix_presentation_session_block", "session_id", "block_id"),
        Index("ix_presentation_session_valid", "session_id", "valid"),
        Index("ix_presentation_session_received", "session_id", "received_at"),
        Index("ix_presentation_stimulus", "stimulus_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # UUID made on the rig
    session_id: Mapped[int] = mapped_column(ForeignKey("session.id", ondelete="CASCADE"))
    block_id: Mapped[int] = mapped_column(ForeignKey("block.id", ondelete="CASCADE"))
    stimulus_id: Mapped[str] = mapped_column(ForeignKey("stimulus.id"))
    rig_id: Mapped[int | None] = mapped_column(ForeignKey("rig.id"), nullable=True)
    trial_index: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)
    onset_sample: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    onset_source: Mapped[str] = mapped_column(String(20))
    fixation_ok: Mapped[bool] = mapped_column(Boolean)
    dropped_frames: Mapped[int] = mapped_column(Integer, default=0)
    valid: Mapped[bool] = mapped_column(Boolean)
    invalid_reason: Mapped[str | None] = mapped_column(String(50), nullable=True)
    window_start_ms: Mapped[float] = mapped_column(Float, default=70.0)
    window_end_ms: Mapped[float] = mapped_column(Float, default=170.0)
    spike_counts: Mapped[bytes] = mapped_column(LargeBinary)  # uint16 LE, one per site
    raster: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    raster_meta: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class NeuronModel(Base):
    """A fitted neuron model (table ``model``)."""

    __tablename__ = "model"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subject_id: Mapped[int] = mapped_column(ForeignKey("subject.id"), index=True)
    backbone_id: Mapped[str] = mapped_column(String(100))
    weights_sha256: Mapped[str] = mapped_column(String(80))
    layer: Mapped[str] = mapped_column(String(50))
    readout_kind: Mapped[str] = mapped_column(String(30))
    session_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    site_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    artifact_path: Mapped[str] = mapped_column(String(500))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("job.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    __tablename__ = "job"
    __table_args__ = (Index("ix_job_state_kind", "state", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(20), default=JobState.queued.value)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    progress_message: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    subject_id: Mapped[int | None] = mapped_column(ForeignKey("subject.id"), nullable=True)
    session_id: Mapped[int | None] = mapped_column(ForeignKey("session.id"), nullable=True)
    depends_on_id: Mapped[int | None] = mapped_column(ForeignKey("job.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Evaluation(Base):
    __tablename__ = "evaluation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("session.id"), index=True)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("model.id"), nullable=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("job.id"), nullable=True)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    per_site: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ApiToken(Base):
    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(12))
    role: Mapped[str] = mapped_column(String(20))
    rig_id: Mapped[int | None] = mapped_column(ForeignKey("rig.id"), nullable=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

"""Subjects, arrays, sites and rigs. Functions flush, never commit: the caller owns the transaction."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.catalog.schemas import (
    ArrayCreate,
    ArrayUpdate,
    RigCreate,
    RigUpdate,
    SubjectCreate,
    SubjectUpdate,
)
from server.db.models import Array, Rig, Site, Subject
from server.errors import Conflict, NotFound


def _flush_unique(db: Session, what: str) -> None:
    try:
        db.flush()
    except IntegrityError:
        db.rollback()
        raise Conflict(f"{what} already exists; names must be unique") from None


def create_subject(db: Session, data: SubjectCreate) -> Subject:
    subject = Subject(name=data.name, species=data.species, notes=data.notes, loop_params={})
    db.add(subject)
    _flush_unique(db, f"subject {data.name!r}")
    return subject


def get_subject(db: Session, subject_id: int) -> Subject:
    subject = db.get(Subject, subject_id)
    if subject is None:
        raise NotFound(f"subject {subject_id} does not exist")
    return subject


def update_subject(db: Session, subject_id: int, data: SubjectUpdate) -> Subject:
    subject = get_subject(db, subject_id)
    for field, value in data.model_dump(exclude_unset=True, exclude_none=True).items():
        setattr(subject, field, value)
    db.flush()
    return subject


def list_subjects(db: Session) -> list[Subject]:
    return list(db.scalars(select(Subject).order_by(Subject.id)))


def create_array(db: Session, data: ArrayCreate) -> Array:
    get_subject(db, data.subject_id)
    array = Array(
        subject_id=data.subject_id, name=data.name, area=data.area, n_channels=data.n_channels
    )
    array.sites = [Site(channel=ch, label=f"{data.name}-{ch:03d}") for ch in range(data.n_channels)]
    db.add(array)
    _flush_unique(db, f"array {data.name!r} of subject {data.subject_id}")
    return array


def get_array(db: Session, array_id: int) -> Array:
    array = db.get(Array, array_id)
    if array is None:
        raise NotFound(f"array {array_id} does not exist")
    return array


def update_array(db: Session, array_id: int, data: ArrayUpdate) -> Array:
    array = get_array(db, array_id)
    for field, value in data.model_dump(exclude_unset=True, exclude_none=True).items():
        setattr(array, field, value)
    _flush_unique(db, f"array {data.name!r}")
    return array


def list_arrays(db: Session, subject_id: int | None = None) -> list[Array]:
    query = select(Array).order_by(Array.id)
    if subject_id is not None:
        query = query.where(Array.subject_id == subject_id)
    return list(db.scalars(query))


def site_ids_for_subject(db: Session, subject_id: int) -> list[int]:
    """The subject's sites in storage order: arrays by id, then channel."""
    rows = db.execute(
        select(Site.id)
        .join(Array, Site.array_id == Array.id)
        .where(Array.subject_id == subject_id)
        .order_by(Array.id, Site.channel)
    )
    return [row[0] for row in rows]


def create_rig(db: Session, data: RigCreate) -> Rig:
    rig = Rig(name=data.name, description=data.description, curve_public_key=data.curve_public_key)
    db.add(rig)
    _flush_unique(db, f"rig {data.name!r}")
    return rig


def get_rig_by_name(db: Session, name: str) -> Rig:
    rig = db.scalar(select(Rig).where(Rig.name == name))
    if rig is None:
        raise NotFound(f"rig {name!r} does not exist")
    return rig


def update_rig(db: Session, name: str, data: RigUpdate) -> Rig:
    rig = get_rig_by_name(db, name)
    for field, value in data.model_dump(exclude_unset=True).items():
        if field == "description" and value is None:
            continue
        setattr(rig, field, value)
    db.flush()
    return rig


def list_rigs(db: Session) -> list[Rig]:
    return list(db.scalars(select(Rig).order_by(Rig.id)))

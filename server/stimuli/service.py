"""Stimuli and stimulus sets. Functions flush, never commit."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.db.models import Stimulus, StimulusKind, StimulusSet, StimulusSetMember
from server.errors import Conflict, Invalid, NotFound
from server.stimuli.blobs import BlobStore
from server.stimuli.images import CanonicalImage
from server.stimuli.schemas import StimulusSetCreate, StimulusSetOut


def store_stimulus(
    db: Session,
    blobs: BlobStore,
    image: CanonicalImage,
    *,
    kind: str = StimulusKind.natural.value,
    name: str = "",
    provenance: dict[str, Any] | None = None,
) -> tuple[Stimulus, bool]:
    """Store an image once; return (stimulus, created). The same image twice gives one row, one blob."""
    valid_kinds = {k.value for k in StimulusKind}
    if kind not in valid_kinds:
        raise Invalid(
            f"unknown stimulus kind {kind!r}; choose one of {', '.join(sorted(valid_kinds))}"
        )
    existing = db.get(Stimulus, image.sha256)
    if existing is not None:
        blobs.put(image.sha256, image.png)  # heal a missing blob
        return existing, False
    blobs.put(image.sha256, image.png)
    stimulus = Stimulus(
        id=image.sha256,
        kind=kind,
        width_px=image.width_px,
        height_px=image.height_px,
        mode=image.mode,
        n_bytes=len(image.png),
        name=name,
        provenance=provenance or {},
    )
    db.add(stimulus)
    db.flush()
    return stimulus, True


def get_stimulus(db: Session, stimulus_id: str) -> Stimulus:
    stimulus = db.get(Stimulus, stimulus_id)
    if stimulus is None:
        raise NotFound(f"stimulus {stimulus_id} does not exist")
    return stimulus


def create_set(db: Session, data: StimulusSetCreate) -> StimulusSet:
    missing = set(data.stimulus_ids) - set(
        db.scalars(select(Stimulus.id).where(Stimulus.id.in_(set(data.stimulus_ids))))
    )
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise Invalid(f"{len(missing)} stimulus ids are unknown (e.g. {shown}); upload them first")
    stimulus_set = StimulusSet(name=data.name, kind=data.kind, description=data.description)
    stimulus_set.members = [
        StimulusSetMember(position=i, stimulus_id=sid) for i, sid in enumerate(data.stimulus_ids)
    ]
    db.add(stimulus_set)
    try:
        db.flush()
    except IntegrityError:
        db.rollback()
        raise Conflict(f"a stimulus set named {data.name!r} already exists") from None
    return stimulus_set


def get_set(db: Session, set_id: int) -> StimulusSet:
    stimulus_set = db.get(StimulusSet, set_id)
    if stimulus_set is None:
        raise NotFound(f"stimulus set {set_id} does not exist")
    return stimulus_set


def set_out(stimulus_set: StimulusSet) -> StimulusSetOut:
    return StimulusSetOut(
        id=stimulus_set.id,
        name=stimulus_set.name,
        kind=stimulus_set.kind,
        description=stimulus_set.description,
        created_at=stimulus_set.created_at,
        stimulus_ids=[m.stimulus_id for m in stimulus_set.members],
    )


def list_sets(db: Session) -> list[StimulusSet]:
    return list(db.scalars(select(StimulusSet).order_by(StimulusSet.id)))

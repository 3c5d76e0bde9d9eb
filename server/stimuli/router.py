from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Path, Query, Response, UploadFile

from server.deps import BlobsDep, IdPath, ProducerDep, ReaderDep, SessionDep, SettingsDep
from server.errors import Invalid, NotFound
from server.stimuli import service
from server.stimuli.images import ACCEPTED_CONTENT_TYPES, canonicalize
from server.stimuli.schemas import StimulusOut, StimulusSetCreate, StimulusSetOut

router = APIRouter(prefix="/api/v1", tags=["stimuli"])
StimulusIdPath = Annotated[
    str, Path(pattern=r"^[0-9a-f]{64}$", description="sha256 of the canonical PNG")
]


@router.post("/stimuli", status_code=201)
async def upload_stimulus(
    response: Response,
    db: SessionDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    _: ProducerDep,
    file: Annotated[UploadFile, File(description="PNG or JPEG image")],
    kind: Annotated[str, Form()] = "natural",
    name: Annotated[str, Form(max_length=255)] = "",
) -> StimulusOut:
    content_type = (file.content_type or "").split(";")[0].strip().lower()
    if content_type not in ACCEPTED_CONTENT_TYPES:
        raise Invalid(
            f"content type {content_type or 'missing'!r} is not accepted; upload image/png or image/jpeg"
        )
    data = await file.read(settings.max_upload_bytes + 1)
    image = canonicalize(data, max_px=settings.max_image_px, max_bytes=settings.max_upload_bytes)
    stimulus, created = service.store_stimulus(
        db, blobs, image, kind=kind, name=name or (file.filename or "")[:255]
    )
    if not created:
        response.status_code = 200
    return StimulusOut.model_validate(stimulus)


@router.get("/stimuli")
def list_stimuli(
    db: SessionDep,
    _: ReaderDep,
    kind: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> list[StimulusOut]:
    from sqlalchemy import select

    from server.db.models import Stimulus

    query = select(Stimulus).order_by(Stimulus.created_at, Stimulus.id).limit(limit).offset(offset)
    if kind:
        query = query.where(Stimulus.kind == kind)
    return [StimulusOut.model_validate(s) for s in db.scalars(query)]


@router.get("/stimuli/{stimulus_id}")
def get_stimulus(stimulus_id: StimulusIdPath, db: SessionDep, _: ReaderDep) -> StimulusOut:
    return StimulusOut.model_validate(service.get_stimulus(db, stimulus_id))


@router.get("/stimuli/{stimulus_id}/image", response_class=Response)
def get_stimulus_image(
    stimulus_id: StimulusIdPath, db: SessionDep, blobs: BlobsDep, _: ReaderDep
) -> Response:
    service.get_stimulus(db, stimulus_id)
    if not blobs.exists(stimulus_id):
        raise NotFound(f"the image bytes of stimulus {stimulus_id} are missing from the blob store")
    return Response(
        content=blobs.get(stimulus_id),
        media_type="image/png",
        headers={
            "Cache-Control": "public, max-age=31536000, immutable",
            "ETag": f'"{stimulus_id}"',
        },
    )


@router.post("/stimulus-sets", status_code=201)
def create_set(data: StimulusSetCreate, db: SessionDep, _: ProducerDep) -> StimulusSetOut:
    return service.set_out(service.create_set(db, data))


@router.get("/stimulus-sets")
def list_sets(db: SessionDep, _: ReaderDep) -> list[StimulusSetOut]:
    return [service.set_out(s) for s in service.list_sets(db)]


@router.get("/stimulus-sets/{set_id}")
def get_set(set_id: IdPath, db: SessionDep, _: ReaderDep) -> StimulusSetOut:
    return service.set_out(service.get_set(db, set_id))

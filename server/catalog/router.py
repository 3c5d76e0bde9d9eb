from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status

from server.catalog import service
from server.catalog.schemas import (
    ArrayCreate,
    ArrayOut,
    ArrayUpdate,
    RigCreate,
    RigOut,
    RigUpdate,
    SubjectCreate,
    SubjectOut,
    SubjectUpdate,
)
from server.db.models import Array, Rig, Subject
from server.deps import IdPath, OperatorDep, ReaderDep, SessionDep

router = APIRouter(prefix="/api/v1", tags=["subjects, arrays, rigs"])
RigName = Annotated[str, Path(min_length=1, max_length=100)]


@router.post("/subjects", status_code=status.HTTP_201_CREATED)
def create_subject(data: SubjectCreate, db: SessionDep, _: OperatorDep) -> SubjectOut:
    return SubjectOut.model_validate(service.create_subject(db, data))


@router.get("/subjects")
def list_subjects(db: SessionDep, _: ReaderDep) -> list[SubjectOut]:
    return [SubjectOut.model_validate(s) for s in service.list_subjects(db)]


@router.get("/subjects/{subject_id}")
def get_subject(subject_id: IdPath, db: SessionDep, _: ReaderDep) -> SubjectOut:
    return SubjectOut.model_validate(service.get_subject(db, subject_id))


@router.patch("/subjects/{subject_id}")
def update_subject(
    subject_id: IdPath, data: SubjectUpdate, db: SessionDep, _: OperatorDep
) -> SubjectOut:
    subject: Subject = service.update_subject(db, subject_id, data)
    return SubjectOut.model_validate(subject)


@router.post("/arrays", status_code=status.HTTP_201_CREATED)
def create_array(data: ArrayCreate, db: SessionDep, _: OperatorDep) -> ArrayOut:
    return ArrayOut.model_validate(service.create_array(db, data))


@router.get("/arrays")
def list_arrays(
    db: SessionDep,
    _: ReaderDep,
    subject_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> list[ArrayOut]:
    return [ArrayOut.model_validate(a) for a in service.list_arrays(db, subject_id)]


@router.get("/arrays/{array_id}")
def get_array(array_id: IdPath, db: SessionDep, _: ReaderDep) -> ArrayOut:
    return ArrayOut.model_validate(service.get_array(db, array_id))


@router.patch("/arrays/{array_id}")
def update_array(array_id: IdPath, data: ArrayUpdate, db: SessionDep, _: OperatorDep) -> ArrayOut:
    array: Array = service.update_array(db, array_id, data)
    return ArrayOut.model_validate(array)


@router.post("/rigs", status_code=status.HTTP_201_CREATED)
def create_rig(data: RigCreate, db: SessionDep, _: OperatorDep) -> RigOut:
    return RigOut.model_validate(service.create_rig(db, data))


@router.get("/rigs")
def list_rigs(db: SessionDep, _: ReaderDep) -> list[RigOut]:
    return [RigOut.model_validate(r) for r in service.list_rigs(db)]


@router.get("/rigs/{name}")
def get_rig(name: RigName, db: SessionDep, _: ReaderDep) -> RigOut:
    return RigOut.model_validate(service.get_rig_by_name(db, name))


@router.patch("/rigs/{name}")
def update_rig(name: RigName, data: RigUpdate, db: SessionDep, _: OperatorDep) -> RigOut:
    rig: Rig = service.update_rig(db, name, data)
    return RigOut.model_validate(rig)

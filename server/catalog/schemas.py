from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from server.schemas import Name, ORMModel

# A CURVE public key in Z85 text is 40 characters from this alphabet.
Z85_PATTERN = r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$"


class SubjectCreate(BaseModel):
    name: Name
    species: str = Field(default="macaca mulatta", max_length=100)
    notes: str = Field(default="", max_length=10_000)


class SubjectUpdate(BaseModel):
    species: str | None = Field(default=None, max_length=100)
    notes: str | None = Field(default=None, max_length=10_000)
    closed_loop: bool | None = None
    loop_params: dict[str, Any] | None = None


class SubjectOut(ORMModel):
    id: int
    name: str
    species: str
    notes: str
    closed_loop: bool
    loop_params: dict[str, Any]
    created_at: datetime


class ArrayCreate(BaseModel):
    subject_id: int = Field(ge=1, le=2**31 - 1)
    name: Name
    area: str = Field(default="V4", max_length=50)
    n_channels: int = Field(ge=1, le=4096)


class ArrayUpdate(BaseModel):
    name: Name | None = None
    area: str | None = Field(default=None, max_length=50)


class SiteOut(ORMModel):
    id: int
    channel: int
    label: str


class ArrayOut(ORMModel):
    id: int
    subject_id: int
    name: str
    area: str
    n_channels: int
    created_at: datetime
    sites: list[SiteOut]


class RigCreate(BaseModel):
    name: Name
    description: str = Field(default="", max_length=10_000)
    curve_public_key: str | None = Field(default=None, pattern=Z85_PATTERN)


class RigUpdate(BaseModel):
    description: str | None = Field(default=None, max_length=10_000)
    curve_public_key: str | None = Field(default=None, pattern=Z85_PATTERN)


class RigOut(ORMModel):
    id: int
    name: str
    description: str
    curve_public_key: str | None
    created_at: datetime

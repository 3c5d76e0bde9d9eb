"""FastAPI dependencies: one database session per request, the caller's principal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy.orm import Session

from server.auth.tokens import Principal, authenticate
from server.config import Settings
from server.db.models import Role
from server.errors import Forbidden, Unauthorized
from server.stimuli.blobs import BlobStore

MAX_ID = 2**31 - 1


def get_db(request: Request) -> Iterator[Session]:
    db: Session = request.app.state.sessionmaker()
    try:
        yield db
        db.commit()
    except BaseException:
        db.rollback()
        raise
    finally:
        db.close()


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_blobs(request: Request) -> BlobStore:
    blobs: BlobStore = request.app.state.blobs
    return blobs


def get_principal(request: Request, db: Annotated[Session, Depends(get_db)]) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if header and scheme.lower() == "bearer":
        return authenticate(db, token.strip())
    cookie_principal = getattr(request.state, "principal", None)
    if isinstance(cookie_principal, Principal):
        return cookie_principal
    if header:
        raise Unauthorized("the Authorization header must be `Bearer <token>`")
    raise Unauthorized("missing bearer token: send `Authorization: Bearer <token>`")


def _writer(*roles: Role) -> Callable[[Principal], Principal]:
    def dep(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if principal.role not in roles:
            allowed = ", ".join(r.value for r in roles)
            raise Forbidden(
                f"a {principal.role.value} token cannot change this; it needs role {allowed}"
            )
        return principal

    return dep


SessionDep = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
ReaderDep = Annotated[Principal, Depends(get_principal)]
OperatorDep = Annotated[Principal, Depends(_writer(Role.operator))]
ProducerDep = Annotated[Principal, Depends(_writer(Role.operator, Role.worker))]
RigOrOperatorDep = Annotated[Principal, Depends(_writer(Role.operator, Role.rig))]
IdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="numeric id")]

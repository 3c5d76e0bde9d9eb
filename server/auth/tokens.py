"""Creating and checking API tokens. Only a token's sha256 is stored."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.db.base import utcnow
from server.db.models import ApiToken, Rig, Role
from server.errors import Forbidden, Invalid, NotFound, Unauthorized

TOKEN_PREFIX = "pc_"


@dataclass(frozen=True)
class Principal:
    token_id: int
    role: Role
    rig_id: int | None
    name: str

    @property
    def can_write(self) -> bool:
        return self.role != Role.viewer


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(db: Session, role: str, rig_name: str | None = None, name: str = "") -> str:
    """Store a new token and return it in clear text (shown once)."""
    try:
        role_enum = Role(role)
    except ValueError:
        valid = ", ".join(r.value for r in Role)
        raise Invalid(f"unknown role {role!r}; choose one of {valid}") from None
    rig_id: int | None = None
    if role_enum == Role.rig:
        if not rig_name:
            raise Invalid("a rig token needs the rig it belongs to: pass --rig NAME")
        rig = db.scalar(select(Rig).where(Rig.name == rig_name))
        if rig is None:
            raise NotFound(f"rig {rig_name!r} does not exist; create it first (POST /api/v1/rigs)")
        rig_id = rig.id
    elif rig_name:
        raise Invalid("--rig only applies to rig tokens")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    db.add(
        ApiToken(
            token_sha256=hash_token(token),
            prefix=token[:10],
            role=role_enum.value,
            rig_id=rig_id,
            name=name,
        )
    )
    db.flush()
    return token


def authenticate(db: Session, token: str) -> Principal:
    if not token:
        raise Unauthorized("missing bearer token: send `Authorization: Bearer <token>`")
    row = db.scalar(select(ApiToken).where(ApiToken.token_sha256 == hash_token(token)))
    if row is None or row.revoked:
        raise Unauthorized("unknown or revoked token; create one with `popcontrol token create`")
    row.last_used_at = utcnow()
    return Principal(token_id=row.id, role=Role(row.role), rig_id=row.rig_id, name=row.name)


def require_role(principal: Principal, *roles: Role) -> None:
    if principal.role not in roles:
        allowed = ", ".join(r.value for r in roles)
        raise Forbidden(f"a {principal.role.value} token cannot do this; it needs role {allowed}")


def require_rig_access(principal: Principal, rig_id: int) -> None:
    """Operators act on every rig; a rig token only on its own rig."""
    if principal.role == Role.operator:
        return
    if principal.role == Role.rig and principal.rig_id == rig_id:
        return
    if principal.role == Role.rig:
        raise Forbidden("this rig token belongs to another rig")
    raise Forbidden(f"a {principal.role.value} token cannot change a rig's sessions")

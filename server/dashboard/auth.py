"""Dashboard sign-in: a signed cookie session, CSRF tokens, and the refusals the pages raise.

The cookie ``pc_session`` holds ``{tid, role, name, csrf}`` signed with ``settings.session_secret``
(or a random secret made once per process, so restarting the server signs everyone out). It is
never trusted on its own: :class:`DashboardSessionMiddleware` looks the token up on every request
and drops the session when the token was revoked or changed role.

What the middleware puts on ``request.state``:

* ``dashboard_user``: the signed-in :class:`DashboardUser` (or None); dashboard pages use it.
* ``principal``: the same user as a :class:`~server.auth.tokens.Principal`, which the REST API's
  ``get_principal`` accepts, but only for safe methods (GET, HEAD) or when the request carries the
  session's CSRF token in the ``X-CSRF-Token`` header, so a cookie alone never changes anything
  through the API (pages show stimulus images from ``/api/v1/stimuli/{id}/image``).

Dashboard routes raise :class:`SignInRequired` (redirect to the sign-in page) or :class:`Refused`
(an HTML 403/400 page); the middleware turns both into responses.
"""

from __future__ import annotations

import hmac
import html
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import anyio.to_thread
from fastapi import FastAPI, Request
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import select
from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.auth.tokens import Principal
from server.db.models import ApiToken, Role

SESSION_COOKIE = "pc_session"
FLASH_COOKIE = "pc_flash"
SESSION_MAX_AGE_S = 12 * 3600
SIGN_IN_ROLES = (Role.operator, Role.viewer)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class DashboardUser:
    token_id: int
    role: Role
    name: str
    csrf: str

    @property
    def can_write(self) -> bool:
        return self.role == Role.operator

    def principal(self) -> Principal:
        return Principal(token_id=self.token_id, role=self.role, rig_id=None, name=self.name)


class SignInRequired(Exception):
    """The page needs a signed-in user; the middleware redirects to ``/signin?next=...``."""


class Refused(Exception):
    """A request the dashboard refuses; the middleware answers with a small HTML page."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def _secret(app: Any) -> str:
    secret: str | None = getattr(app.state, "dashboard_secret", None)
    if secret is None:
        secret = app.state.settings.session_secret or secrets.token_urlsafe(32)
        app.state.dashboard_secret = secret
    return secret


def serializer(app: Any, purpose: str = "session") -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(_secret(app), salt=f"popcontrol-dashboard-{purpose}")


def new_csrf() -> str:
    return secrets.token_urlsafe(24)


def session_cookie_value(app: FastAPI, payload: dict[str, Any]) -> str:
    return str(serializer(app).dumps(payload))


def read_session_cookie(app: Any, value: str | None) -> dict[str, Any] | None:
    if not value:
        return None
    try:
        data = serializer(app).loads(value, max_age=SESSION_MAX_AGE_S)
    except BadSignature:
        return None
    return data if isinstance(data, dict) else None


def set_session_cookie(response: Response, request: Request, payload: dict[str, Any]) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        session_cookie_value(request.app, payload),
        max_age=SESSION_MAX_AGE_S,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
        path="/",
    )


def csrf_matches(expected: str, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(expected, str(given))


def anonymous_csrf(request: Request) -> str:
    """The CSRF token of the current cookie session (signed in or not), or '' when none."""
    data = getattr(request.state, "dashboard_cookie", None) or {}
    return str(data.get("csrf", ""))


def current_user(request: Request) -> DashboardUser | None:
    user = getattr(request.state, "dashboard_user", None)
    return user if isinstance(user, DashboardUser) else None


def require_user(request: Request) -> DashboardUser:
    user = current_user(request)
    if user is None:
        raise SignInRequired()
    return user


def require_writer(request: Request, csrf_token: str | None) -> DashboardUser:
    """A POST from a form: the session's CSRF token must match, and the user must be an operator."""
    user = require_user(request)
    if not csrf_matches(user.csrf, csrf_token):
        raise Refused(
            403,
            "this form's security token is missing or out of date; reload the page and submit again",
        )
    if not user.can_write:
        raise Refused(
            403,
            "a viewer can look at everything but change nothing; sign in with an operator token",
        )
    return user


def _lookup(app: Any, token_id: int, role: str) -> bool:
    """True when the token still exists, is not revoked, and still has the role in the cookie."""
    factory = getattr(app.state, "sessionmaker", None)
    if factory is None:
        return False
    with factory() as db:
        row = db.execute(
            select(ApiToken.revoked, ApiToken.role).where(ApiToken.id == token_id)
        ).first()
    return row is not None and not row[0] and row[1] == role


def _refusal_page(status_code: int, message: str) -> HTMLResponse:
    body = (
        "<!doctype html><html><head><meta charset='utf-8'><title>popcontrol: refused</title>"
        "<link rel='stylesheet' href='/static/dashboard.css'></head><body><main class='refused'>"
        f"<h1>{status_code}</h1><p id='refusal'>{html.escape(message)}</p>"
        "<p><a href='/'>back to the dashboard</a></p></main></body></html>"
    )
    return HTMLResponse(body, status_code=status_code)


class DashboardSessionMiddleware:
    """Reads the signed session cookie, checks its token, and answers dashboard refusals."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        fastapi_app = scope["app"]
        state = scope.setdefault("state", {})
        data = read_session_cookie(fastapi_app, conn.cookies.get(SESSION_COOKIE))
        state["dashboard_cookie"] = data
        state["dashboard_user"] = None
        if data and data.get("tid") is not None:
            role = str(data.get("role", ""))
            still_valid = await anyio.to_thread.run_sync(
                _lookup, fastapi_app, int(data["tid"]), role
            )
            if still_valid and role in {r.value for r in SIGN_IN_ROLES}:
                user = DashboardUser(
                    token_id=int(data["tid"]),
                    role=Role(role),
                    name=str(data.get("name", "")),
                    csrf=str(data.get("csrf", "")),
                )
                state["dashboard_user"] = user
                header_csrf = conn.headers.get("x-csrf-token")
                if scope["method"] in SAFE_METHODS or csrf_matches(user.csrf, header_csrf):
                    state["principal"] = user.principal()

        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("X-Content-Type-Options", "nosniff")
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except SignInRequired:
            if started:
                raise
            target = conn.url.path + (f"?{conn.url.query}" if conn.url.query else "")
            response: Response = RedirectResponse(f"/signin?next={quote(target)}", status_code=303)
            await response(scope, receive, send)
        except Refused as exc:
            if started:
                raise
            await _refusal_page(exc.status_code, exc.message)(scope, receive, send)

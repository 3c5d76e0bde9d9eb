"""The one hierarchy of domain errors. ``server.app`` maps them to JSON ``{type, detail}``."""

from __future__ import annotations


class PopcontrolError(Exception):
    """Base of every error the API reports to a client."""

    status_code = 400
    type = "error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(PopcontrolError):
    status_code = 404
    type = "not_found"


class Conflict(PopcontrolError):
    status_code = 409
    type = "conflict"


class Invalid(PopcontrolError):
    status_code = 422
    type = "invalid"


class Unauthorized(PopcontrolError):
    status_code = 401
    type = "unauthorized"


class Forbidden(PopcontrolError):
    status_code = 403
    type = "forbidden"


class DatabaseNotReady(PopcontrolError):
    """The database schema is missing or older/newer than this code."""

    status_code = 503
    type = "database_not_ready"

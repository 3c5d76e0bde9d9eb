from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

router = APIRouter(prefix="/api/v1", tags=["health"])


@router.get("/health")
def health(request: Request) -> JSONResponse:
    """No auth. 200 when the database and the blob store are reachable, else 503."""
    database_ok = True
    database_error = ""
    try:
        with request.app.state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # report, never raise
        database_ok = False
        database_error = f"{exc.__class__.__name__}: {exc}"[:300]
    blobs_ok = bool(request.app.state.blobs.reachable())
    ok = database_ok and blobs_ok
    body = {
        "status": "ok" if ok else "degraded",
        "database": {"ok": database_ok, "error": database_error or None},
        "blob_store": {"ok": blobs_ok, "path": str(request.app.state.blobs.root)},
        "ingest": getattr(request.app.state, "ingest_status", lambda: None)(),
    }
    return JSONResponse(body, status_code=200 if ok else 503)

"""The FastAPI application: ``create_app(settings)`` builds it without side effects at import."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.catalog.router import router as catalog_router
from server.config import Settings
from server.dashboard.auth import DashboardSessionMiddleware
from server.dashboard.router import router as dashboard_router
from server.db.session import check_schema, engine_for, make_sessionmaker
from server.errors import PopcontrolError
from server.health import router as health_router
from server.jobs.router import router as jobs_router
from server.loop.router import router as loop_router
from server.sessions.router import router as sessions_router
from server.stimuli.blobs import BlobStore
from server.stimuli.router import router as stimuli_router

log = logging.getLogger("popcontrol.server")


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:10]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is not valid"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PopcontrolError)
    async def _domain(_: Request, exc: PopcontrolError) -> JSONResponse:
        return JSONResponse({"type": exc.type, "detail": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {"type": "validation_error", "detail": _validation_detail(exc)}, status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 403: "forbidden"}
        return JSONResponse(
            {"type": kind.get(exc.status_code, "http_error"), "detail": str(exc.detail)},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {"type": "internal_error", "detail": "the server hit an unexpected error; see its log"},
            status_code=500,
        )


def create_app(settings: Settings, *, ingest: bool | None = None, check_db: bool = True) -> FastAPI:
    """Build the app. The engine, blob store and ingest start in the lifespan, not at import."""
    run_ingest = settings.ingest_enabled if ingest is None else ingest

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = engine_for(settings)
        if check_db:
            check_schema(engine)
        app.state.engine = engine
        app.state.sessionmaker = make_sessionmaker(engine)
        app.state.blobs = BlobStore(settings.resolved_blob_dir)
        app.state.blobs.root.mkdir(parents=True, exist_ok=True)
        ingest_server: Any = None
        if run_ingest:
            from server.ingest import IngestServer

            ingest_server = IngestServer(settings, app.state.sessionmaker)
            ingest_server.start()
            app.state.ingest_status = ingest_server.status
        for hook in app.state.startup_hooks:
            hook(app)
        try:
            yield
        finally:
            for hook in app.state.shutdown_hooks:
                hook(app)
            if ingest_server is not None:
                ingest_server.stop()
            engine.dispose()

    app = FastAPI(
        title="popcontrol",
        version="0.1.0",
        description="Closed-loop neural population control: scheduling, data, models, synthesis.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.startup_hooks = []
    app.state.shutdown_hooks = []
    install_error_handlers(app)
    app.include_router(health_router)
    app.include_router(catalog_router)
    app.include_router(stimuli_router)
    app.include_router(sessions_router)
    app.include_router(jobs_router)
    app.include_router(loop_router)
    app.include_router(dashboard_router)
    app.add_middleware(DashboardSessionMiddleware)
    return app

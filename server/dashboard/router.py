"""The operator dashboard at ``/``: server-rendered pages, a few forms, one live event stream.

Every page needs a signed-in user (operator or viewer); every form POST checks the session's CSRF
token and refuses viewers (see ``server.dashboard.auth``). Writes go through the domain services
(sessions, jobs), never through HTTP calls to the API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.templating import Jinja2Templates
from itsdangerous import BadSignature
from pydantic import ValidationError

from server.auth.tokens import authenticate
from server.dashboard import queries, svg
from server.dashboard.auth import (
    FLASH_COOKIE,
    SESSION_COOKIE,
    SIGN_IN_ROLES,
    Refused,
    anonymous_csrf,
    csrf_matches,
    current_user,
    new_csrf,
    require_user,
    require_writer,
    serializer,
    set_session_cookie,
)
from server.db.models import JobState, NeuronModel, RecordingSession, SessionState, Subject
from server.deps import IdPath, SessionDep
from server.errors import PopcontrolError, Unauthorized
from server.jobs import queue
from server.sessions import service as sessions
from server.sessions.schemas import SessionCreate

log = logging.getLogger("popcontrol.dashboard")

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
STATIC_NAME = re.compile(r"^[a-z0-9_-]+\.(css|js)$")
LIVE_INTERVAL_S = 1.0
LIVE_CACHE_S = 0.8
MAX_BLOCK_ROWS = 20

templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters["num"] = lambda v, digits=3: (
    "–" if queries.finite(v) is None else f"{queries.finite(v):.{digits}g}"
)
templates.env.filters["pct"] = lambda v: (
    "–" if queries.finite(v) is None else f"{100 * queries.finite(v):.0f} %"  # type: ignore[operator]
)

router = APIRouter(include_in_schema=False)

CsrfForm = Annotated[str | None, Form()]
TextForm = Annotated[str, Form()]


# --- helpers ------------------------------------------------------------------------------------


def _flash_from(request: Request) -> dict[str, str] | None:
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return None
    try:
        data = serializer(request.app, "flash").loads(raw, max_age=300)
    except BadSignature:
        return None
    return data if isinstance(data, dict) else None


def render(
    request: Request, name: str, context: dict[str, Any], status_code: int = 200
) -> Response:
    user = current_user(request)
    flash = _flash_from(request)
    response = templates.TemplateResponse(
        request,
        name,
        {
            "user": user,
            "can_write": bool(user and user.can_write),
            "csrf": user.csrf if user else anonymous_csrf(request),
            "flash": flash,
            "path": request.url.path,
            **context,
        },
        status_code=status_code,
    )
    if flash is not None:
        response.delete_cookie(FLASH_COOKIE, path="/")
    response.headers["Cache-Control"] = "no-store"
    return response


def redirect(request: Request, url: str, message: str = "", kind: str = "ok") -> Response:
    response = RedirectResponse(url, status_code=303)
    if message:
        value = serializer(request.app, "flash").dumps({"kind": kind, "message": message})
        response.set_cookie(FLASH_COOKIE, str(value), max_age=300, httponly=True, samesite="lax")
    return response


def _safe_next(target: str | None) -> str:
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/sessions"


# --- sign-in ------------------------------------------------------------------------------------


@router.get("/")
def home(request: Request) -> Response:
    return RedirectResponse("/sessions" if current_user(request) else "/signin", status_code=303)


@router.get("/signin")
def signin_page(request: Request, next: str = "/sessions") -> Response:
    csrf = anonymous_csrf(request) or new_csrf()
    response = render(request, "signin.html", {"next": _safe_next(next), "csrf": csrf, "error": ""})
    data = getattr(request.state, "dashboard_cookie", None) or {}
    if data.get("csrf") != csrf:
        set_session_cookie(response, request, {"csrf": csrf})
    return response


@router.post("/signin")
def signin(
    request: Request,
    db: SessionDep,
    token: TextForm = "",
    csrf_token: CsrfForm = None,
    next: TextForm = "/sessions",
) -> Response:
    csrf = anonymous_csrf(request)
    if not csrf_matches(csrf, csrf_token):
        raise Refused(403, "the sign-in form's security token is missing; reload the sign-in page")
    error = ""
    try:
        principal = authenticate(db, token.strip())
    except Unauthorized as exc:
        error = exc.detail
    else:
        if principal.role not in SIGN_IN_ROLES:
            error = (
                f"a {principal.role.value} token cannot sign in to the dashboard; "
                "use an operator or viewer token"
            )
    if error:
        db.rollback()
        return render(
            request, "signin.html", {"next": _safe_next(next), "csrf": csrf, "error": error}, 401
        )
    db.commit()
    response = RedirectResponse(_safe_next(next), status_code=303)
    set_session_cookie(
        response,
        request,
        {
            "tid": principal.token_id,
            "role": principal.role.value,
            "name": principal.name,
            "csrf": new_csrf(),
        },
    )
    log.info("dashboard sign-in token_id=%s role=%s", principal.token_id, principal.role.value)
    return response


@router.post("/signout")
def signout(request: Request, csrf_token: CsrfForm = None) -> Response:
    user = require_user(request)
    if not csrf_matches(user.csrf, csrf_token):
        raise Refused(403, "the sign-out form's security token is missing; reload and try again")
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# --- catalog ------------------------------------------------------------------------------------


@router.get("/subjects")
def subjects_page(request: Request, db: SessionDep) -> Response:
    require_user(request)
    return render(request, "subjects.html", {"rows": queries.subjects_overview(db)})


@router.get("/arrays")
def arrays_page(request: Request, db: SessionDep) -> Response:
    require_user(request)
    return render(request, "arrays.html", {"rows": queries.arrays_overview(db)})


@router.get("/rigs")
def rigs_page(request: Request, db: SessionDep) -> Response:
    require_user(request)
    return render(request, "rigs.html", {"rows": queries.rigs_overview(db)})


# --- sessions -----------------------------------------------------------------------------------


def _month(value: str | None) -> tuple[int, int]:
    if value and re.fullmatch(r"\d{4}-\d{2}", value):
        year, month = int(value[:4]), int(value[5:])
        if 1 <= month <= 12 and 1970 <= year <= 9999:
            return year, month
    today = date.today()
    return today.year, today.month


@router.get("/sessions")
def sessions_page(
    request: Request, db: SessionDep, month: Annotated[str | None, Query(max_length=7)] = None
) -> Response:
    require_user(request)
    year, mon = _month(month)
    prev_month = f"{year - 1}-12" if mon == 1 else f"{year}-{mon - 1:02d}"
    next_month = f"{year + 1}-01" if mon == 12 else f"{year}-{mon + 1:02d}"
    return render(
        request,
        "sessions.html",
        {
            "rows": queries.session_rows(db),
            "weeks": queries.month_calendar(db, year, mon),
            "month_label": date(year, mon, 1).strftime("%B %Y"),
            "prev_month": prev_month,
            "next_month": next_month,
            "choices": queries.form_choices(db),
            "today": date.today().isoformat(),
            "block_rows": 3,
        },
    )


def _number(value: str, name: str, cast: type[float] | type[int]) -> float | int | None:
    value = value.strip()
    if not value:
        return None
    try:
        return cast(value)
    except ValueError:
        raise PopcontrolError(f"{name} must be a number, got {value!r}") from None


def _session_create(
    subject_id: str,
    rig: str,
    scheduled_date: str,
    notes: str,
    protocol_fields: dict[str, str],
    block_sets: list[str],
    block_reps: list[str],
) -> SessionCreate:
    blocks = []
    for i, (set_id, reps) in enumerate(zip(block_sets, block_reps, strict=False)):
        if not set_id.strip():
            continue
        if not reps.strip():
            raise PopcontrolError(f"block {i + 1}: give the number of repetitions")
        blocks.append({"stimulus_set_id": set_id.strip(), "repetitions": reps.strip()})
    if not blocks:
        raise PopcontrolError("add at least one block: choose a stimulus set and repetitions")
    protocol = {
        key: value
        for key, value in (
            ("on_ms", _number(protocol_fields["on_ms"], "on (ms)", float)),
            ("off_ms", _number(protocol_fields["off_ms"], "off (ms)", float)),
            (
                "images_per_trial",
                _number(protocol_fields["images_per_trial"], "images per trial", int),
            ),
        )
        if value is not None
    }
    try:
        return SessionCreate.model_validate(
            {
                "subject_id": subject_id,
                "rig": rig,
                "scheduled_date": scheduled_date,
                "notes": notes,
                "protocol": protocol,
                "blocks": blocks,
            }
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise PopcontrolError(f"the session form is not valid: {problems}") from None


@router.post("/sessions")
def schedule_session(
    request: Request,
    db: SessionDep,
    csrf_token: CsrfForm = None,
    subject_id: TextForm = "",
    rig: TextForm = "",
    scheduled_date: TextForm = "",
    notes: TextForm = "",
    on_ms: TextForm = "",
    off_ms: TextForm = "",
    images_per_trial: TextForm = "",
    block_set: Annotated[list[str] | None, Form()] = None,
    block_reps: Annotated[list[str] | None, Form()] = None,
) -> Response:
    require_writer(request, csrf_token)
    try:
        data = _session_create(
            subject_id,
            rig,
            scheduled_date,
            notes,
            {"on_ms": on_ms, "off_ms": off_ms, "images_per_trial": images_per_trial},
            (block_set or [])[:MAX_BLOCK_ROWS],
            (block_reps or [])[:MAX_BLOCK_ROWS],
        )
        session = sessions.schedule_session(db, data)
        db.commit()
    except PopcontrolError as exc:
        db.rollback()
        return redirect(request, "/sessions", exc.detail, "error")
    log.info("dashboard scheduled session=%s blocks=%d", session.id, len(data.blocks))
    return redirect(request, f"/sessions/{session.id}", f"session {session.id} scheduled")


@router.get("/sessions/{session_id}")
def session_page(request: Request, session_id: IdPath, db: SessionDep) -> Response:
    require_user(request)
    session = db.get(RecordingSession, session_id)
    if session is None:
        raise Refused(404, f"session {session_id} does not exist")
    subjects, rigs = queries._names(db)
    return render(
        request,
        "session.html",
        {
            "s": session,
            "subject_name": subjects.get(session.subject_id, "?"),
            "rig_name": rigs.get(session.rig_id, "?"),
            "blocks": queries.block_rows(db, session),
            "actions": [
                a for a, allowed in sessions.TRANSITIONS.items() if session.state in allowed
            ],
        },
    )


@router.post("/sessions/{session_id}/{action}")
def session_action(
    request: Request,
    session_id: IdPath,
    action: str,
    db: SessionDep,
    csrf_token: CsrfForm = None,
    reason: TextForm = "",
) -> Response:
    require_writer(request, csrf_token)
    if action not in sessions.TRANSITIONS:
        raise Refused(404, f"unknown action {action!r}; use start, complete or abort")
    try:
        session = sessions.get_session(db, session_id)
        sessions.transition(db, session, action, reason[:2000])
        db.commit()
    except PopcontrolError as exc:
        db.rollback()
        return redirect(request, f"/sessions/{session_id}", exc.detail, "error")
    log.info("dashboard session=%s action=%s", session_id, action)
    return redirect(request, f"/sessions/{session_id}", f"session {session_id}: {session.state}")


# --- live monitor -------------------------------------------------------------------------------


@dataclass
class LiveCache:
    """Snapshots shared by every viewer of a session for ``LIVE_CACHE_S`` (one query per tick)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    entries: dict[int, tuple[float, dict[str, Any]]] = field(default_factory=dict)


def _live_cache(app: Any) -> LiveCache:
    cache = getattr(app.state, "dashboard_live_cache", None)
    if not isinstance(cache, LiveCache):
        cache = LiveCache()
        app.state.dashboard_live_cache = cache
    return cache


def _snapshot(request: Request, session_id: int, with_labels: bool = False) -> dict[str, Any]:
    cache = _live_cache(request.app)
    if not with_labels:
        with cache.lock:
            hit = cache.entries.get(session_id)
        if hit is not None and time.monotonic() - hit[0] < LIVE_CACHE_S:
            return hit[1]
    status_fn = getattr(request.app.state, "ingest_status", None)
    status = None
    if callable(status_fn):
        try:
            status = status_fn()
        except Exception:  # the monitor must keep running when ingest status fails
            log.exception("ingest status failed")
    with request.app.state.sessionmaker() as db:
        snapshot = queries.live_snapshot(
            db, session_id, ingest_status=status, with_labels=with_labels
        )
    if not with_labels:
        with cache.lock:
            cache.entries[session_id] = (time.monotonic(), snapshot)
    return snapshot


@router.get("/sessions/{session_id}/live")
def live_page(request: Request, session_id: IdPath, db: SessionDep) -> Response:
    require_user(request)
    session = db.get(RecordingSession, session_id)
    if session is None:
        raise Refused(404, f"session {session_id} does not exist")
    db.close()
    snapshot = _snapshot(request, session_id, with_labels=True)
    return render(request, "live.html", {"s": session, "snap": snapshot})


@router.get("/sessions/{session_id}/live/stream")
async def live_stream(
    request: Request,
    session_id: IdPath,
    max_events: Annotated[int, Query(ge=1, le=86_400)] = 86_400,
) -> Response:
    """Server-sent events: one ``snapshot`` a second while the session is scheduled or running."""
    require_user(request)
    first = await anyio.to_thread.run_sync(_snapshot, request, session_id)
    if "error" in first:
        raise Refused(404, first["error"])

    async def events() -> AsyncIterator[str]:
        snap = first
        sent = 0
        yield "retry: 2000\n\n"
        while True:
            yield f"event: snapshot\ndata: {json.dumps(snap, separators=(',', ':'))}\n\n"
            sent += 1
            live = snap.get("state") in (SessionState.scheduled.value, SessionState.running.value)
            if not live or sent >= max_events:
                return
            await asyncio.sleep(LIVE_INTERVAL_S)
            if await request.is_disconnected():
                return
            snap = await anyio.to_thread.run_sync(_snapshot, request, session_id)

    return _event_stream(events())


def _event_stream(body: AsyncIterator[str]) -> Response:
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# --- models, synthesis, loop --------------------------------------------------------------------


@router.get("/models")
def models_page(request: Request, db: SessionDep) -> Response:
    require_user(request)
    return render(request, "models.html", {"rows": queries.model_rows(db)})


@router.get("/models/{model_id}")
def model_page(request: Request, model_id: IdPath, db: SessionDep) -> Response:
    require_user(request)
    model = db.get(NeuronModel, model_id)
    if model is None:
        raise Refused(404, f"model {model_id} does not exist")
    metrics = model.metrics or {}
    sites = queries.model_sites(metrics)
    labels = queries.site_labels(db, (int(s["site_id"]) for s in sites))
    masks: list[dict[str, Any]] = []
    for s in sites:
        arr = queries.rf_mask(s.get("rf_mask"))
        if arr is not None and len(masks) < 96:
            label = labels.get(int(s["site_id"]), str(s["site_id"]))
            masks.append({"label": label, "svg": svg.mask(arr, title=label)})
    scatter_data = metrics.get("scatter")
    if not isinstance(scatter_data, dict):
        scatter_data = {}
    pred = scatter_data.get("pred") or []
    meas = scatter_data.get("meas") or []
    subject = db.get(Subject, model.subject_id)
    units = f" ({metrics['units']})" if isinstance(metrics.get("units"), str) else ""
    return render(
        request,
        "model.html",
        {
            "m": model,
            "subject_name": subject.name if subject else "?",
            "sites": sites,
            "labels": labels,
            "n_reliable": sum(1 for s in sites if s.get("reliable")),
            "has_stability": any("unstable" in s for s in sites),
            "ncev_hist": svg.histogram(
                [queries.finite(s.get("ncev")) for s in sites],
                label="noise-corrected EV",
                value_range=(0.0, 1.0),
            ),
            "ncev_vs_ceiling": svg.scatter(
                [queries.finite(s.get("ceiling")) for s in sites],
                [queries.finite(s.get("ncev")) for s in sites],
                x_label="reliability (split-half, Spearman–Brown)",
                y_label="noise-corrected EV",
                diagonal=False,
            ),
            "scatter": svg.scatter(
                [queries.finite(v) for v in pred],
                [queries.finite(v) for v in meas],
                x_label=f"predicted{units}",
                y_label=f"measured{units}",
            ),
            "masks": masks,
            "summary": {
                k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool)
            },
        },
    )


@router.get("/synthesis")
def synthesis_page(
    request: Request,
    db: SessionDep,
    model_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> Response:
    require_user(request)
    groups = queries.gallery(db, model_id)
    images = [img for g in groups for img in g["images"]]
    shown = [img for img in images if img["measured"] is not None]
    return render(
        request,
        "synthesis.html",
        {
            "groups": groups,
            "model_id": model_id,
            "n_images": len(images),
            "n_shown": len(shown),
            "scatter": svg.scatter(
                [img["predicted"] for img in shown],
                [img["measured"] for img in shown],
                x_label="predicted (model units)",
                y_label="measured (spikes / presentation)",
                diagonal=False,
            ),
        },
    )


@router.get("/loop")
def loop_page(
    request: Request,
    db: SessionDep,
    subject_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> Response:
    require_user(request)
    overview = queries.loop_overview(db, subject_id)
    days = overview["days"]
    labels = [f"{d['day'].isoformat()}" for d in days]
    return render(
        request,
        "loop.html",
        {
            "overview": overview,
            "subjects": queries.subjects_overview(db),
            "subject_id": subject_id,
            "stretch_plot": svg.lines(
                labels,
                {"median stretch ratio": [d["stretch_ratio_median"] for d in days]},
                reference=1.0,
            ),
            "fraction_plot": svg.lines(
                labels,
                {
                    "stretch success": [d["stretch_success_fraction"] for d in days],
                    "one-hot improved": [d["onehot_improved_fraction"] for d in days],
                },
                y_range=(0.0, 1.0),
            ),
        },
    )


# --- jobs ---------------------------------------------------------------------------------------


@router.get("/jobs")
def jobs_page(request: Request, db: SessionDep) -> Response:
    require_user(request)
    return render(request, "jobs.html", {"jobs": queries.job_rows(db), "states": JobState})


@router.get("/jobs/table")
def jobs_table(request: Request, db: SessionDep) -> Response:
    require_user(request)
    return render(request, "jobs_table.html", {"jobs": queries.job_rows(db), "states": JobState})


@router.post("/jobs/{job_id}/{action}")
def job_action(
    request: Request, job_id: IdPath, action: str, db: SessionDep, csrf_token: CsrfForm = None
) -> Response:
    user = require_writer(request, csrf_token)
    try:
        if action == "cancel":
            queue.cancel(db, job_id, reason=f"from the dashboard ({user.name or user.token_id})")
        elif action == "retry":
            queue.retry(db, job_id)
        else:
            raise Refused(404, f"unknown job action {action!r}; use cancel or retry")
        db.commit()
    except PopcontrolError as exc:
        db.rollback()
        return redirect(request, "/jobs", exc.detail, "error")
    log.info("dashboard job=%s action=%s", job_id, action)
    return redirect(request, "/jobs", f"job {job_id}: {action} done")


# --- static -------------------------------------------------------------------------------------


@router.get("/static/{name}")
def static_file(name: str) -> Response:
    if not STATIC_NAME.match(name) or not (STATIC_DIR / name).is_file():
        return HTMLResponse("not found", status_code=404)
    media = "text/css" if name.endswith(".css") else "text/javascript"
    return FileResponse(
        STATIC_DIR / name, media_type=media, headers={"Cache-Control": "max-age=300"}
    )

"""Dashboard pages over the real app and database: sign-in, CSRF, viewer refusal, forms, SSE."""

from __future__ import annotations

import json
import re
from datetime import date

import numpy as np
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from server.config import Settings
from server.db.models import ApiToken, Job, JobState, Presentation, RecordingSession, SessionState
from server.db.session import engine_for, make_sessionmaker, transaction
from tests.server.dashboard.conftest import csrf_of, sign_in
from tests.server.dashboard.seed import Lab


def _db(settings: Settings):  # type: ignore[no-untyped-def]
    return transaction(make_sessionmaker(engine_for(settings)))


def _job_state(settings: Settings, job_id: int) -> str:
    with _db(settings) as db:
        return str(db.get(Job, job_id).state)  # type: ignore[union-attr]


def _session_count(settings: Settings) -> int:
    with _db(settings) as db:
        return int(db.scalar(select(func.count()).select_from(RecordingSession)) or 0)


def test_pages_need_sign_in(client: TestClient, lab: Lab) -> None:
    for path in (
        "/sessions",
        f"/models/{lab.model_id}",
        "/jobs",
        f"/sessions/{lab.session_id}/live",
    ):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 303, (path, r.status_code)
        assert r.headers["location"].startswith("/signin?next=")
    assert client.get("/", follow_redirects=False).headers["location"] == "/signin"


def test_every_page_renders_for_an_operator(
    client: TestClient, tokens: dict[str, str], lab: Lab
) -> None:
    sign_in(client, tokens["operator"])
    pages = {
        "/sessions": ['id="calendar"', 'id="schedule-form"', f'data-session="{lab.session_id}"'],
        "/subjects": ["monkey-0"],
        "/arrays": ["V4-a0"],
        "/rigs": ["rig-a"],
        f"/sessions/{lab.session_id}": ["natural-0", "synthetic-0", 'id="blocks"'],
        f"/sessions/{lab.session_id}/live": ['id="heatmap"', 'id="initial-snapshot"'],
        "/models": [f'href="/models/{lab.model_id}"'],
        f"/models/{lab.model_id}": [
            'id="model-sites"',
            'id="masks"',
            "<circle",
            "V4-a0-000",
            "stable across days",
            "predicted (z",
        ],
        "/synthesis": [f"/api/v1/stimuli/{lab.synthetic_ids[0]}/image", "stretch", "one-hot"],
        f"/synthesis?model_id={lab.model_id}": [lab.synthetic_ids[-1]],
        "/loop": ['id="loop-days"', 'id="loop-sites"', "<polyline"],
        "/jobs": ['class="bar-inner"', f'id="cancel-{lab.job_ids["queued"]}"'],
    }
    for path, needles in pages.items():
        r = client.get(path)
        assert r.status_code == 200, (path, r.text[:500])
        for needle in needles:
            assert needle in r.text, (path, needle)
    # the gallery's images load through the API with the cookie alone (a safe method)
    image = client.get(f"/api/v1/stimuli/{lab.synthetic_ids[0]}/image")
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"


def test_sign_in_refuses_bad_tokens_and_machine_roles(
    client: TestClient, tokens: dict[str, str]
) -> None:
    page = client.get("/signin")
    csrf = csrf_of(page.text)
    for token, message in (
        ("pc_not-a-token", "unknown or revoked token"),
        (tokens["rig"], "a rig token cannot sign in"),
        (tokens["worker"], "a worker token cannot sign in"),
    ):
        r = client.post(
            "/signin", data={"token": token, "csrf_token": csrf}, follow_redirects=False
        )
        assert r.status_code == 401, r.text
        assert message in r.text
    assert client.get("/sessions", follow_redirects=False).status_code == 303


def test_sign_in_form_needs_its_csrf_token(client: TestClient, tokens: dict[str, str]) -> None:
    client.get("/signin")
    r = client.post("/signin", data={"token": tokens["operator"]}, follow_redirects=False)
    assert r.status_code == 403
    assert "security token" in r.text
    assert client.get("/sessions", follow_redirects=False).status_code == 303


def test_sign_in_redirects_only_inside_the_dashboard(
    client: TestClient, tokens: dict[str, str]
) -> None:
    csrf = csrf_of(client.get("/signin").text)
    r = client.post(
        "/signin",
        data={"token": tokens["viewer"], "csrf_token": csrf, "next": "//evil.example/x"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/sessions"


def test_post_without_or_with_a_wrong_csrf_token_is_refused(
    client: TestClient, settings: Settings, tokens: dict[str, str], lab: Lab
) -> None:
    sign_in(client, tokens["operator"])
    queued = lab.job_ids["queued"]
    for data in ({}, {"csrf_token": "forged"}):
        r = client.post(f"/jobs/{queued}/cancel", data=data, follow_redirects=False)
        assert r.status_code == 403, r.text
        assert "security token" in r.text
    assert _job_state(settings, queued) == JobState.queued.value
    before = _session_count(settings)
    r = client.post(
        "/sessions",
        data={
            "subject_id": lab.subject_id,
            "rig": "rig-a",
            "scheduled_date": "2026-12-01",
            "block_set": lab.natural_set_id,
            "block_reps": 2,
        },
        follow_redirects=False,
    )
    assert r.status_code == 403
    assert _session_count(settings) == before


def test_viewer_sees_everything_and_changes_nothing(
    client: TestClient, settings: Settings, tokens: dict[str, str], lab: Lab
) -> None:
    csrf = sign_in(client, tokens["viewer"])
    sessions_page = client.get("/sessions").text
    assert 'id="schedule-form"' not in sessions_page
    assert f'data-session="{lab.session_id}"' in sessions_page
    assert "cancel-" not in client.get("/jobs").text
    assert client.get(f"/models/{lab.model_id}").status_code == 200
    queued, failed = lab.job_ids["queued"], lab.job_ids["failed"]
    r = client.post(f"/jobs/{queued}/cancel", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 403 and "viewer" in r.text
    r = client.post(f"/jobs/{failed}/retry", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 403
    before = _session_count(settings)
    r = client.post(
        "/sessions",
        data={
            "csrf_token": csrf,
            "subject_id": lab.subject_id,
            "rig": "rig-a",
            "scheduled_date": "2026-12-01",
            "block_set": lab.natural_set_id,
            "block_reps": 2,
        },
        follow_redirects=False,
    )
    assert r.status_code == 403
    r = client.post(f"/sessions/{lab.evaluation_session_ids[0]}/abort", data={"csrf_token": csrf})
    assert r.status_code == 403
    assert _session_count(settings) == before
    assert _job_state(settings, queued) == JobState.queued.value
    assert _job_state(settings, failed) == JobState.failed.value
    # the API does not take the cookie as a write credential either
    r = client.post("/api/v1/subjects", json={"name": "x"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 403


def test_operator_schedules_starts_and_completes_through_forms(
    client: TestClient, settings: Settings, tokens: dict[str, str], lab: Lab
) -> None:
    csrf = sign_in(client, tokens["operator"])
    r = client.post(
        "/sessions",
        data={
            "csrf_token": csrf,
            "subject_id": str(lab.subject_id),
            "rig": "rig-a",
            "scheduled_date": "2026-12-01",
            "on_ms": "120",
            "off_ms": "",
            "images_per_trial": "6",
            "notes": "form test",
            "block_set": [str(lab.natural_set_id), "", str(lab.synthetic_set_id)],
            "block_reps": ["3", "", "5"],
        },
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    session_id = int(r.headers["location"].rsplit("/", 1)[1])
    page = client.get(f"/sessions/{session_id}")
    assert f"session {session_id} scheduled" in page.text
    with _db(settings) as db:
        session = db.get(RecordingSession, session_id)
        assert session is not None
        assert session.scheduled_date == date(2026, 12, 1)
        assert session.protocol["on_ms"] == 120.0 and session.protocol["images_per_trial"] == 6
        assert [(b.stimulus_set_id, b.repetitions) for b in session.blocks] == [
            (lab.natural_set_id, 3),
            (lab.synthetic_set_id, 5),
        ]
    assert (
        client.post(f"/sessions/{session_id}/start", data={"csrf_token": csrf}).status_code == 200
    )
    r = client.post(f"/sessions/{session_id}/start", data={"csrf_token": csrf})
    assert "cannot start" in r.text  # a domain error comes back as a message on the page
    r = client.post(f"/sessions/{session_id}/complete", data={"csrf_token": csrf})
    assert 'id="session-state">completed' in r.text
    # a form that makes no session says why
    r = client.post(
        "/sessions",
        data={
            "csrf_token": csrf,
            "subject_id": str(lab.subject_id),
            "rig": "rig-a",
            "scheduled_date": "2026-12-01",
            "block_set": [""],
            "block_reps": [""],
        },
    )
    assert "add at least one block" in r.text


def test_jobs_cancel_and_retry(
    client: TestClient, settings: Settings, tokens: dict[str, str], lab: Lab
) -> None:
    csrf = sign_in(client, tokens["operator"])
    running, failed = lab.job_ids["running"], lab.job_ids["failed"]
    r = client.post(f"/jobs/{running}/cancel", data={"csrf_token": csrf})
    assert r.status_code == 200 and f"job {running}: cancel done" in r.text
    assert _job_state(settings, running) == JobState.cancelled.value
    client.post(f"/jobs/{failed}/retry", data={"csrf_token": csrf})
    with _db(settings) as db:
        job = db.get(Job, failed)
        assert job is not None and job.state == JobState.queued.value and job.error is None
    r = client.post(f"/jobs/{lab.job_ids['succeeded']}/cancel", data={"csrf_token": csrf})
    assert "only a queued or running job can be cancelled" in r.text


def test_cookie_reads_the_api_and_writes_only_with_the_csrf_header(
    client: TestClient, tokens: dict[str, str], lab: Lab
) -> None:
    csrf = sign_in(client, tokens["operator"])
    assert client.get("/api/v1/sessions").status_code == 200
    assert client.post("/api/v1/subjects", json={"name": "via-cookie"}).status_code == 401
    r = client.post("/api/v1/subjects", json={"name": "via-cookie"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201, r.text


def test_revoked_token_and_tampered_cookie_sign_out(
    client: TestClient, settings: Settings, tokens: dict[str, str], lab: Lab
) -> None:
    sign_in(client, tokens["operator"])
    cookie = client.cookies.get("pc_session")
    assert cookie
    client.cookies.set("pc_session", cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB"))
    assert client.get("/sessions", follow_redirects=False).status_code == 303
    client.cookies.set("pc_session", cookie)
    assert client.get("/sessions", follow_redirects=False).status_code == 200
    with _db(settings) as db:
        db.execute(update(ApiToken).where(ApiToken.role == "operator").values(revoked=True))
    assert client.get("/sessions", follow_redirects=False).status_code == 303


def _events(text: str) -> list[dict[str, object]]:
    return [json.loads(m) for m in re.findall(r"^data: (.*)$", text, flags=re.MULTILINE)]


def test_live_stream_reports_what_the_database_holds(
    client: TestClient, settings: Settings, tokens: dict[str, str], lab: Lab
) -> None:
    sign_in(client, tokens["operator"])
    with client.stream("GET", f"/sessions/{lab.session_id}/live/stream") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        body = "".join(r.iter_text())
    events = _events(body)
    assert len(events) == 1  # the session is completed: one snapshot, then the stream ends
    snap = events[0]
    with _db(settings) as db:
        rows = db.execute(
            select(
                Presentation.valid,
                Presentation.invalid_reason,
                Presentation.fixation_ok,
                Presentation.dropped_frames,
                Presentation.block_id,
                Presentation.trial_index,
                Presentation.spike_counts,
            ).where(Presentation.session_id == lab.session_id)
        ).all()
    valid = [r for r in rows if r.valid]
    assert snap["presentations"] == len(rows) and snap["valid"] == len(valid)
    reasons: dict[str, int] = {}
    for r in rows:
        if not r.valid:
            reasons[r.invalid_reason] = reasons.get(r.invalid_reason, 0) + 1
    assert snap["invalid_by_reason"] == reasons
    assert snap["trials"] == len({(r.block_id, r.trial_index) for r in rows})
    assert snap["fixation_rate"] == sum(r.fixation_ok for r in rows) / len(rows)
    assert snap["dropped_frames"] == sum(r.dropped_frames for r in rows)
    expected = np.stack([np.frombuffer(r.spike_counts, "<u2") for r in valid]).mean(axis=0)
    heat = snap["heatmap"]
    assert isinstance(heat, dict) and heat["window"] == len(valid)
    np.testing.assert_allclose(heat["mean_counts"], expected, atol=1e-3)
    assert snap["psth"], "seeded rasters give PSTHs"


def test_live_stream_keeps_going_while_the_session_runs(
    client: TestClient, settings: Settings, tokens: dict[str, str], lab: Lab
) -> None:
    sign_in(client, tokens["operator"])
    with _db(settings) as db:
        db.execute(
            update(RecordingSession)
            .where(RecordingSession.id == lab.session_id)
            .values(state=SessionState.running.value)
        )
    with client.stream("GET", f"/sessions/{lab.session_id}/live/stream?max_events=2") as r:
        events = _events("".join(r.iter_text()))
    assert [e["state"] for e in events] == ["running", "running"]

"""The dashboard in a real browser: Debian's Chromium driven by Playwright against a live uvicorn.

One server and one browser for the module (a SQLite database seeded with a lab: 3 arrays × 96
sites, a model, synthetic images, evaluations, jobs); each test opens its own browser context.
Presentations for the live monitor travel the real ingest path while the page is open: records
in a rig spool, sent by the rig's delivery client over ZeroMQ (loopback, no CurveZMQ) to the
server's ingest, which stores them. Screenshots go to ``test-output/dashboard/``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from sqlalchemy import func, select

from rig import protocol
from rig.delivery import Delivery, DeliveryConfig
from rig.spool import Spool
from server.app import create_app
from server.auth.tokens import create_token
from server.config import Settings
from server.db.models import Job, JobState, RecordingSession, SessionState
from server.db.session import engine_for, make_sessionmaker, transaction, upgrade
from server.sessions import service as sessions
from server.sessions.schemas import BlockCreate, SessionCreate
from server.stimuli.blobs import BlobStore
from tests.conftest import require_component
from tests.server.dashboard.seed import Lab, seed_lab

CHROMIUM = Path(os.environ.get("POPCONTROL_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = Path(__file__).resolve().parents[3] / "test-output" / "dashboard"
TIMEOUT_MS = 15_000

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright

    HAVE_PLAYWRIGHT = True
except ImportError:  # pragma: no cover - the dev extra installs it
    HAVE_PLAYWRIGHT = False


@dataclass(frozen=True)
class LiveServer:
    url: str
    settings: Settings
    lab: Lab
    tokens: dict[str, str]
    live_session_id: int  # running on rig-b, for the live monitor
    live_block_id: int
    ingest_endpoint: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    require_component(
        "Chromium", CHROMIUM.is_file(), "install Debian's chromium (bash scripts/system-deps.sh)"
    )
    require_component(
        "playwright", HAVE_PLAYWRIGHT, "install the dev extra: pip install -e '.[dev]'"
    )
    import uvicorn

    root = tmp_path_factory.mktemp("dashboard-browser")
    url = f"sqlite:///{root / 'popcontrol.db'}"
    upgrade(url)
    ingest_port = _free_port()
    settings = Settings(
        data_dir=root / "data",
        database_url=url,
        ingest_enabled=True,
        ingest_insecure=True,  # loopback only
        ingest_bind=f"tcp://127.0.0.1:{ingest_port}",
        _env_file=None,
    )
    engine = engine_for(settings)
    with transaction(make_sessionmaker(engine)) as db:
        lab = seed_lab(
            db,
            BlobStore(settings.resolved_blob_dir),
            n_arrays=3,
            sites_per_array=96,
            n_natural=16,
            n_synthetic=12,
            n_presentations=1500,
            n_days=4,
        )
        tokens = {
            role: create_token(db, role, name=f"{role} user") for role in ("operator", "viewer")
        }
        from server.db.models import Rig

        db.add(Rig(name="rig-b", description="second rig"))
        db.flush()
        live = sessions.schedule_session(
            db,
            SessionCreate(
                subject_id=lab.subject_id,
                rig="rig-b",
                scheduled_date=date.today(),
                blocks=[BlockCreate(stimulus_set_id=lab.natural_set_id, repetitions=4)],
            ),
        )
        sessions.transition(db, live, "start")
        live_id, live_block_id = live.id, live.blocks[0].id
    engine.dispose()

    port = _free_port()
    app = create_app(settings, ingest=True)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, name="uvicorn-dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert thread.is_alive(), "uvicorn stopped while starting; see the log above"
        assert time.monotonic() < deadline, "uvicorn did not start within 20 s"
        time.sleep(0.05)
    try:
        yield LiveServer(
            f"http://127.0.0.1:{port}",
            settings,
            lab,
            tokens,
            live_id,
            live_block_id,
            f"tcp://127.0.0.1:{ingest_port}",
        )
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(server: LiveServer) -> Iterator[Browser]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _page(browser: Browser) -> Page:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    return context.new_page()


def _sign_in(page: Page, server: LiveServer, role: str) -> None:
    page.goto(f"{server.url}/signin")
    page.fill("#token", server.tokens[role])
    page.click("#signin-form button[type=submit]")
    expect(page).to_have_url(f"{server.url}/sessions")
    expect(page.locator("#role")).to_have_text(role)


def test_operator_signs_in_schedules_and_starts_a_session(
    server: LiveServer, browser: Browser
) -> None:
    page = _page(browser)
    page.goto(f"{server.url}/sessions")
    expect(page).to_have_url(f"{server.url}/signin?next=/sessions")
    page.fill("#token", "pc_wrong")
    page.click("#signin-form button[type=submit]")
    expect(page.locator("#signin-error")).to_contain_text("unknown or revoked token")
    _sign_in(page, server, "operator")
    page.screenshot(path=str(SHOTS / "01-sessions-calendar-and-form.png"), full_page=True)

    lab = server.lab
    form = page.locator("#schedule-form")
    form.locator("select[name=subject_id]").select_option(str(lab.subject_id))
    form.locator("select[name=rig]").select_option("rig-a")
    form.locator("input[name=scheduled_date]").fill("2026-12-02")
    form.locator("input[name=on_ms]").fill("100")
    page.click("#add-block")
    expect(form.locator(".block-row")).to_have_count(4)
    rows = form.locator(".block-row")
    rows.nth(0).locator("select").select_option(str(lab.natural_set_id))
    rows.nth(0).locator("input").fill("3")
    rows.nth(3).locator("select").select_option(str(lab.synthetic_set_id))
    rows.nth(3).locator("input").fill("2")
    form.locator("input[name=notes]").fill("scheduled from the browser")
    page.click("#schedule-submit")
    expect(page.locator("#flash")).to_contain_text("scheduled")
    expect(page.locator("#session-state")).to_have_text("scheduled")
    expect(page.locator("#blocks tbody tr")).to_have_count(2)
    session_id = int(page.url.rsplit("/", 1)[1])
    page.click("#action-start")
    expect(page.locator("#session-state")).to_have_text("running")
    page.screenshot(path=str(SHOTS / "02-session-started.png"), full_page=True)

    engine = engine_for(server.settings)
    with transaction(make_sessionmaker(engine)) as db:
        session = db.get(RecordingSession, session_id)
        assert session is not None and session.state == SessionState.running.value
        assert session.scheduled_date == date(2026, 12, 2)
        assert [(b.stimulus_set_id, b.repetitions) for b in session.blocks] == [
            (lab.natural_set_id, 3),
            (lab.synthetic_set_id, 2),
        ]
        sessions.transition(db, session, "complete")  # free rig-a for the other tests
    engine.dispose()
    page.context.close()


def _deliver(
    server: LiveServer, spool_path: Path, n_batches: int, batch: int, errors: list[BaseException]
) -> None:
    """The rig's side of the ingest: records go into a real spool, and the real delivery client
    sends them over ZeroMQ to the server's ingest, a trial's worth every 0.25 s."""
    ctx: Any = zmq.Context()
    spool = Spool(spool_path)
    delivery = Delivery(
        ctx, spool, DeliveryConfig(server=server.ingest_endpoint, resend_after_s=1.0)
    )
    try:
        rng = np.random.default_rng(7)
        n_sites = len(server.lab.site_ids)
        rate = rng.uniform(1.0, 8.0, n_sites)  # (sites,)
        next_put, k = time.monotonic(), 0
        deadline = time.monotonic() + 30
        while k < n_batches or spool.depth() > 0:
            assert time.monotonic() < deadline, f"{spool.depth()} records still in the spool"
            if k < n_batches and time.monotonic() >= next_put:
                records = []
                for pos in range(batch):
                    i = k * batch + pos
                    reason = None if i % 4 else ("fixation_break" if i % 8 else "stream_gap")
                    raster = rng.poisson(0.3, (n_sites, 40)).astype("<u2")  # (sites, bins)
                    raster[:, 17:27] += rng.poisson(1.0, (n_sites, 10)).astype("<u2")
                    records.append(
                        protocol.PresentationRecord(
                            rig="rig-b",
                            stream="pres",
                            seq=i,
                            presentation_id=str(uuid.uuid4()),
                            session_id=server.live_session_id,
                            block_id=server.live_block_id,
                            stimulus_id=server.lab.natural_ids[i % len(server.lab.natural_ids)],
                            trial_index=k,
                            position=pos,
                            onset_sample=30_000 * (i + 1),
                            onset_source="photodiode",
                            fixation_ok=reason != "fixation_break",
                            dropped_frames=0,
                            valid=reason is None,
                            invalid_reason=reason,
                            window_start_ms=70.0,
                            window_end_ms=170.0,
                            spike_counts=rng.poisson(rate).astype("<u2"),
                            raster=raster,
                            raster_bin_ms=10.0,
                            raster_start_ms=-100.0,
                        )
                    )
                spool.put_many([(r.presentation_id, r.encode()) for r in records])
                k += 1
                next_put += 0.25  # the pace of a rig, not a wait for a result
            delivery.socket.poll(50)
            delivery.pump()
    except BaseException as exc:  # reported by the test
        errors.append(exc)
    finally:
        delivery.close()
        spool.close()
        ctx.term()


def test_live_monitor_counts_presentations_as_they_arrive(
    server: LiveServer, browser: Browser, tmp_path: Path
) -> None:
    page = _page(browser)
    _sign_in(page, server, "operator")
    page.goto(f"{server.url}/sessions/{server.live_session_id}/live")
    expect(page.locator("#presentations")).to_have_text("0")
    expect(page.locator("#live-state")).to_have_text("running")
    expect(page.locator("#live-status")).to_contain_text("live")
    n_batches, batch = 12, 8
    errors: list[BaseException] = []
    feeder = threading.Thread(
        target=_deliver,
        args=(server, tmp_path / "spool.db", n_batches, batch, errors),
        daemon=True,
    )
    feeder.start()
    seen: set[int] = set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        seen.add(int(page.locator("#presentations").inner_text()))
        if n_batches * batch in seen:
            break
        page.wait_for_timeout(200)
    feeder.join(timeout=10)
    assert not errors, errors
    assert n_batches * batch in seen, f"the monitor showed {sorted(seen)}"
    assert len(seen - {0, n_batches * batch}) >= 1, "the count should climb while rows arrive"
    expect(page.locator("#trials")).to_have_text(str(n_batches))
    expect(page.locator("#heatmap rect")).to_have_count(len(server.lab.site_ids))
    expect(page.locator("#psth svg").first).to_be_visible()
    invalid = int(page.locator("#invalid").inner_text())
    valid = int(page.locator("#valid").inner_text())
    assert valid + invalid == n_batches * batch and invalid > 0
    expect(page.locator("#invalid-reasons")).to_contain_text("fixation_break")
    expect(page.locator("#invalid-reasons")).to_contain_text("stream_gap")
    expect(page.locator("#ingest")).to_contain_text("stored")
    assert int(page.locator("#live").get_attribute("data-updates") or 0) >= 3
    page.screenshot(path=str(SHOTS / "03-live-monitor.png"), full_page=True)
    page.context.close()


def test_model_page_gallery_loop_and_jobs(server: LiveServer, browser: Browser) -> None:
    page = _page(browser)
    _sign_in(page, server, "operator")
    lab = server.lab
    page.goto(f"{server.url}/models/{lab.model_id}")
    expect(page.locator("#model-sites tbody tr")).to_have_count(len(lab.site_ids))
    expect(page.locator("#masks svg.mask")).to_have_count(8)
    assert page.locator("#pred-meas circle").count() == 200
    page.screenshot(path=str(SHOTS / "04-model.png"), full_page=True)

    page.goto(f"{server.url}/synthesis")
    expect(page.locator("figure.synth")).to_have_count(len(lab.synthetic_ids))
    first = page.locator("figure.synth img").first
    first.scroll_into_view_if_needed()
    page.wait_for_function(
        "() => { const i = document.querySelector('figure.synth img'); return i.complete && i.naturalWidth > 0; }"
    )
    expect(page.locator("figure.synth .meas").first).not_to_have_text("not shown")
    page.screenshot(path=str(SHOTS / "05-synthesis-gallery.png"), full_page=True)

    page.goto(f"{server.url}/loop")
    expect(page.locator("#loop-days tbody tr")).to_have_count(4)
    page.screenshot(path=str(SHOTS / "06-loop.png"), full_page=True)

    page.goto(f"{server.url}/jobs")
    running = lab.job_ids["running"]
    page.click(f"#cancel-{running}")
    expect(page.locator("#flash")).to_contain_text(f"job {running}: cancel done")
    expect(page.locator(f"tr[data-job='{running}'] .state")).to_have_text("cancelled")
    page.screenshot(path=str(SHOTS / "07-jobs.png"), full_page=True)
    page.context.close()


def test_viewer_sees_but_cannot_change(server: LiveServer, browser: Browser) -> None:
    page = _page(browser)
    _sign_in(page, server, "viewer")
    expect(page.locator("#schedule-form")).to_have_count(0)
    expect(page.locator(".viewer-note")).to_be_visible()
    page.goto(f"{server.url}/jobs")
    expect(page.locator("#jobs button")).to_have_count(0)
    queued = server.lab.job_ids["queued"]
    engine = engine_for(server.settings)
    factory = make_sessionmaker(engine)
    with transaction(factory) as db:
        n_sessions = db.scalar(select(func.count()).select_from(RecordingSession))
    # the forms are not there; submit one by hand, with the page's own CSRF token
    page.evaluate(
        """(jobId) => {
            const form = document.createElement('form');
            form.method = 'post';
            form.action = '/jobs/' + jobId + '/cancel';
            const field = document.createElement('input');
            field.name = 'csrf_token';
            field.value = document.querySelector('meta[name=csrf-token]').content;
            form.appendChild(field);
            document.body.appendChild(form);
            form.submit();
        }""",
        queued,
    )
    expect(page.locator("#refusal")).to_contain_text("a viewer can look at everything")
    page.screenshot(path=str(SHOTS / "08-viewer-refused.png"), full_page=True)
    page.goto(f"{server.url}/sessions")
    status: Any = page.evaluate(
        """async (subjectId) => {
            const body = new URLSearchParams({
                csrf_token: document.querySelector('meta[name=csrf-token]').content,
                subject_id: String(subjectId), rig: 'rig-a', scheduled_date: '2026-12-03',
                block_set: '1', block_reps: '1'});
            const r = await fetch('/sessions', {method: 'POST', body, redirect: 'manual'});
            return r.status;
        }""",
        server.lab.subject_id,
    )
    assert status == 403
    with transaction(factory) as db:
        job = db.get(Job, queued)
        assert job is not None and job.state == JobState.queued.value
        assert db.scalar(select(func.count()).select_from(RecordingSession)) == n_sessions
    engine.dispose()
    page.context.close()

"""Benchmark: every dashboard page with a day of data (issue 8: each page ≤ 300 ms).

Builds a temporary SQLite database with a day of recording (default 10,000 presentations ×
288 sites, 3 arrays × 96, rasters on 10 % of presentations), 400 natural and 288 synthetic
images, a fitted model per day with per-site metrics and RF masks, ten days of evaluations and
a few hundred jobs; then signs in and times each page through the real app (middleware, cookie
check, queries, templates) with Starlette's TestClient: one warm-up request, then the median of
``--repeats``. Prints a table, then one JSON line with ``max_page_ms``.

    .venv/bin/python bench/dashboard.py            # a day of data
    .venv/bin/python bench/dashboard.py --quick    # 1,000 presentations, for CI
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi.testclient import TestClient
from sqlalchemy import update

from server.app import create_app
from server.auth.tokens import create_token
from server.config import Settings
from server.db.models import Job, JobState, NeuronModel, RecordingSession, SessionState
from server.db.session import engine_for, make_sessionmaker, transaction, upgrade
from server.stimuli.blobs import BlobStore
from tests.server.dashboard.seed import seed_lab

BUDGET_MS = 300.0
CSRF_RE = re.compile(r'name="csrf-token" content="([^"]+)"')


@dataclass(frozen=True)
class Day:
    settings: Settings
    session_id: int
    model_id: int
    operator_token: str


def build(root: Path, n_presentations: int, n_days: int, n_jobs: int) -> Day:
    url = f"sqlite:///{root / 'popcontrol.db'}"
    upgrade(url)
    settings = Settings(
        data_dir=root / "data", database_url=url, ingest_enabled=False, _env_file=None
    )
    engine = engine_for(settings)
    t0 = time.perf_counter()
    with transaction(make_sessionmaker(engine)) as db:
        lab = seed_lab(
            db,
            BlobStore(settings.resolved_blob_dir),
            n_arrays=3,
            sites_per_array=96,
            n_natural=400,
            n_synthetic=288,
            n_presentations=n_presentations,
            n_days=n_days,
            raster_fraction=0.1,
        )
        model = db.get(NeuronModel, lab.model_id)
        assert model is not None
        for _ in range(n_days - 1):  # one refit per day, same size as the first
            db.add(
                NeuronModel(
                    subject_id=model.subject_id,
                    backbone_id=model.backbone_id,
                    weights_sha256=model.weights_sha256,
                    layer=model.layer,
                    readout_kind=model.readout_kind,
                    session_ids=model.session_ids,
                    site_ids=model.site_ids,
                    metrics=model.metrics,
                    params={},
                    artifact_path=model.artifact_path,
                )
            )
        for i in range(n_jobs):
            state = list(JobState)[i % len(JobState)]
            db.add(Job(kind="fit", params={"i": i}, state=state.value, progress=(i % 10) / 10))
        db.execute(
            update(RecordingSession)
            .where(RecordingSession.id == lab.session_id)
            .values(state=SessionState.running.value)
        )
        token = create_token(db, "operator", name="bench")
    engine.dispose()
    print(
        f"built the database in {time.perf_counter() - t0:.1f} s: {n_presentations} presentations "
        f"x {len(lab.site_ids)} sites",
        file=sys.stderr,
    )
    return Day(settings, lab.session_id, lab.model_id, token)


def time_pages(day: Day, repeats: int) -> dict[str, float]:
    app = create_app(day.settings, ingest=False)
    pages = {
        "sessions": "/sessions",
        "subjects": "/subjects",
        "arrays": "/arrays",
        "rigs": "/rigs",
        "session": f"/sessions/{day.session_id}",
        "live page": f"/sessions/{day.session_id}/live",
        "live event (SSE)": f"/sessions/{day.session_id}/live/stream?max_events=1",
        "models": "/models",
        "model": f"/models/{day.model_id}",
        "synthesis": "/synthesis",
        "loop": "/loop",
        "jobs": "/jobs",
    }
    out: dict[str, float] = {}
    with TestClient(app) as client:
        page = client.get("/signin")
        csrf = CSRF_RE.search(page.text)
        assert csrf, "sign-in page without a CSRF token"
        r = client.post(
            "/signin",
            data={"token": day.operator_token, "csrf_token": csrf.group(1)},
            follow_redirects=False,
        )
        assert r.status_code == 303, r.text
        for name, path in pages.items():
            times = []
            for k in range(repeats + 1):
                app.state.dashboard_live_cache = None  # time a fresh snapshot, not a shared one
                t0 = time.perf_counter()
                r = client.get(path)
                elapsed = (time.perf_counter() - t0) * 1000
                assert r.status_code == 200, (path, r.status_code, r.text[:300])
                if k:  # the first request warms caches (templates, SQLite pages)
                    times.append(elapsed)
            out[name] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1,000 presentations (CI)")
    parser.add_argument("--presentations", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n = 1_000 if args.quick else args.presentations
    with tempfile.TemporaryDirectory(prefix="popcontrol-bench-dashboard-") as tmp:
        day = build(Path(tmp), n, n_days=10, n_jobs=300)
        timings = time_pages(day, args.repeats)
    width = max(len(k) for k in timings)
    print(
        f"{'page':<{width}}  median ms  (budget {BUDGET_MS:.0f} ms; {args.repeats} requests each)"
    )
    for name, ms in timings.items():
        flag = "" if ms <= BUDGET_MS else "  OVER BUDGET"
        print(f"{name:<{width}}  {ms:9.1f}{flag}")
    worst = max(timings, key=lambda k: timings[k])
    print(
        json.dumps(
            {
                "benchmark": "dashboard",
                "presentations": n,
                "sites": 288,
                "repeats": args.repeats,
                "max_page_ms": round(timings[worst], 1),
                "slowest_page": worst,
                "budget_ms": BUDGET_MS,
                "within_budget": timings[worst] <= BUDGET_MS,
                "pages_ms": {k: round(v, 1) for k, v in timings.items()},
            }
        )
    )


if __name__ == "__main__":
    main()

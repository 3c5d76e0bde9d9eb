"""Shared fixtures: real databases (SQLite always, PostgreSQL when configured), the real app.

PostgreSQL: set POPCONTROL_TEST_POSTGRES_URL (``.ci/run`` does); every test then runs once per
database, each PostgreSQL test in its own fresh schema. With POPCONTROL_CI=1 a component a test
needs (PostgreSQL, Xvfb, PsychoPy, Chromium, ...) that is missing fails the test instead of
skipping it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from server.app import create_app
from server.config import Settings
from server.db.session import engine_for, make_sessionmaker, transaction, upgrade

IN_CI = os.environ.get("POPCONTROL_CI") == "1"
POSTGRES_URL = os.environ.get("POPCONTROL_TEST_POSTGRES_URL", "")


def require_component(name: str, available: bool, how_to_fix: str = "") -> None:
    """Skip locally, fail under POPCONTROL_CI=1, when a component a test needs is missing."""
    if available:
        return
    message = f"{name} is not available" + (f": {how_to_fix}" if how_to_fix else "")
    if IN_CI:
        pytest.fail(message + " (POPCONTROL_CI=1: missing components fail, not skip)")
    pytest.skip(message)


def _database_params() -> list[str]:
    params = ["sqlite"]
    if POSTGRES_URL or IN_CI:
        params.append("postgres")
    return params


@pytest.fixture(params=_database_params())
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database: a SQLite file, or a fresh schema in PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'popcontrol.db'}"
        upgrade(url)
        yield url
        return
    require_component(
        "PostgreSQL", bool(POSTGRES_URL), "set POPCONTROL_TEST_POSTGRES_URL=postgresql+psycopg://…"
    )
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:
        admin.dispose()
        require_component("PostgreSQL", False, f"cannot reach {POSTGRES_URL}: {exc}")
    sep = "&" if "?" in POSTGRES_URL else "?"
    url = f"{POSTGRES_URL}{sep}options={quote(f'-csearch_path={schema}')}"
    upgrade(url)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        ingest_enabled=False,
        _env_file=None,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings, ingest=False)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def tokens(settings: Settings, client: TestClient) -> dict[str, str]:
    """One token per role; the rig token belongs to rig ``rig-a`` (created here)."""
    from server.auth.tokens import create_token
    from server.db.models import Rig

    engine = engine_for(settings)
    with transaction(make_sessionmaker(engine)) as db:
        db.add(Rig(name="rig-a", description=""))
        db.add(Rig(name="rig-b", description=""))
        db.flush()
        out = {role: create_token(db, role) for role in ("operator", "worker", "viewer")}
        out["rig"] = create_token(db, "rig", "rig-a")
        out["rig-b"] = create_token(db, "rig", "rig-b")
    engine.dispose()
    return out


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under POPCONTROL_CI=1 a skipped test fails the run: CI must exercise every component."""
    if not IN_CI:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter is not None:
            reporter.write_line(
                f"POPCONTROL_CI=1: {len(skipped)} test(s) skipped; in CI a skip is a failure",
                red=True,
            )

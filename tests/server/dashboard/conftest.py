"""Fixtures for the dashboard tests: a seeded lab in the test database, signed-in clients."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from server.config import Settings
from server.db.session import engine_for, make_sessionmaker, transaction
from server.stimuli.blobs import BlobStore
from tests.server.dashboard.seed import Lab, seed_lab

CSRF_RE = re.compile(r'name="csrf-token" content="([^"]+)"')


@pytest.fixture
def lab(settings: Settings, client: TestClient, tokens: dict[str, str]) -> Lab:
    engine = engine_for(settings)
    try:
        with transaction(make_sessionmaker(engine)) as db:
            return seed_lab(db, BlobStore(settings.resolved_blob_dir))
    finally:
        engine.dispose()


def csrf_of(html: str) -> str:
    match = CSRF_RE.search(html)
    assert match, "the page carries no csrf-token meta tag"
    return match.group(1)


def sign_in(client: TestClient, token: str) -> str:
    """Sign the client in through the form; return the session's CSRF token."""
    page = client.get("/signin")
    assert page.status_code == 200, page.text
    r = client.post(
        "/signin",
        data={"token": token, "csrf_token": csrf_of(page.text), "next": "/sessions"},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/sessions"
    return csrf_of(client.get("/sessions").text)

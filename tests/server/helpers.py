"""Small builders for API tests: images, a subject with an array, a stimulus set, a session."""

from __future__ import annotations

import io
from datetime import date
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import auth


def png_bytes(seed: int, size: int = 32, mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def upload(client: TestClient, token: str, data: bytes, content_type: str = "image/png") -> Any:
    return client.post(
        "/api/v1/stimuli",
        files={"file": ("img.png", data, content_type)},
        headers=auth(token),
    )


def make_subject_with_array(client: TestClient, token: str, n_channels: int = 4) -> int:
    r = client.post("/api/v1/subjects", json={"name": "monkey-m"}, headers=auth(token))
    assert r.status_code == 201, r.text
    subject_id = int(r.json()["id"])
    r = client.post(
        "/api/v1/arrays",
        json={"subject_id": subject_id, "name": "V4-a", "n_channels": n_channels},
        headers=auth(token),
    )
    assert r.status_code == 201, r.text
    return subject_id


def make_set(
    client: TestClient, token: str, n: int, seed0: int, name: str
) -> tuple[int, list[str]]:
    ids = []
    for i in range(n):
        r = upload(client, token, png_bytes(seed0 + i))
        assert r.status_code in (200, 201), r.text
        ids.append(r.json()["id"])
    r = client.post(
        "/api/v1/stimulus-sets", json={"name": name, "stimulus_ids": ids}, headers=auth(token)
    )
    assert r.status_code == 201, r.text
    return int(r.json()["id"]), ids


def schedule(
    client: TestClient,
    token: str,
    subject_id: int,
    blocks: list[dict[str, Any]],
    rig: str = "rig-a",
) -> Any:
    return client.post(
        "/api/v1/sessions",
        json={
            "subject_id": subject_id,
            "rig": rig,
            "scheduled_date": date(2026, 11, 28).isoformat(),
            "blocks": blocks,
        },
        headers=auth(token),
    )

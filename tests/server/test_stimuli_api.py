"""Uploads: dedup, canonical PNG ids, and every bad upload refused with nothing stored."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from server.config import Settings
from tests.conftest import auth
from tests.server.helpers import png_bytes, upload


def _blob_files(settings: Settings) -> list[Path]:
    root = settings.resolved_blob_dir
    return [p for p in root.rglob("*.png")] if root.exists() else []


def test_upload_dedups_and_serves_canonical_png(
    client: TestClient, tokens: dict[str, str], settings: Settings
) -> None:
    op = tokens["operator"]
    data = png_bytes(1, 40)
    first = upload(client, op, data)
    assert first.status_code == 201, first.text
    second = upload(client, op, data)
    assert second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    assert len(_blob_files(settings)) == 1
    # The same pixels as JPEG-free re-encoded PNG (different compression) give the same id.
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, format="PNG", compress_level=1)
    assert upload(client, op, buf.getvalue()).json()["id"] == first.json()["id"]

    sid = first.json()["id"]
    image = client.get(f"/api/v1/stimuli/{sid}/image", headers=auth(tokens["viewer"]))
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert hashlib.sha256(image.content).hexdigest() == sid
    meta = client.get(f"/api/v1/stimuli/{sid}", headers=auth(op)).json()
    assert meta["width_px"] == 40 and meta["mode"] == "L"


def test_jpeg_upload_is_stored_as_png(client: TestClient, tokens: dict[str, str]) -> None:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(buf, format="JPEG")
    r = upload(client, tokens["worker"], buf.getvalue(), "image/jpeg")
    assert r.status_code == 201 and r.json()["mode"] == "RGB" and r.json()["width_px"] == 30


def _assert_refused(r: Any, settings: Settings, needle: str) -> None:
    assert r.status_code == 422, r.text
    assert r.json()["type"] in ("invalid", "validation_error")
    assert needle in r.json()["detail"].lower()
    assert _blob_files(settings) == []


def test_bad_uploads_are_422_and_store_nothing(
    client: TestClient, tokens: dict[str, str], settings: Settings
) -> None:
    op = tokens["operator"]
    good = png_bytes(2, 64)
    _assert_refused(upload(client, op, good[: len(good) // 2]), settings, "not a readable")
    _assert_refused(upload(client, op, b""), settings, "empty")
    _assert_refused(upload(client, op, good, "text/plain"), settings, "content type")
    _assert_refused(
        upload(client, op, b"GIF89a" + b"\0" * 100, "image/png"), settings, "not a readable"
    )
    big = Image.new("L", (10_000, 10_000))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    _assert_refused(upload(client, op, buf.getvalue()), settings, "4096×4096")
    r = client.post("/api/v1/stimuli", headers=auth(op))
    assert r.status_code == 422
    assert client.get("/api/v1/stimuli", headers=auth(op)).json() == []


def test_decompression_bomb_guard(
    client: TestClient, tokens: dict[str, str], settings: Settings
) -> None:
    # A 4000×4000 image is inside the size limit; with a lowered pixel budget it must be refused.
    import PIL.Image

    old = PIL.Image.MAX_IMAGE_PIXELS
    PIL.Image.MAX_IMAGE_PIXELS = 1_000_000
    try:
        buf = io.BytesIO()
        Image.new("L", (4000, 4000)).save(buf, format="PNG")
        _assert_refused(
            upload(client, tokens["operator"], buf.getvalue()), settings, "decompression bomb"
        )
    finally:
        PIL.Image.MAX_IMAGE_PIXELS = old


def test_upload_roles(client: TestClient, tokens: dict[str, str]) -> None:
    assert upload(client, tokens["viewer"], png_bytes(3)).status_code == 403
    assert upload(client, tokens["rig"], png_bytes(3)).status_code == 403
    assert (
        client.get("/api/v1/stimuli/" + "0" * 64, headers=auth(tokens["viewer"])).status_code == 404
    )
    assert (
        client.get("/api/v1/stimuli/not-a-hash", headers=auth(tokens["viewer"])).status_code == 422
    )


def test_stimulus_sets_keep_order(client: TestClient, tokens: dict[str, str]) -> None:
    op = tokens["operator"]
    ids = [upload(client, op, png_bytes(10 + i)).json()["id"] for i in range(3)]
    order = [ids[2], ids[0], ids[1], ids[0]]
    r = client.post(
        "/api/v1/stimulus-sets", json={"name": "n", "stimulus_ids": order}, headers=auth(op)
    )
    assert r.status_code == 201 and r.json()["stimulus_ids"] == order
    got = client.get(f"/api/v1/stimulus-sets/{r.json()['id']}", headers=auth(op)).json()
    assert got["stimulus_ids"] == order
    dup = client.post(
        "/api/v1/stimulus-sets", json={"name": "n", "stimulus_ids": ids}, headers=auth(op)
    )
    assert dup.status_code == 409
    bad = client.post(
        "/api/v1/stimulus-sets", json={"name": "m", "stimulus_ids": ["a" * 64]}, headers=auth(op)
    )
    assert bad.status_code == 422 and "unknown" in bad.json()["detail"]

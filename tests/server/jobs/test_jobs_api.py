"""REST API of the job queue: create, list, get with progress, edit, cancel, retry, roles."""

from __future__ import annotations

from fastapi.testclient import TestClient

from server.config import Settings
from server.db.session import engine_for, make_sessionmaker
from server.jobs import queue
from tests.conftest import auth


def test_create_list_get_cancel_retry(
    client: TestClient, tokens: dict[str, str], settings: Settings
) -> None:
    op = auth(tokens["operator"])
    r = client.post("/api/v1/jobs", json={"kind": "fit", "params": {"sessions": [1]}}, headers=op)
    assert r.status_code == 201, r.text
    fit = r.json()
    assert fit["state"] == "queued" and fit["attempts"] == 0 and fit["progress"] == 0.0
    r = client.post(
        "/api/v1/jobs",
        json={"kind": "synthesize", "depends_on_id": fit["id"], "params": {"max_targets": 8}},
        headers=op,
    )
    synth = r.json()

    r = client.patch(f"/api/v1/jobs/{synth['id']}", json={"params": {"max_targets": 4}}, headers=op)
    assert r.status_code == 200 and r.json()["params"] == {"max_targets": 4}

    engine = engine_for(settings)
    factory = make_sessionmaker(engine)
    claimed = queue.claim_next(factory, "gpu-box:1", ["fit"], 30)
    assert claimed is not None
    queue.renew_lease(factory, claimed.id, "gpu-box:1", 30, progress=0.4, message="fitting 40%")
    engine.dispose()

    viewer = auth(tokens["viewer"])
    got = client.get(f"/api/v1/jobs/{fit['id']}", headers=viewer).json()
    assert got["state"] == "running" and got["progress"] == 0.4
    assert got["progress_message"] == "fitting 40%" and got["lease_owner"] == "gpu-box:1"
    page = client.get("/api/v1/jobs?state=queued", headers=viewer).json()
    assert [j["id"] for j in page["items"]] == [synth["id"]] and page["total"] == 1
    assert client.get("/api/v1/jobs?kind=fit", headers=viewer).json()["total"] == 1

    r = client.post(f"/api/v1/jobs/{fit['id']}/cancel", json={"reason": "wrong day"}, headers=op)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert client.get(f"/api/v1/jobs/{synth['id']}", headers=viewer).json()["state"] == "cancelled"
    r = client.post(f"/api/v1/jobs/{fit['id']}/cancel", headers=op)
    assert r.status_code == 409 and "only a queued or running" in r.json()["detail"]
    r = client.post(f"/api/v1/jobs/{fit['id']}/retry", headers=op)
    assert r.status_code == 200 and r.json()["state"] == "queued" and r.json()["attempts"] == 0
    assert client.get(f"/api/v1/jobs/{synth['id']}", headers=viewer).json()["state"] == "queued"
    r = client.patch(f"/api/v1/jobs/{fit['id']}", json={"params": {}}, headers=op)
    assert r.status_code == 200


def test_roles_and_bad_input(client: TestClient, tokens: dict[str, str]) -> None:
    r = client.post("/api/v1/jobs", json={"kind": "fit"}, headers=auth(tokens["viewer"]))
    assert r.status_code == 403
    r = client.post("/api/v1/jobs", json={"kind": "train"}, headers=auth(tokens["operator"]))
    assert r.status_code == 422 and "kind" in r.json()["detail"]
    r = client.post(
        "/api/v1/jobs", json={"kind": "fit", "depends_on_id": 77}, headers=auth(tokens["operator"])
    )
    assert r.status_code == 422 and "job 77 does not exist" in r.json()["detail"]
    assert client.get("/api/v1/jobs/12345", headers=auth(tokens["viewer"])).status_code == 404
    assert client.get("/api/v1/jobs").status_code == 401

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.conftest import auth

VALID_KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"


def test_array_creates_its_sites(client: TestClient, tokens: dict[str, str]) -> None:
    op = tokens["operator"]
    subject = client.post("/api/v1/subjects", json={"name": "m1"}, headers=auth(op)).json()
    r = client.post(
        "/api/v1/arrays",
        json={"subject_id": subject["id"], "name": "V4-a", "n_channels": 96},
        headers=auth(op),
    )
    assert r.status_code == 201
    sites = r.json()["sites"]
    assert [s["channel"] for s in sites] == list(range(96))
    assert (
        client.get(f"/api/v1/arrays?subject_id={subject['id']}", headers=auth(op)).json()[0][
            "n_channels"
        ]
        == 96
    )
    dup = client.post(
        "/api/v1/arrays",
        json={"subject_id": subject["id"], "name": "V4-a", "n_channels": 4},
        headers=auth(op),
    )
    assert dup.status_code == 409
    missing = client.post(
        "/api/v1/arrays",
        json={"subject_id": 424242, "name": "x", "n_channels": 4},
        headers=auth(op),
    )
    assert missing.status_code == 404
    r = client.patch(f"/api/v1/arrays/{r.json()['id']}", json={"area": "IT"}, headers=auth(op))
    assert r.json()["area"] == "IT"


def test_subjects_and_rigs_crud(client: TestClient, tokens: dict[str, str]) -> None:
    op = tokens["operator"]
    r = client.post(
        "/api/v1/subjects", json={"name": "m2", "notes": "left hemisphere"}, headers=auth(op)
    )
    sid = r.json()["id"]
    r = client.patch(f"/api/v1/subjects/{sid}", json={"closed_loop": True}, headers=auth(op))
    assert r.json()["closed_loop"] is True and r.json()["notes"] == "left hemisphere"
    assert client.post("/api/v1/subjects", json={"name": "m2"}, headers=auth(op)).status_code == 409
    assert client.post("/api/v1/subjects", json={"name": ""}, headers=auth(op)).status_code == 422

    r = client.post(
        "/api/v1/rigs", json={"name": "rig-c", "curve_public_key": VALID_KEY}, headers=auth(op)
    )
    assert r.status_code == 201 and r.json()["curve_public_key"] == VALID_KEY
    assert (
        client.post(
            "/api/v1/rigs", json={"name": "rig-d", "curve_public_key": "short"}, headers=auth(op)
        ).status_code
        == 422
    )
    r = client.patch("/api/v1/rigs/rig-c", json={"description": "booth 3"}, headers=auth(op))
    assert r.json()["description"] == "booth 3" and r.json()["curve_public_key"] == VALID_KEY
    assert client.get("/api/v1/rigs/rig-c", headers=auth(tokens["viewer"])).status_code == 200
    assert client.get("/api/v1/rigs/nope", headers=auth(op)).status_code == 404
    assert (
        client.patch(
            "/api/v1/rigs/rig-c", json={"description": "x"}, headers=auth(tokens["viewer"])
        ).status_code
        == 403
    )
    assert [x["name"] for x in client.get("/api/v1/rigs", headers=auth(op)).json()] == [
        "rig-a",
        "rig-b",
        "rig-c",
    ]


def test_bad_tokens(client: TestClient, tokens: dict[str, str]) -> None:
    r = client.get("/api/v1/subjects", headers={"Authorization": "Bearer pc_wrong"})
    assert r.status_code == 401 and r.json()["type"] == "unauthorized"
    assert client.get("/api/v1/subjects", headers={"Authorization": "Basic abc"}).status_code == 401
    assert client.get("/api/v1/subjects", headers={"Authorization": "Bearer"}).status_code == 401

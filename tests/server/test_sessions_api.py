"""Scheduling, the session state machine, next-block, progress, rig token scope."""

from __future__ import annotations

from collections import Counter

from fastapi.testclient import TestClient

from tests.conftest import auth
from tests.server.helpers import make_set, make_subject_with_array, schedule


def _two_block_session(client: TestClient, op: str) -> tuple[int, list[str], list[str]]:
    subject_id = make_subject_with_array(client, op)
    set_a, ids_a = make_set(client, op, 3, 0, "natural-a")
    set_b, ids_b = make_set(client, op, 2, 100, "natural-b")
    r = schedule(
        client,
        op,
        subject_id,
        [
            {"stimulus_set_id": set_a, "repetitions": 2, "seed": 7},
            {"stimulus_set_id": set_b, "repetitions": 1, "rsvp": {"on_ms": 50}},
        ],
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert [b["index"] for b in body["blocks"]] == [0, 1]
    assert body["state"] == "scheduled"
    return int(body["id"]), ids_a, ids_b


def test_schedule_start_next_block_and_progress(client: TestClient, tokens: dict[str, str]) -> None:
    op, rig = tokens["operator"], tokens["rig"]
    session_id, ids_a, ids_b = _two_block_session(client, op)

    # Nothing is due before the session starts.
    assert client.get("/api/v1/rigs/rig-a/next-block", headers=auth(rig)).status_code == 204

    r = client.post(f"/api/v1/sessions/{session_id}/start", headers=auth(rig))
    assert r.status_code == 200 and r.json()["state"] == "running", r.text

    r = client.get("/api/v1/rigs/rig-a/next-block", headers=auth(rig))
    assert r.status_code == 200, r.text
    block = r.json()
    assert block["session_id"] == session_id and block["block_index"] == 0
    assert sorted(block["sequence"]) == sorted(ids_a * 2)
    assert {i["stimulus_id"]: i["remaining"] for i in block["items"]} == {s: 2 for s in ids_a}
    assert block["rsvp"]["on_ms"] == 100

    # Seeded: asking again gives the same order.
    again = client.get("/api/v1/rigs/rig-a/next-block", headers=auth(rig)).json()
    assert again["sequence"] == block["sequence"]

    # Partial progress reduces what remains; completing moves to block 1.
    r = client.post(
        f"/api/v1/blocks/{block['block_id']}/progress",
        json={"state": "stopped", "shown_counts": {ids_a[0]: 2, ids_a[1]: 1}},
        headers=auth(rig),
    )
    assert r.status_code == 200 and r.json()["state"] == "stopped", r.text
    remaining = client.get("/api/v1/rigs/rig-a/next-block", headers=auth(rig)).json()
    assert Counter(remaining["sequence"]) == Counter({ids_a[1]: 1, ids_a[2]: 2})

    r = client.post(
        f"/api/v1/blocks/{block['block_id']}/progress",
        json={"state": "completed", "shown_counts": {s: 2 for s in ids_a}},
        headers=auth(rig),
    )
    assert r.json()["state"] == "completed"
    second = client.get("/api/v1/rigs/rig-a/next-block", headers=auth(rig)).json()
    assert second["block_index"] == 1 and second["rsvp"]["on_ms"] == 50
    assert sorted(second["sequence"]) == sorted(ids_b)

    client.post(
        f"/api/v1/blocks/{second['block_id']}/progress",
        json={"state": "completed", "shown_counts": {s: 1 for s in ids_b}},
        headers=auth(rig),
    )
    assert client.get("/api/v1/rigs/rig-a/next-block", headers=auth(rig)).status_code == 204

    r = client.post(f"/api/v1/sessions/{session_id}/complete", headers=auth(op))
    assert r.status_code == 200 and r.json()["state"] == "completed"
    assert r.json()["ended_at"] is not None


def test_premature_completion_keeps_block_running(
    client: TestClient, tokens: dict[str, str]
) -> None:
    op, rig = tokens["operator"], tokens["rig"]
    session_id, ids_a, _ = _two_block_session(client, op)
    client.post(f"/api/v1/sessions/{session_id}/start", headers=auth(op))
    block = client.get("/api/v1/rigs/rig-a/next-block", headers=auth(rig)).json()
    r = client.post(
        f"/api/v1/blocks/{block['block_id']}/progress",
        json={"state": "completed", "shown_counts": {ids_a[0]: 2}},
        headers=auth(rig),
    )
    assert r.json()["state"] == "running"


def test_illegal_transitions_are_409_with_reason(
    client: TestClient, tokens: dict[str, str]
) -> None:
    op = tokens["operator"]
    session_id, _, _ = _two_block_session(client, op)
    r = client.post(f"/api/v1/sessions/{session_id}/complete", headers=auth(op))
    assert r.status_code == 409
    assert r.json()["type"] == "conflict" and "scheduled" in r.json()["detail"]
    assert (
        client.post(
            f"/api/v1/sessions/{session_id}/abort", json={"reason": "sick"}, headers=auth(op)
        ).status_code
        == 200
    )
    r = client.post(f"/api/v1/sessions/{session_id}/start", headers=auth(op))
    assert r.status_code == 409 and "aborted" in r.json()["detail"]
    got = client.get(f"/api/v1/sessions/{session_id}", headers=auth(op)).json()
    assert got["state"] == "aborted" and got["state_reason"] == "sick"


def test_one_running_session_per_rig(client: TestClient, tokens: dict[str, str]) -> None:
    op = tokens["operator"]
    first, _, _ = _two_block_session(client, op)
    set_c, _ = make_set(client, op, 1, 500, "natural-c")
    subject_id = client.get("/api/v1/subjects", headers=auth(op)).json()[0]["id"]
    second = schedule(
        client, op, subject_id, [{"stimulus_set_id": set_c, "repetitions": 1}]
    ).json()["id"]
    other_rig = schedule(
        client, op, subject_id, [{"stimulus_set_id": set_c, "repetitions": 1}], rig="rig-b"
    ).json()["id"]
    assert client.post(f"/api/v1/sessions/{first}/start", headers=auth(op)).status_code == 200
    r = client.post(f"/api/v1/sessions/{second}/start", headers=auth(op))
    assert r.status_code == 409 and str(first) in r.json()["detail"]
    assert client.post(f"/api/v1/sessions/{other_rig}/start", headers=auth(op)).status_code == 200


def test_rig_token_acts_only_on_its_rig(client: TestClient, tokens: dict[str, str]) -> None:
    op = tokens["operator"]
    session_id, _, _ = _two_block_session(client, op)
    r = client.post(f"/api/v1/sessions/{session_id}/start", headers=auth(tokens["rig-b"]))
    assert r.status_code == 403
    assert (
        client.get("/api/v1/rigs/rig-a/next-block", headers=auth(tokens["rig-b"])).status_code
        == 403
    )
    assert (
        client.post(
            f"/api/v1/sessions/{session_id}/start", headers=auth(tokens["viewer"])
        ).status_code
        == 403
    )
    assert (
        client.post(
            f"/api/v1/sessions/{session_id}/start", headers=auth(tokens["worker"])
        ).status_code
        == 403
    )
    assert (
        client.get(f"/api/v1/sessions/{session_id}", headers=auth(tokens["viewer"])).status_code
        == 200
    )


def test_list_filters_and_pagination(client: TestClient, tokens: dict[str, str]) -> None:
    op = tokens["operator"]
    subject_id = make_subject_with_array(client, op)
    set_a, _ = make_set(client, op, 1, 0, "s")
    for rig in ("rig-a", "rig-b", "rig-a"):
        assert (
            schedule(
                client, op, subject_id, [{"stimulus_set_id": set_a, "repetitions": 1}], rig=rig
            ).status_code
            == 201
        )
    page = client.get("/api/v1/sessions?rig=rig-a&limit=1", headers=auth(op)).json()
    assert page["total"] == 2 and len(page["items"]) == 1
    page2 = client.get("/api/v1/sessions?rig=rig-a&limit=1&offset=1", headers=auth(op)).json()
    assert page2["items"][0]["id"] != page["items"][0]["id"]
    assert client.get("/api/v1/sessions?state=running", headers=auth(op)).json()["total"] == 0
    assert (
        client.get("/api/v1/sessions?date_from=2026-11-29", headers=auth(op)).json()["total"] == 0
    )
    assert (
        client.get(
            f"/api/v1/sessions?subject_id={subject_id}&date_to=2026-11-28", headers=auth(op)
        ).json()["total"]
        == 3
    )
    assert client.get("/api/v1/sessions?state=bogus", headers=auth(op)).status_code == 422


def test_schedule_rejects_unknown_references(client: TestClient, tokens: dict[str, str]) -> None:
    op = tokens["operator"]
    subject_id = make_subject_with_array(client, op)
    r = schedule(client, op, subject_id, [{"stimulus_set_id": 999, "repetitions": 1}])
    assert r.status_code == 422 and "999" in r.json()["detail"]
    r = schedule(client, op, subject_id, [{"stimulus_set_id": 1, "repetitions": 1}], rig="nope")
    assert r.status_code == 404
    r = schedule(client, op, subject_id, [])
    assert r.status_code == 422

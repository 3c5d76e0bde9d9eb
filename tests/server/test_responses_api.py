"""Presentations query and the (presentations × sites) response matrix as .npz and CSV."""

from __future__ import annotations

import csv
import io
import uuid

import numpy as np
from fastapi.testclient import TestClient

from server.config import Settings
from server.db.models import Presentation
from server.db.session import engine_for, make_sessionmaker, transaction
from tests.conftest import auth
from tests.server.helpers import make_set, make_subject_with_array, schedule


def test_response_matrix_npz_and_csv(
    client: TestClient, tokens: dict[str, str], settings: Settings
) -> None:
    op = tokens["operator"]
    subject_id = make_subject_with_array(client, op, n_channels=5)
    set_id, ids = make_set(client, op, 2, 0, "nat")
    session = schedule(
        client, op, subject_id, [{"stimulus_set_id": set_id, "repetitions": 2}]
    ).json()
    block_id = session["blocks"][0]["id"]
    planted = np.arange(4 * 5, dtype=np.uint16).reshape(4, 5) * 7
    engine = engine_for(settings)
    with transaction(make_sessionmaker(engine)) as db:
        for i in range(4):
            db.add(
                Presentation(
                    id=str(uuid.UUID(int=i + 1)),
                    session_id=session["id"],
                    block_id=block_id,
                    stimulus_id=ids[i % 2],
                    trial_index=i // 2,
                    position=i % 2,
                    onset_sample=30_000 * i,
                    onset_source="photodiode",
                    fixation_ok=True,
                    dropped_frames=0,
                    valid=True,
                    spike_counts=planted[i].astype("<u2").tobytes(),
                )
            )
        db.add(
            Presentation(
                id=str(uuid.UUID(int=99)),
                session_id=session["id"],
                block_id=block_id,
                stimulus_id=ids[0],
                trial_index=9,
                position=0,
                onset_sample=None,
                onset_source="event_word",
                fixation_ok=False,
                dropped_frames=0,
                valid=False,
                invalid_reason="fixation_break",
                spike_counts=np.zeros(5, "<u2").tobytes(),
            )
        )
    engine.dispose()

    r = client.get(f"/api/v1/sessions/{session['id']}/responses", headers=auth(tokens["viewer"]))
    assert r.status_code == 200
    npz = np.load(io.BytesIO(r.content))
    np.testing.assert_array_equal(npz["counts"], planted)
    assert list(npz["stimulus_ids"]) == [ids[0], ids[1], ids[0], ids[1]]
    assert len(npz["site_ids"]) == 5

    r = client.get(
        f"/api/v1/sessions/{session['id']}/responses?format=csv&valid_only=false", headers=auth(op)
    )
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0][:3] == ["presentation_id", "stimulus_id", "block_id"] and len(rows[0]) == 8
    assert len(rows) == 1 + 5

    listed = client.get(
        f"/api/v1/presentations?session_id={session['id']}&valid=false", headers=auth(op)
    ).json()
    assert [p["invalid_reason"] for p in listed] == ["fixation_break"]
    with_counts = client.get(
        f"/api/v1/presentations?stimulus_id={ids[1]}&include_counts=true", headers=auth(op)
    ).json()
    assert sorted(p["spike_counts"] for p in with_counts) == sorted(planted[[1, 3]].tolist())

    # Ingested valid presentations count toward what a block still needs.
    client.post(f"/api/v1/sessions/{session['id']}/start", headers=auth(op))
    nxt = client.get("/api/v1/rigs/rig-a/next-block", headers=auth(tokens["rig"]))
    assert nxt.status_code == 204  # both images already have 2 valid presentations

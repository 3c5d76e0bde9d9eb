"""Fixtures for the presenter: a live HTTP server in a thread, a scheduled block, a flip receiver.

The loopback receiver is a real ZeroMQ ROUTER that decodes the presenter's Flip and
FixationBreak messages, records first arrivals in order, acknowledges every message by key (as the
rig daemon does), and can go away for a while to play an unreachable daemon.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import zmq
from fastapi.testclient import TestClient

from rig import protocol
from server.app import create_app
from server.config import Settings
from tests.conftest import auth
from tests.server.helpers import make_set, make_subject_with_array


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture
def live_server(settings: Settings) -> Iterator[str]:
    """The real app served by uvicorn over loopback HTTP; yields its base URL."""
    port = free_port()
    app = create_app(settings, ingest=False)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 20.0, "uvicorn to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclass(frozen=True)
class ScheduledBlock:
    session_id: int
    subject_id: int
    set_id: int
    stimulus_ids: list[str]
    repetitions: int


def make_image_set(
    client: TestClient, tokens: dict[str, str], n_images: int = 16
) -> tuple[int, int, list[str]]:
    """(subject id, stimulus set id, stimulus ids)."""
    op = tokens["operator"]
    subject_id = make_subject_with_array(client, op)
    set_id, ids = make_set(client, op, n_images, 500, "present-test")
    return subject_id, set_id, ids


def schedule_block(
    client: TestClient,
    tokens: dict[str, str],
    image_set: tuple[int, int, list[str]],
    repetitions: int = 2,
    protocol_params: dict[str, Any] | None = None,
    seed: int = 11,
) -> ScheduledBlock:
    """A running session on rig-a with one block showing the set ``repetitions`` times."""
    op = tokens["operator"]
    subject_id, set_id, ids = image_set
    params = {
        "on_ms": 50,
        "off_ms": 50,
        "fixation_ms": 50,
        "images_per_trial": 8,
        "response_window_start_ms": 20,
        "response_window_end_ms": 60,
    }
    params.update(protocol_params or {})
    r = client.post(
        "/api/v1/sessions",
        json={
            "subject_id": subject_id,
            "rig": "rig-a",
            "scheduled_date": date(2026, 11, 28).isoformat(),
            "protocol": params,
            "blocks": [{"stimulus_set_id": set_id, "repetitions": repetitions, "seed": seed}],
        },
        headers=auth(op),
    )
    assert r.status_code == 201, r.text
    session_id = int(r.json()["id"])
    r = client.post(f"/api/v1/sessions/{session_id}/start", headers=auth(op))
    assert r.status_code == 200, r.text
    return ScheduledBlock(session_id, subject_id, set_id, ids, repetitions)


def complete_session(client: TestClient, tokens: dict[str, str], session_id: int) -> None:
    r = client.post(f"/api/v1/sessions/{session_id}/complete", headers=auth(tokens["operator"]))
    assert r.status_code == 200, r.text


@dataclass
class LoopbackReceiver:
    """A flip receiver standing in for the rig daemon (ROUTER, acks every message by key)."""

    endpoint: str
    outage_after_flips: int | None = None  # go away after this many first arrivals...
    outage_s: float = 0.0  # ...for this long, without acking the last one
    messages: list[Any] = field(default_factory=list)  # first arrivals, in order
    duplicates: int = 0
    outages: int = 0
    _keys: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> LoopbackReceiver:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def flips(self) -> list[Any]:
        with self._lock:
            return [m for m in self.messages if isinstance(m, protocol.Flip)]

    def snapshot(self) -> list[Any]:
        with self._lock:
            return list(self.messages)

    def _bind(self, ctx: zmq.Context[Any]) -> zmq.Socket[Any]:
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        return sock

    def _run(self) -> None:
        ctx: zmq.Context[Any] = zmq.Context.instance()
        sock = self._bind(ctx)
        try:
            while not self._stop.is_set():
                if not sock.poll(20):
                    continue
                identity, *frames = sock.recv_multipart()
                msg = protocol.decode(frames)
                key = protocol.ack_key(msg)
                with self._lock:
                    first = key not in self._keys
                    if first:
                        self._keys.add(key)
                        self.messages.append(msg)
                    else:
                        self.duplicates += 1
                    n_flips = sum(isinstance(m, protocol.Flip) for m in self.messages)
                if (
                    first
                    and self.outage_after_flips is not None
                    and self.outages == 0
                    and isinstance(msg, protocol.Flip)
                    and n_flips == self.outage_after_flips
                ):
                    # Vanish before acking: the presenter must re-send this one later.
                    self.outages += 1
                    sock.close(linger=0)
                    self._stop.wait(self.outage_s)
                    sock = self._bind(ctx)
                    continue
                ack = protocol.Ack(
                    rig=msg.rig,
                    stream="ack",
                    seq=msg.seq,
                    ids=[key],
                    statuses=["stored" if first else "duplicate"],
                )
                sock.send_multipart([identity, *ack.encode()])
        finally:
            sock.close(linger=0)


@pytest.fixture
def receiver() -> Iterator[LoopbackReceiver]:
    rx = LoopbackReceiver(f"tcp://127.0.0.1:{free_port()}").start()
    try:
        yield rx
    finally:
        rx.stop()


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "stimulus-cache"

"""The real PsychoPy presenter in a real window under Xvfb, against the live server."""

from __future__ import annotations

import importlib.util
import os
import shutil
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rig import protocol
from rig.present.engine import EngineConfig
from rig.present.headless import HeadlessConfig, VirtualClock, run_headless
from rig.present.run import PresentConfig, run_present
from tests.conftest import auth, require_component
from tests.rig.present.checks import (
    VALID_AFTER_S,
    assert_stream_consistent,
    sent_summary,
    summary,
    valid_counts,
)
from tests.rig.present.conftest import (
    LoopbackReceiver,
    complete_session,
    free_port,
    make_image_set,
    schedule_block,
    wait_until,
)


@pytest.fixture(scope="session")
def _xvfb_server() -> Iterator[str | None]:
    """One private Xvfb for the whole run: pyglet keeps its first X connection for the life of
    the process, so every PsychoPy window of the run must live on the same display."""
    if shutil.which("Xvfb") is None:
        yield None
        return
    number = next(n for n in range(90, 190) if not Path(f"/tmp/.X11-unix/X{n}").exists())
    proc = subprocess.Popen(
        ["Xvfb", f":{number}", "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not Path(f"/tmp/.X11-unix/X{number}").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                yield None
                return
            time.sleep(0.05)
        yield f":{number}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def xvfb_display(_xvfb_server: str | None, monkeypatch: pytest.MonkeyPatch) -> str:
    """DISPLAY pointing at the run's private Xvfb."""
    require_component("Xvfb", shutil.which("Xvfb") is not None, "apt-get install xvfb")
    require_component("Xvfb", _xvfb_server is not None, "the private Xvfb did not start")
    require_component(
        "PsychoPy",
        importlib.util.find_spec("psychopy") is not None,
        "pip install 'popcontrol[present]'",
    )
    assert _xvfb_server is not None
    monkeypatch.setenv("DISPLAY", _xvfb_server)
    return _xvfb_server


def _engine() -> EngineConfig:
    return EngineConfig(iti_ms=50, stall_after_s=1.0, max_stall_s=20, drain_timeout_s=10)


def test_psychopy_block_matches_the_headless_presenter(
    xvfb_display: str,
    client: TestClient,
    tokens: dict[str, str],
    live_server: str,
    receiver: LoopbackReceiver,
    cache_dir: Path,
) -> None:
    assert os.environ["DISPLAY"] == xvfb_display
    image_set = make_image_set(client, tokens)
    block = schedule_block(client, tokens, image_set, seed=31)
    config = PresentConfig(
        server_url=live_server,
        token=tokens["rig"],
        rig="rig-a",
        daemon_endpoint=receiver.endpoint,
        window_size_px=(640, 480),
        refresh_hz=60.0,
        cache_dir=cache_dir,
        until_idle=True,
        engine=_engine(),
        eye="sim:seed=4",
        scripted_breaks={1: 3},
    )
    run = run_present(config)
    assert [r.state for r in run.results] == ["completed"]
    result = run.results[0]
    assert run.paced  # Xvfb has no vertical sync: the presenter paced its flips
    wait_until(lambda: len(receiver.snapshot()) == len(run.messages), 5, "every message")
    received = receiver.snapshot()

    # Every image has exactly 2 valid presentations; the break re-queued the unseen images.
    assert valid_counts(received, VALID_AFTER_S) == Counter({s: 2 for s in block.stimulus_ids})
    assert result.fixation_breaks == 1 and result.requeued == 5
    flips = [m for m in received if isinstance(m, protocol.Flip)]
    assert len(flips) == 33
    # In order, event words matching their presentations, and written to the digital output.
    assert_stream_consistent(received, block.stimulus_ids)
    assert summary(received) == sent_summary(run.messages)
    assert [w for w in run.words if w] == [m.event_word for m in flips]
    # Frame intervals were recorded and sit at the nominal 60 Hz period.
    assert len(result.frame_intervals_s) > 33 * 6
    assert abs(statistics.median(result.frame_intervals_s) - 1 / 60) < 0.1 / 60
    saved = client.get(f"/api/v1/blocks/{flips[0].block_id}", headers=auth(tokens["operator"]))
    assert saved.json()["state"] == "completed"
    complete_session(client, tokens, block.session_id)

    # The headless presenter, given the same block and seed, sends the same message sequence.
    schedule_block(client, tokens, image_set, seed=31)
    rx = LoopbackReceiver(f"tcp://127.0.0.1:{free_port()}").start()
    try:
        results = run_headless(
            live_server,
            tokens["rig"],
            "rig-a",
            rx.endpoint,
            HeadlessConfig(cache_dir=cache_dir, engine=_engine(), scripted_breaks={1: 3}),
            seed=4,
            clock=VirtualClock(),
        )
        wait_until(lambda: len(rx.snapshot()) == len(received), 5, "every headless message")
        headless_received = rx.snapshot()
    finally:
        rx.stop()
    assert [r.state for r in results] == ["completed"]
    assert summary(headless_received) == summary(received)

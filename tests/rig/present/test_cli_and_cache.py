"""`popcontrol present --headless` end to end, and the verified image cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from rig.present.net import ImageCache, ServerClient, ServerError
from server.cli import app
from tests.rig.present.conftest import LoopbackReceiver, make_image_set, schedule_block, wait_until


def test_present_command_runs_headless_until_idle(
    client: TestClient,
    tokens: dict[str, str],
    live_server: str,
    receiver: LoopbackReceiver,
    cache_dir: Path,
) -> None:
    image_set = make_image_set(client, tokens, n_images=4)
    schedule_block(client, tokens, image_set, repetitions=1)
    args = [
        "present", "--server", live_server, "--rig", "rig-a", "--daemon", receiver.endpoint,
        "--headless", "--until-idle", "--cache-dir", str(cache_dir),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"POPCONTROL_RIG_TOKEN": tokens["rig"]})
    assert result.exit_code == 0, result.output
    assert "completed, 1 trials, 4 flips" in result.output
    wait_until(lambda: len(receiver.flips()) == 4, 5, "4 flips")
    assert {m.stimulus_id for m in receiver.flips()} == set(image_set[2])

    bad = CliRunner().invoke(
        app,
        ["present", "--server", live_server, "--rig", "rig-a", "--headless", "--eye", "mouse"],
        env={"POPCONTROL_RIG_TOKEN": tokens["rig"]},
    )
    assert bad.exit_code == 2 and "--headless needs the simulated eye tracker" in bad.output


def test_image_cache_verifies_hashes_and_heals(
    client: TestClient, tokens: dict[str, str], live_server: str, tmp_path: Path
) -> None:
    _, _, ids = make_image_set(client, tokens, n_images=1)
    sid = ids[0]
    server = ServerClient(live_server, tokens["rig"], "rig-a")
    cache = ImageCache(tmp_path / "cache")
    try:
        data = cache.get(server, sid, f"/api/v1/stimuli/{sid}/image")
        assert hashlib.sha256(data).hexdigest() == sid
        assert cache.path(sid).read_bytes() == data
        cache.path(sid).write_bytes(b"damaged")
        assert cache.get(server, sid, f"/api/v1/stimuli/{sid}/image") == data
        other = "0" * 64
        with pytest.raises(ServerError, match="404"):
            cache.get(server, other, f"/api/v1/stimuli/{other}/image")
        # Bytes that do not hash to the id they are fetched under are refused.
        with pytest.raises(ServerError, match="sha256"):
            cache.get(server, other, f"/api/v1/stimuli/{sid}/image")
        assert not cache.path(other).exists()
    finally:
        server.close()

"""The daemon end to end in one process: presenter flips -> alignment -> spool -> ingest -> DB."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zmq
from sqlalchemy import select

from rig import protocol
from rig.align import AlignConfig
from rig.daemon import DaemonConfig, RigDaemon, SessionLayout, UnknownSession, status_line
from rig.delivery import DeliveryConfig
from rig.present.net import FlipChannel
from rig.spool import Spool
from server.config import Settings
from server.db.models import Presentation
from server.db.session import make_engine, make_sessionmaker
from server.ingest import IngestServer
from tests.rig.daemon_harness import RATE_HZ, PlantedSource, presentation_index
from tests.rig.ingest_fixtures import World, build_world, expected_counts, presentation_id


def wait_for(cond: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def make_flip(world: World, i: int, **changes: object) -> protocol.Flip:
    fields: dict[str, object] = {
        "rig": world.rig_name,
        "stream": "flip",
        "seq": i,
        "presentation_id": presentation_id(i),
        "session_id": world.session_id,
        "block_id": world.block_id,
        "stimulus_id": world.stimulus_ids[i % len(world.stimulus_ids)],
        "trial": i // 5,
        "position": i % 5,
        "event_word": (i * 7919) % 65536,
        "host_flip_time_s": 0.2 * i,
        "dropped_frames": 0,
        "fixation_ok": True,
    }
    fields.update(changes)
    return protocol.Flip(**fields)  # type: ignore[arg-type]


def ack_keys(frames: list[bytes]) -> list[str]:
    msg = protocol.decode(frames)
    assert isinstance(msg, protocol.Ack)
    return list(msg.ids)


def stored_rows(url: str) -> dict[str, Presentation]:
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as db:
            return {p.id: p for p in db.scalars(select(Presentation))}
    finally:
        engine.dispose()


def test_flips_become_stored_records_with_the_planted_counts(
    database_url: str, tmp_path: Path
) -> None:
    server_keys = zmq.curve_keypair()
    rig_keys = zmq.curve_keypair()
    world = build_world(
        database_url, channels_per_array=(16, 24), rig_public_key=rig_keys[0].decode()
    )
    engine = make_engine(database_url)
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        ingest_bind="tcp://127.0.0.1:0",
        curve_public_key=server_keys[0].decode(),
        curve_secret_key=server_keys[1].decode(),
        _env_file=None,
    )
    ingest = IngestServer(settings, make_sessionmaker(engine))
    ingest.start()
    assert ingest.endpoint is not None

    def layouts(session_id: int) -> SessionLayout:
        if session_id != world.session_id:
            raise UnknownSession(str(session_id))
        return SessionLayout(n_sites=world.n_sites)

    config = DaemonConfig(
        rig=world.rig_name,
        spool_path=tmp_path / "spool.db",
        flip_bind="tcp://127.0.0.1:0",
        delivery=DeliveryConfig(
            server=ingest.endpoint,
            server_public_key=server_keys[0].decode(),
            rig_public_key=rig_keys[0].decode(),
            rig_secret_key=rig_keys[1].decode(),
        ),
        align=AlignConfig(n_sites=1, sample_rate_hz=RATE_HZ, word_line=0, photodiode_line=1),
    )
    daemon = RigDaemon(config, PlantedSource(world.n_sites), layouts)
    lines: list[str] = []
    thread = threading.Thread(
        target=daemon.run, kwargs={"status": lambda st: lines.append(status_line(st))}
    )
    thread.start()
    channel = FlipChannel(daemon.flip_endpoint, ack_keys, resend_after_s=1.0).start()
    try:
        n = 200
        for i in range(n):
            flip = make_flip(world, i, fixation_ok=(i != 7))
            channel.send(protocol.ack_key(flip), flip.encode())
        bad = make_flip(world, 10_000, session_id=world.session_id + 999)
        channel.send(protocol.ack_key(bad), bad.encode())
        assert channel.wait_drained(30), "the daemon did not ack every flip"
        wait_for(lambda: len(stored_rows(database_url)) == n, what=f"{n} stored presentations")
        wait_for(lambda: daemon.status()["spool_depth"] == 0, what="an empty spool")
        rows = stored_rows(database_url)
        assert set(rows) == {presentation_id(i) for i in range(n)}
        for pid, row in rows.items():
            i = presentation_index(pid)
            assert np.array_equal(
                np.frombuffer(row.spike_counts, "<u2"), expected_counts(world.n_sites, i)
            ), i
            assert row.onset_source == "photodiode"
            assert row.valid == (i != 7), (i, row.invalid_reason)
        assert rows[presentation_id(7)].invalid_reason == "fixation_break"
        st = daemon.status()
        assert st["finalised"] == n and st["invalid"] == {"fixation_break": 1}
        assert st["presenter_rejected"] == {"unknown_session": 1}
        assert st["stored"] == n and st["rejected"] == {}
        assert ingest.status()["stored"] == n
        assert any("finalised 200" in line for line in lines) or "finalised 200" in status_line(
            daemon.status()
        )
    finally:
        channel.close()
        daemon.stop()
        thread.join(30)
        daemon.close()
        ingest.stop()
        engine.dispose()
    with Spool(tmp_path / "spool.db") as spool:
        assert spool.depth() == 0 and spool.inbox() == []

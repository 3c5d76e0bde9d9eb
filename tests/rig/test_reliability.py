"""Reliability with real processes on loopback: kill -9 the ingest or the daemon mid-stream,
flood both with malformed frames, and try to deliver without a registered CURVE key."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
import zmq.auth
from sqlalchemy import func, select, update

from rig import protocol
from rig.present.net import FlipChannel
from rig.spool import Spool
from server.config import Settings
from server.db.models import Presentation, Rig
from server.db.session import make_engine, make_sessionmaker, transaction
from server.ingest import IngestServer
from tests.rig.daemon_harness import presentation_index
from tests.rig.ingest_fixtures import (
    World,
    build_world,
    expected_counts,
    make_message,
    presentation_id,
)
from tests.rig.test_daemon import ack_keys, make_flip

ROOT = Path(__file__).resolve().parents[2]
N_SITES_PER_ARRAY = (16, 16)


def wait_for(cond: Callable[[], bool], timeout_s: float = 90.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stored_count(url: str) -> int:
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as db:
            return int(db.scalar(select(func.count()).select_from(Presentation)) or 0)
    finally:
        engine.dispose()


def stored_rows(url: str) -> dict[str, tuple[bytes, bool]]:
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as db:
            rows = db.execute(
                select(Presentation.id, Presentation.spike_counts, Presentation.valid)
            )
            return {pid: (counts, valid) for pid, counts, valid in rows}
    finally:
        engine.dispose()


class Setup:
    """Keys, ports and processes of one test set-up."""

    def __init__(self, tmp_path: Path, database_url: str, *, register_key: bool = True) -> None:
        self.tmp = tmp_path
        self.url = database_url
        self.server_keys = zmq.curve_keypair()
        key_dir = tmp_path / "keys"
        key_dir.mkdir()
        zmq.auth.create_certificates(key_dir, "rig")
        self.key_file = key_dir / "rig.key_secret"
        self.rig_public = zmq.auth.load_certificate(self.key_file)[0].decode()
        self.world: World = build_world(
            database_url,
            channels_per_array=N_SITES_PER_ARRAY,
            n_stimuli=50,
            rig_public_key=self.rig_public if register_key else None,
        )
        self.ingest_port = free_port()
        self.flip_port = free_port()
        self.spool = tmp_path / "spool.db"
        self.status_file = tmp_path / "daemon-status.json"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ingest: subprocess.Popen[bytes] | None = None
        self.daemon: subprocess.Popen[bytes] | None = None

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POPCONTROL_")}
        env.update(
            POPCONTROL_DATABASE_URL=self.url,
            POPCONTROL_DATA_DIR=str(self.tmp / "data"),
            POPCONTROL_INGEST_BIND=f"tcp://127.0.0.1:{self.ingest_port}",
            POPCONTROL_CURVE_PUBLIC_KEY=self.server_keys[0].decode(),
            POPCONTROL_CURVE_SECRET_KEY=self.server_keys[1].decode(),
            POPCONTROL_LOG_LEVEL="WARNING",
            PYTHONPATH=str(ROOT),
        )
        return env

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / log_name, "ab")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=self._env(), stdout=log, stderr=log
        )
        self.procs.append(proc)
        return proc

    def start_ingest(self) -> None:
        self.ingest = self._spawn(["-m", "server.cli", "ingest"], "ingest.log")

    def start_daemon(self) -> None:
        self.status_file.unlink(missing_ok=True)
        self.daemon = self._spawn(
            [
                "-m",
                "tests.rig.daemon_harness",
                "--spool",
                str(self.spool),
                "--flip-bind",
                f"tcp://127.0.0.1:{self.flip_port}",
                "--server",
                f"tcp://127.0.0.1:{self.ingest_port}",
                "--session",
                str(self.world.session_id),
                "--n-sites",
                str(self.world.n_sites),
                f"--server-key={self.server_keys[0].decode()}",  # a Z85 key may start with "-"
                "--key-file",
                str(self.key_file),
                "--status-file",
                str(self.status_file),
            ],
            "daemon.log",
        )

    def wait(self, cond: Callable[[], bool], what: str, timeout_s: float = 90.0) -> None:
        """wait_for, and on a timeout say what the processes logged and reported."""
        try:
            wait_for(cond, timeout_s, what)
        except AssertionError as exc:
            logs = {
                name: (self.tmp / name).read_text(errors="replace")[-3000:]
                for name in ("ingest.log", "daemon.log")
                if (self.tmp / name).exists()
            }
            raise AssertionError(f"{exc}\nstatus: {self.daemon_status()}\nlogs: {logs}") from None

    def daemon_status(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.status_file.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def kill(self, proc: subprocess.Popen[bytes] | None) -> None:
        assert proc is not None and proc.poll() is None, "the process died on its own"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(15)

    def flip_channel(self, resend_after_s: float) -> FlipChannel:
        """The presenter's side: a started flip channel to this daemon."""
        return FlipChannel(
            f"tcp://127.0.0.1:{self.flip_port}", ack_keys, resend_after_s=resend_after_s
        ).start()

    def flips(self, lo: int, hi: int) -> Iterator[protocol.Flip]:
        for i in range(lo, hi):
            yield make_flip(self.world, i)


@pytest.fixture
def rig_setup(tmp_path: Path, database_url: str) -> Iterator[Setup]:
    setup = Setup(tmp_path, database_url)
    try:
        yield setup
    finally:
        setup.close()


def send(channel: FlipChannel, flips: Iterator[protocol.Flip]) -> None:
    for flip in flips:
        channel.send(protocol.ack_key(flip), flip.encode())


def check_all_stored_once(setup: Setup, n: int) -> None:
    rows = stored_rows(setup.url)
    assert set(rows) == {presentation_id(i) for i in range(n)}
    for pid, (counts, valid) in rows.items():
        assert valid, pid
        i = presentation_index(pid)
        assert np.array_equal(
            np.frombuffer(counts, "<u2"), expected_counts(setup.world.n_sites, i)
        ), i


N = 5000


def spool_empty(path: Path) -> bool:
    with Spool(path) as spool:
        return spool.depth() == 0 and spool.inbox() == []


def test_ingest_killed_mid_stream_every_presentation_stored_once(rig_setup: Setup) -> None:
    setup = rig_setup
    setup.start_ingest()
    setup.start_daemon()
    channel = setup.flip_channel(resend_after_s=2.0)
    try:
        send(channel, setup.flips(0, N // 2))
        setup.wait(lambda: stored_count(setup.url) >= 300, "the first records stored")
        setup.kill(setup.ingest)
        at_kill = stored_count(setup.url)
        assert at_kill < N
        send(channel, setup.flips(N // 2, N))  # the stream goes on while the server is dead
        setup.wait(
            lambda: setup.daemon_status().get("finalised", 0) >= at_kill + 500,
            what="records spooled while the server is down",
        )
        setup.start_ingest()
        setup.wait(lambda: stored_count(setup.url) == N, f"all {N} stored", timeout_s=120)
        assert channel.wait_drained(30)
        setup.wait(
            lambda: (
                setup.daemon_status().get("spool_depth") == 0
                and setup.daemon_status().get("finalised") == N
            ),
            what="an empty spool",
        )
        check_all_stored_once(setup, N)
        st = setup.daemon_status()
        assert st["finalised"] == N and st["rejected"] == {}
        assert st["stored"] + st["duplicate"] >= N and st["stored"] <= N
    finally:
        channel.close()


def test_daemon_killed_mid_stream_nothing_in_its_spool_lost_or_duplicated(rig_setup: Setup) -> None:
    setup = rig_setup
    setup.start_ingest()
    setup.start_daemon()
    channel = setup.flip_channel(resend_after_s=1.0)
    try:
        send(channel, setup.flips(0, N // 2))
        setup.wait(lambda: stored_count(setup.url) >= 300, "the first records stored")
        setup.kill(setup.daemon)
        with Spool(setup.spool) as spool:
            spooled = {item.presentation_id for item in spool.pending(100_000)}
            kept_flips = {key for key, _ in spool.inbox()}
        stored_at_kill = set(stored_rows(setup.url))
        assert len(stored_at_kill) < N
        send(channel, setup.flips(N // 2, N))  # the presenter holds these until the daemon is back
        setup.start_daemon()
        setup.wait(lambda: stored_count(setup.url) == N, f"all {N} stored", timeout_s=120)
        assert channel.wait_drained(30)
        setup.wait(lambda: spool_empty(setup.spool), "an empty spool")
        rows = stored_rows(setup.url)
        assert spooled <= rows.keys() and kept_flips <= rows.keys()
        check_all_stored_once(setup, N)
        with Spool(setup.spool) as spool:
            assert spool.depth() == 0 and spool.inbox() == [] and spool.rejected() == {}
    finally:
        channel.close()


def _bad_record(world: World, rng: random.Random, k: int) -> tuple[list[bytes], str | None]:
    """Malformed or unstorable ingest traffic; the reason it must be counted under (None: any)."""
    good = make_message(world, 100_000 + k).encode()
    header = msgpack.unpackb(good[1])
    kind = k % 8
    if kind == 0:
        return [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 5))], None
    if kind == 1:
        return [good[0], good[1], good[2][: rng.randrange(0, len(good[2]) - 1)]], "bad_payload"
    if kind == 2:
        header["v"] = 2
        return [good[0], msgpack.packb(header), good[2]], "bad_version"
    if kind == 3:
        return [
            good[0],
            b"\xc4" + b"\0" * (protocol.MAX_HEADER_BYTES + 10),
            good[2],
        ], "header_too_large"
    if kind == 4:
        header["window_start_ms"] = float("nan")
        return [good[0], msgpack.packb(header), good[2]], "nan_field"
    if kind == 5:
        return make_message(world, 100_000 + k, session_id=424_242).encode(), "unknown_session"
    if kind == 6:
        return make_message(world, 100_000 + k, stimulus_id="a" * 64).encode(), "unknown_stimulus"
    return make_message(
        world, 100_000 + k, spike_counts=np.zeros(3, "<u2")
    ).encode(), "wrong_site_count"


def _bad_flip(world: World, rng: random.Random, k: int) -> tuple[list[bytes], str | None]:
    good = make_flip(world, 200_000 + k).encode()
    header = msgpack.unpackb(good[1])
    kind = k % 6
    if kind == 0:
        return [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 5))], None
    if kind == 1:
        return [good[0], good[1][: rng.randrange(1, len(good[1]) - 1)]], "bad_header"
    if kind == 2:
        header["v"] = 0
        return [good[0], msgpack.packb(header)], "bad_version"
    if kind == 3:
        return [good[0], b"\xc4" + b"\0" * (protocol.MAX_HEADER_BYTES + 10)], "header_too_large"
    if kind == 4:
        header["host_flip_time_s"] = float("inf")
        return [good[0], msgpack.packb(header)], "nan_field"
    return make_flip(world, 200_000 + k, session_id=424_242).encode(), "unknown_session"


def test_malformed_flood_both_stay_up_valid_stored_bad_counted(
    tmp_path: Path, database_url: str
) -> None:
    setup = Setup(tmp_path, database_url)
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        ingest_bind=f"tcp://127.0.0.1:{setup.ingest_port}",
        curve_public_key=setup.server_keys[0].decode(),
        curve_secret_key=setup.server_keys[1].decode(),
        _env_file=None,
    )
    engine = make_engine(database_url)
    ingest = IngestServer(settings, make_sessionmaker(engine))
    ingest.start()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    setup.start_daemon()
    channel = setup.flip_channel(resend_after_s=1.0)
    try:
        rogue_rig = ctx.socket(zmq.DEALER)  # holds the registered key: its frames reach the decoder
        rogue_rig.curve_serverkey = setup.server_keys[0]
        public, secret = zmq.auth.load_certificate(setup.key_file)
        assert secret is not None
        rogue_rig.curve_publickey, rogue_rig.curve_secretkey = public, secret
        rogue_rig.connect(f"tcp://127.0.0.1:{setup.ingest_port}")
        rogue_presenter = ctx.socket(zmq.DEALER)
        rogue_presenter.connect(f"tcp://127.0.0.1:{setup.flip_port}")
        rng = random.Random(11)
        n_valid, n_bad_each = 1000, 5000
        ingest_expected: Counter[str] = Counter()
        daemon_expected: Counter[str] = Counter()
        flips = list(setup.flips(0, n_valid))
        for k in range(n_bad_each):
            if k % 5 == 0:
                flip = flips[k // 5]
                channel.send(protocol.ack_key(flip), flip.encode())
            frames, reason = _bad_record(setup.world, rng, k)
            rogue_rig.send_multipart(frames)
            ingest_expected[reason or "*"] += 1
            frames, reason = _bad_flip(setup.world, rng, k)
            rogue_presenter.send_multipart(frames)
            daemon_expected[reason or "*"] += 1
        setup.wait(
            lambda: stored_count(database_url) == n_valid, timeout_s=120, what="every valid record"
        )
        setup.wait(
            lambda: ingest.status()["received"] >= n_valid + n_bad_each,
            what="every ingest frame counted",
        )
        setup.wait(
            lambda: sum(setup.daemon_status().get("presenter_rejected", {}).values()) >= n_bad_each,
            what="every bad flip counted",
        )
        st = ingest.status()
        assert st["running"] and st["stored"] == n_valid
        assert sum(st["rejected"].values()) == n_bad_each
        for reason, n in ingest_expected.items():
            if reason != "*":
                assert st["rejected"].get(reason, 0) >= n, (reason, st["rejected"])
        setup.wait(lambda: setup.daemon_status().get("finalised") == n_valid, "status caught up")
        dst = setup.daemon_status()
        assert sum(dst["presenter_rejected"].values()) == n_bad_each
        for reason, n in daemon_expected.items():
            if reason != "*":
                assert dst["presenter_rejected"].get(reason, 0) >= n, (
                    reason,
                    dst["presenter_rejected"],
                )
        assert dst["finalised"] == n_valid and dst["invalid"] == {}
        assert setup.daemon is not None and setup.daemon.poll() is None
        check_all_stored_once(setup, n_valid)
    finally:
        channel.close()
        setup.close()
        ingest.stop()
        ctx.destroy(linger=0)
        engine.dispose()


def test_daemon_without_a_registered_key_stores_nothing(tmp_path: Path, database_url: str) -> None:
    setup = Setup(tmp_path, database_url, register_key=False)
    setup.start_ingest()
    setup.start_daemon()
    channel = setup.flip_channel(resend_after_s=1.0)
    try:
        send(channel, setup.flips(0, 50))
        assert channel.wait_drained(30)
        setup.wait(
            lambda: (
                setup.daemon_status().get("finalised") == 50
                and setup.daemon_status().get("auth_failures", 0) >= 2
            ),
            what="records finalised and the handshake refused (twice)",
        )
        assert stored_count(setup.url) == 0
        assert setup.daemon_status()["spool_depth"] == 50  # kept, not lost
        # once the key is registered, the same daemon delivers everything
        engine = make_engine(setup.url)
        with transaction(make_sessionmaker(engine)) as db:
            db.execute(
                update(Rig)
                .where(Rig.id == setup.world.rig_id)
                .values(curve_public_key=setup.rig_public)
            )
        engine.dispose()
        setup.wait(lambda: stored_count(setup.url) == 50, "delivery after registration")
    finally:
        channel.close()
        setup.close()

"""The ingest loop over real ZeroMQ sockets on loopback, with CurveZMQ, against real databases."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from sqlalchemy import func, select, update

from rig import protocol
from server.config import Settings
from server.db.models import Presentation, Rig
from server.db.session import make_engine, make_sessionmaker, transaction
from server.ingest import IngestConfigError, IngestServer
from tests.rig.ingest_fixtures import World, build_world, expected_counts, make_message


def wait_for(cond: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


def _settings(tmp_path: Path, url: str, server_keys: tuple[bytes, bytes] | None) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=url,
        ingest_bind="tcp://127.0.0.1:0",
        curve_public_key=server_keys[0].decode() if server_keys else None,
        curve_secret_key=server_keys[1].decode() if server_keys else None,
        _env_file=None,
    )


class Client:
    """A DEALER as a rig daemon would use it, collecting acks."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        server_public: bytes | None,
        keys: tuple[bytes, bytes] | None,
    ) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        if server_public is not None and keys is not None:
            self.sock.curve_serverkey = server_public
            self.sock.curve_publickey, self.sock.curve_secretkey = keys
        self.sock.connect(endpoint)
        self.statuses: dict[str, str] = {}

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def collect(self, timeout_ms: int = 50) -> None:
        while self.sock.poll(timeout_ms):
            ack = protocol.decode(self.sock.recv_multipart())
            assert isinstance(ack, protocol.Ack)
            self.statuses.update(zip(ack.ids, ack.statuses, strict=True))

    def wait_acks(self, ids: set[str], timeout_s: float = 30.0) -> None:
        def done() -> bool:
            self.collect(10)
            return ids <= self.statuses.keys()

        wait_for(done, timeout_s, f"acks for {len(ids - self.statuses.keys())} ids")


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


def _stored(url: str) -> dict[str, bytes]:
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as db:
            return {
                pid: counts
                for pid, counts in db.execute(select(Presentation.id, Presentation.spike_counts))
            }
    finally:
        engine.dispose()


def _malformed(world: World, rng: random.Random, i: int) -> tuple[list[bytes], str]:
    """A bad frame of kind i % 6 and the reason the ingest must count it under."""
    good = make_message(world, 10_000 + i).encode()
    kind = i % 6
    if kind == 0:
        return [rng.randbytes(rng.randrange(1, 40)) for _ in range(rng.choice((1, 2, 3, 4)))], ""
    if kind == 1:
        return [good[0], good[1], good[2][: rng.randrange(0, len(good[2]) - 1)]], "bad_payload"
    if kind == 2:
        header = msgpack.unpackb(good[1])
        header["v"] = 99
        return [good[0], msgpack.packb(header), good[2]], "bad_version"
    if kind == 3:
        return [
            good[0],
            b"\x80" + b"\0" * (protocol.MAX_HEADER_BYTES + 1),
            good[2],
        ], "header_too_large"
    if kind == 4:
        header = msgpack.unpackb(good[1])
        header["window_end_ms"] = float("nan")
        return [good[0], msgpack.packb(header), good[2]], "nan_field"
    return make_message(world, 10_000 + i, session_id=987_654).encode(), "unknown_session"


def test_curve_ingest_stores_dedups_rejects_and_survives_garbage(
    database_url: str, tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    server_keys = zmq.curve_keypair()
    rig_keys = zmq.curve_keypair()
    world = build_world(database_url, rig_public_key=rig_keys[0].decode())
    engine = make_engine(database_url)
    srv = IngestServer(_settings(tmp_path, database_url, server_keys), make_sessionmaker(engine))
    srv.start()
    try:
        assert srv.endpoint is not None
        client = Client(ctx, srv.endpoint, server_keys[0], rig_keys)
        rng = random.Random(5)
        valid = [make_message(world, i) for i in range(300)]
        expected_reasons: dict[str, int] = {}
        n_bad = 120
        for i, msg in enumerate(valid):
            client.send(msg.encode())
            if i < n_bad:
                frames, reason = _malformed(world, rng, i)
                client.send(frames)
                if reason:
                    expected_reasons[reason] = expected_reasons.get(reason, 0) + 1
        valid_ids = {m.presentation_id for m in valid}
        client.wait_acks(valid_ids)
        assert {client.statuses[pid] for pid in valid_ids} == {"stored"}
        wait_for(lambda: srv.status()["received"] == 300 + n_bad, what="every frame counted")
        st = srv.status()
        assert st["stored"] == 300 and st["running"] and st["curve"]
        rejected = st["rejected"]
        for reason, n in expected_reasons.items():
            assert rejected.get(reason, 0) >= n, (reason, rejected)
        assert sum(rejected.values()) == n_bad
        # frames whose id was still readable were acked as rejected
        assert (
            client.statuses[make_message(world, 10_002).presentation_id] == "rejected:bad_version"
        )
        assert (
            client.statuses[make_message(world, 10_005).presentation_id]
            == "rejected:unknown_session"
        )
        stored = _stored(database_url)
        assert stored.keys() == valid_ids
        for msg in valid[:20]:
            idx = int(msg.presentation_id.replace("-", ""), 16) - 1
            assert np.array_equal(
                np.frombuffer(stored[msg.presentation_id], "<u2"),
                expected_counts(world.n_sites, idx),
            )
        # a re-send is a duplicate and stores nothing new
        client.statuses.clear()
        for msg in valid[:50]:
            client.send(msg.encode())
        client.wait_acks({m.presentation_id for m in valid[:50]})
        assert set(client.statuses.values()) == {"duplicate"}
        assert len(_stored(database_url)) == 300
    finally:
        srv.stop()
        engine.dispose()


def test_unregistered_key_stores_nothing_until_registered(
    database_url: str, tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    server_keys = zmq.curve_keypair()
    registered = zmq.curve_keypair()
    stranger = zmq.curve_keypair()
    world = build_world(database_url, rig_public_key=registered[0].decode())
    engine = make_engine(database_url)
    srv = IngestServer(_settings(tmp_path, database_url, server_keys), make_sessionmaker(engine))
    srv.start()
    try:
        assert srv.endpoint is not None
        intruder = Client(ctx, srv.endpoint, server_keys[0], stranger)
        plain = Client(ctx, srv.endpoint, None, None)  # no CURVE at all
        for i in range(20):
            for client, n in ((intruder, i), (plain, 100 + i)):
                # once its handshake is refused a client has no pipe left to queue into, and a
                # non-blocking send says so (Again): that too is "nothing reaches the server"
                with contextlib.suppress(zmq.Again):
                    client.sock.send_multipart(make_message(world, n).encode(), flags=zmq.NOBLOCK)
        wait_for(lambda: srv.status()["auth_denied"] >= 1, what="the stranger's handshake refused")
        # the registered rig's traffic, sent after the refusals, is stored: the loop is healthy
        friend = Client(ctx, srv.endpoint, server_keys[0], registered)
        friend.send(make_message(world, 500).encode())
        friend.wait_acks({make_message(world, 500).presentation_id})
        intruder.collect(100)
        plain.collect(100)
        assert intruder.statuses == {} and plain.statuses == {}
        assert set(_stored(database_url)) == {make_message(world, 500).presentation_id}
        assert srv.status()["received"] == 1
        # registering the key (as PATCH /rigs/{name} does) admits it without a restart
        with transaction(make_sessionmaker(engine)) as db:
            db.execute(
                update(Rig)
                .where(Rig.id == world.rig_id)
                .values(curve_public_key=stranger[0].decode())
            )
        newcomer = Client(ctx, srv.endpoint, server_keys[0], stranger)
        newcomer.send(make_message(world, 600).encode())
        newcomer.wait_acks({make_message(world, 600).presentation_id})
        assert newcomer.statuses[make_message(world, 600).presentation_id] == "stored"
    finally:
        srv.stop()
        engine.dispose()


def test_without_server_keys_refuses_unless_insecure(
    database_url: str, tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    world = build_world(database_url)
    engine = make_engine(database_url)
    factory = make_sessionmaker(engine)
    settings = _settings(tmp_path, database_url, None)
    with pytest.raises(IngestConfigError, match="POPCONTROL_CURVE_SECRET_KEY"):
        IngestServer(settings, factory).start()
    half = settings.model_copy(update={"curve_public_key": zmq.curve_keypair()[0].decode()})
    with pytest.raises(IngestConfigError, match="only one"):
        IngestServer(half, factory).start()
    srv = IngestServer(settings, factory, insecure=True)
    srv.start()
    try:
        assert srv.endpoint is not None and not srv.status()["curve"]
        client = Client(ctx, srv.endpoint, None, None)
        client.send(make_message(world, 1).encode())
        client.wait_acks({make_message(world, 1).presentation_id})
        assert client.statuses[make_message(world, 1).presentation_id] == "stored"
    finally:
        srv.stop()
        engine.dispose()
    with make_sessionmaker(make_engine(database_url))() as db:
        assert db.scalar(select(func.count()).select_from(Presentation)) == 1

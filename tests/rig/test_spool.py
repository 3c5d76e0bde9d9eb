"""The spool keeps every record until its ack, across process deaths, and never duplicates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from rig.spool import Spool, pack_frames, unpack_frames


def _frames(i: int) -> list[bytes]:
    return [b"pres", f"header-{i}".encode(), bytes([i % 256]) * (i % 7)]


def test_frames_round_trip_and_reject_garbage() -> None:
    frames = [b"", b"a", bytes(range(256)) * 3]
    assert unpack_frames(pack_frames(frames)) == frames
    blob = pack_frames(frames)
    for bad in (blob[:-1], blob + b"x", b"\x01\x00"):
        with pytest.raises(ValueError):
            unpack_frames(bad)


def test_put_is_idempotent_pending_is_ordered_ack_deletes(tmp_path: Path) -> None:
    ids = [str(uuid.uuid4()) for _ in range(10)]
    with Spool(tmp_path / "spool.db") as spool:
        assert spool.put(ids[0], _frames(0)) is True
        assert spool.put(ids[0], _frames(99)) is False  # first write wins
        assert spool.put_many((pid, _frames(i)) for i, pid in enumerate(ids)) == 9
        assert spool.depth() == 10
        items = spool.pending(4)
        assert [it.presentation_id for it in items] == ids[:4]
        assert items[0].frames == _frames(0)
        assert [it.presentation_id for it in spool.pending(100, after_seq=items[-1].seq)] == ids[4:]
        assert spool.ack([ids[1], ids[1], "not-spooled"]) == 1
        assert spool.ack(ids[2:4], rejected={ids[3]: "unknown_session"}) == 2
        assert spool.depth() == 7
        assert spool.get(ids[1]) is None
        assert spool.rejected() == {ids[3]: "unknown_session"}
        assert ids[1] not in {it.presentation_id for it in spool.pending(100)}
    with Spool(tmp_path / "spool.db") as reopened:
        assert reopened.depth() == 7
        assert reopened.ack([]) == 0


_WRITER = """
import sys, uuid
from rig.spool import Spool
spool = Spool(sys.argv[1])
i = 0
while True:
    pid = str(uuid.UUID(int=i))
    spool.put(pid, [b"pres", str(i).encode()])
    print(i, flush=True)
    i += 1
"""


def test_killed_writer_loses_no_committed_record(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None
    last = -1
    for line in proc.stdout:
        last = int(line)
        if last >= 300:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    with Spool(path) as spool:
        items = spool.pending(100_000)
    ids = [it.presentation_id for it in items]
    assert len(ids) == len(set(ids))
    # every put that returned before the kill is there, in order, with its payload
    assert len(items) >= last + 1
    for i, it in enumerate(items):
        assert it.presentation_id == str(uuid.UUID(int=i))
        assert it.frames == [b"pres", str(i).encode()]

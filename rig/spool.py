"""The rig's durable outbox: finalised presentation records wait here until the server acks them.

One SQLite file in WAL mode. A record is written (``put``) before it is ever sent, and deleted
(``ack``) only after the server has answered for it, so a crash of the daemon, of the server or
of the network between them loses nothing and a re-send is harmless (the server de-duplicates by
presentation id). Records the server rejects move to a ``rejected`` table with the reason, so a
rejected record is never silently thrown away either.

The ``inbox`` table holds the presenter's messages (flips, fixation breaks) that were
acknowledged to the presenter but whose presentations are not finalised yet: a daemon restarted
after a crash reloads them, so an acknowledged flip is never forgotten. A flip leaves the inbox in
the same transaction that puts its record in the outbox.

Each record is stored as its encoded ZeroMQ frames (``list[bytes]``), exactly as they go on the
wire, plus the wall-clock time it was finalised (for latency figures).
"""

from __future__ import annotations

import sqlite3
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    presentation_id TEXT NOT NULL UNIQUE,
    frames BLOB NOT NULL,
    finalised_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ack_key TEXT NOT NULL UNIQUE,
    frames BLOB NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected (
    presentation_id TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    frames BLOB NOT NULL,
    rejected_at REAL NOT NULL
);
"""


def pack_frames(frames: Sequence[bytes]) -> bytes:
    """Frames -> one blob: a u32 count, then per frame a u32 length and the bytes."""
    parts = [struct.pack("<I", len(frames))]
    for frame in frames:
        parts.append(struct.pack("<I", len(frame)))
        parts.append(bytes(frame))
    return b"".join(parts)


def unpack_frames(blob: bytes) -> list[bytes]:
    """Inverse of ``pack_frames``; raises ValueError on a blob that is not one."""
    view = memoryview(blob)
    if len(view) < 4:
        raise ValueError("spool blob shorter than its frame count")
    (count,) = struct.unpack_from("<I", view, 0)
    offset = 4
    frames: list[bytes] = []
    for _ in range(count):
        if offset + 4 > len(view):
            raise ValueError("spool blob truncated in a frame length")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise ValueError("spool blob truncated in a frame")
        frames.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(view):
        raise ValueError("spool blob has trailing bytes")
    return frames


@dataclass(frozen=True)
class SpoolItem:
    seq: int  # insertion order; records are sent oldest first
    presentation_id: str
    frames: list[bytes]
    finalised_at: float  # time.time() when the record was finalised


class Spool:
    """Durable SQLite WAL outbox keyed by presentation id. Safe to share between threads.

    ``synchronous`` is SQLite's durability setting: ``FULL`` (default) survives power loss,
    ``NORMAL`` survives a killed process but may lose the last commits on power loss.
    """

    def __init__(self, path: Path | str, *, synchronous: str = "FULL") -> None:
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            str(self.path), timeout=30, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(self, presentation_id: str, frames: Sequence[bytes]) -> bool:
        """Store one record; True if it is new, False if that presentation is already spooled."""
        return self.put_many([(presentation_id, frames)]) == 1

    def put_many(
        self, items: Iterable[tuple[str, Sequence[bytes]]], *, forget_inbox: Iterable[str] = ()
    ) -> int:
        """Store records in one transaction (idempotent by presentation id); returns how many new.

        ``forget_inbox``: inbox keys (flips now finalised) deleted in the same transaction.
        """
        now = time.time()
        rows = [(pid, pack_frames(frames), now) for pid, frames in items]
        forget = [(key,) for key in forget_inbox]
        if not rows and not forget:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                before = self._db.total_changes
                self._db.executemany(
                    "INSERT OR IGNORE INTO outbox (presentation_id, frames, finalised_at) "
                    "VALUES (?, ?, ?)",
                    rows,
                )
                added = self._db.total_changes - before
                self._db.executemany("DELETE FROM inbox WHERE ack_key = ?", forget)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return added

    def put_inbox(self, ack_key: str, frames: Sequence[bytes]) -> bool:
        """Keep a presenter message until its presentation is finalised; False if already kept."""
        return self.put_inbox_many([(ack_key, frames)])[0]

    def put_inbox_many(self, items: Sequence[tuple[str, Sequence[bytes]]]) -> list[bool]:
        """Keep presenter messages in one transaction; per item, False if it was already kept."""
        now = time.time()
        out: list[bool] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for key, frames in items:
                    cur = self._db.execute(
                        "INSERT OR IGNORE INTO inbox (ack_key, frames, received_at) "
                        "VALUES (?, ?, ?)",
                        (key, pack_frames(frames), now),
                    )
                    out.append(cur.rowcount == 1)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return out

    def inbox(self) -> list[tuple[str, list[bytes]]]:
        """Every kept presenter message, in arrival order: (ack key, frames)."""
        with self._lock:
            rows = self._db.execute("SELECT ack_key, frames FROM inbox ORDER BY seq").fetchall()
        return [(key, unpack_frames(blob)) for key, blob in rows]

    def forget_inbox_before(self, received_before: float, key_prefix: str) -> int:
        """Drop kept messages whose key starts with ``key_prefix`` received before a time."""
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM inbox WHERE received_at < ? AND substr(ack_key, 1, ?) = ?",
                (received_before, len(key_prefix), key_prefix),
            )
            return cur.rowcount

    def pending(self, limit: int = 1000, *, after_seq: int = 0) -> list[SpoolItem]:
        """Up to ``limit`` unacknowledged records with seq > ``after_seq``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, presentation_id, frames, finalised_at FROM outbox "
                "WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [SpoolItem(seq, pid, unpack_frames(blob), t) for seq, pid, blob, t in rows]

    def get(self, presentation_id: str) -> SpoolItem | None:
        with self._lock:
            row = self._db.execute(
                "SELECT seq, presentation_id, frames, finalised_at FROM outbox "
                "WHERE presentation_id = ?",
                (presentation_id,),
            ).fetchone()
        return None if row is None else SpoolItem(row[0], row[1], unpack_frames(row[2]), row[3])

    def ack(self, ids: Iterable[str], rejected: dict[str, str] | None = None) -> int:
        """Delete acknowledged records; those in ``rejected`` (id -> reason) are kept aside.

        Returns how many records left the outbox (unknown ids are ignored: acks can repeat).
        """
        id_list = list(dict.fromkeys(ids))
        rejected = rejected or {}
        if not id_list:
            return 0
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if rejected:
                    self._db.executemany(
                        "INSERT OR REPLACE INTO rejected (presentation_id, reason, frames, "
                        "rejected_at) SELECT presentation_id, ?, frames, ? FROM outbox "
                        "WHERE presentation_id = ?",
                        [(reason, now, pid) for pid, reason in rejected.items()],
                    )
                before = self._db.total_changes
                self._db.executemany(
                    "DELETE FROM outbox WHERE presentation_id = ?", [(pid,) for pid in id_list]
                )
                removed = self._db.total_changes - before
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return removed

    def depth(self) -> int:
        """How many records wait for an ack."""
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(n)

    def rejected(self) -> dict[str, str]:
        """Records the server refused: presentation id -> reason."""
        with self._lock:
            rows = self._db.execute("SELECT presentation_id, reason FROM rejected").fetchall()
        return {pid: reason for pid, reason in rows}

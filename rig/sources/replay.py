"""Recordings of the native stream (``popcontrol rig --record FILE``) and a source that replays them.

File layout: the magic ``b"POPCREC1"``, then records, each

    u32 body length | u32 crc32 of the body | f64 host time (s) | body

where body = u32 frame count, then per frame u32 length + bytes: the frames of one native
message exactly as they travelled (``rig.protocol``). Everything little-endian. A daemon killed
mid-write leaves a torn last record; readers stop there and count it (``torn_tail``).

``ReplaySource`` gives back ``Spikes`` / ``DigitalEvents`` through ``read`` like any source and
keeps the recorded presenter messages (``Flip``, ``FixationBreak``) for ``read_control``, so a
replay through the aligner reproduces the session's records. Pacing: as fast as possible, or
``speed`` times the recorded pace.
"""

from __future__ import annotations

import logging
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from rig.protocol import DecodeError, DigitalEvents, FixationBreak, Flip, Spikes, decode
from rig.sources.base import DEFAULT_SAMPLE_RATE_HZ, Chunk

log = logging.getLogger(__name__)

MAGIC = b"POPCREC1"
_RECORD = struct.Struct("<IId")  # body length, crc32, host time
_U32 = struct.Struct("<I")
MAX_RECORD_BYTES = 64 * 1024 * 1024


def _pack(frames: Sequence[bytes]) -> bytes:
    parts = [_U32.pack(len(frames))]
    for frame in frames:
        parts.append(_U32.pack(len(frame)))
        parts.append(bytes(frame))
    return b"".join(parts)


def _unpack(body: bytes) -> list[bytes]:
    (n,) = _U32.unpack_from(body, 0)
    pos, frames = 4, []
    for _ in range(n):
        (size,) = _U32.unpack_from(body, pos)
        pos += 4
        if pos + size > len(body):
            raise ValueError("frame runs past its record")
        frames.append(body[pos : pos + size])
        pos += size
    if pos != len(body):
        raise ValueError("bytes left after the last frame")
    return frames


def _intact_length(path: Path) -> int:
    """Bytes of the file up to the end of its last intact record."""
    end = len(MAGIC)
    with path.open("rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError(
                f"{path} exists and is not a popcontrol recording; choose another file"
            )
        while True:
            head = f.read(_RECORD.size)
            if len(head) < _RECORD.size:
                return end
            size, crc, _ = _RECORD.unpack(head)
            body = f.read(size) if size <= MAX_RECORD_BYTES else b""
            if len(body) != size or zlib.crc32(body) != crc:
                return end
            end += _RECORD.size + size


class Recorder:
    """Appends native messages to a recording file (creates it, or continues a valid one)."""

    def __init__(self, path: str | Path, fsync_every: int = 0) -> None:
        self.path = Path(path)
        self.fsync_every = fsync_every  # 0: leave syncing to the OS
        self.records = 0
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists:
            intact = _intact_length(self.path)
            if intact < self.path.stat().st_size:
                log.warning("recording %s: dropping a torn last record before appending", self.path)
                with self.path.open("r+b") as f:
                    f.truncate(intact)
        self._file: BinaryIO = self.path.open("ab")
        if not exists:
            self._file.write(MAGIC)

    def write(self, frames: Sequence[bytes], host_time_s: float | None = None) -> None:
        body = _pack(frames)
        t = time.time() if host_time_s is None else host_time_s
        self._file.write(_RECORD.pack(len(body), zlib.crc32(body), t) + body)
        self.records += 1
        if self.fsync_every and self.records % self.fsync_every == 0:
            self.flush(sync=True)

    def flush(self, sync: bool = False) -> None:
        self._file.flush()
        if sync:
            import os

            os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._file.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RecordingStats:
    records: int = 0
    torn_tail: bool = False
    undecodable: dict[str, int] = field(default_factory=dict)


def read_recording(
    path: str | Path, stats: RecordingStats | None = None
) -> Iterator[tuple[float, list[bytes]]]:
    """(host time, frames) of every intact record, in order."""
    stats = stats if stats is not None else RecordingStats()
    with Path(path).open("rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError(f"{path} is not a popcontrol recording (no {MAGIC!r} at its start)")
        while True:
            head = f.read(_RECORD.size)
            if not head:
                return
            if len(head) < _RECORD.size:
                stats.torn_tail = True
                return
            size, crc, t = _RECORD.unpack(head)
            body = f.read(size) if size <= MAX_RECORD_BYTES else b""
            if len(body) != size or zlib.crc32(body) != crc:
                stats.torn_tail = True
                log.warning(
                    "recording %s: torn or corrupt record after %d records; stopping there",
                    path,
                    stats.records,
                )
                return
            try:
                frames = _unpack(body)
            except (ValueError, struct.error):
                stats.torn_tail = True
                return
            stats.records += 1
            yield t, frames


class ReplaySource:
    """``Source`` over a recording; presenter messages come out of ``read_control``."""

    def __init__(
        self,
        path: str | Path,
        speed: float | None = None,
        sample_rate_hz: float = DEFAULT_SAMPLE_RATE_HZ,
        max_chunks_per_read: int = 256,
    ) -> None:
        self.path = Path(path)
        self.speed = speed
        self.sample_rate_hz = sample_rate_hz
        self.max_chunks_per_read = max_chunks_per_read
        self.stats = RecordingStats()
        self._it: Iterator[tuple[float, list[bytes]]] | None = None
        self._next: tuple[float, list[bytes]] | None = None
        self._control: list[Flip | FixationBreak] = []
        self._ends: dict[str, int] = {}
        self._t0: tuple[float, float] | None = None  # (recorded, wall) at the first record
        self.exhausted = False

    def start(self) -> None:
        self._it = read_recording(self.path, self.stats)
        self._advance()

    def stop(self) -> None:
        self._it = None

    def on_flip(self, flip: Flip) -> None:
        """A replay already holds its flips."""

    def on_fixation_break(self, brk: FixationBreak) -> None:
        """A replay already holds its fixation breaks."""

    def stream_position(self) -> int:
        return min(self._ends.values()) if self._ends else 0

    def read_control(self) -> list[Flip | FixationBreak]:
        """Presenter messages replayed so far (each once)."""
        out, self._control = self._control, []
        return out

    def _advance(self) -> None:
        assert self._it is not None, "call start() first"
        self._next = next(self._it, None)
        if self._next is None:
            self.exhausted = True

    def read(self, timeout_ms: int) -> list[Chunk]:
        out: list[Chunk] = []
        deadline = time.monotonic() + timeout_ms / 1000
        while self._next is not None and len(out) < self.max_chunks_per_read:
            t, frames = self._next
            if self.speed is not None:
                if self._t0 is None:
                    self._t0 = (t, time.monotonic())
                due = self._t0[1] + (t - self._t0[0]) / self.speed
                now = time.monotonic()
                if due > now:
                    if out or due > deadline:
                        break
                    time.sleep(due - now)
            self._advance()
            try:
                msg = decode(frames)
            except DecodeError as exc:
                self.stats.undecodable[exc.reason] = self.stats.undecodable.get(exc.reason, 0) + 1
                continue
            if isinstance(msg, Spikes | DigitalEvents):
                self._ends[msg.TOPIC.decode()] = max(
                    self._ends.get(msg.TOPIC.decode(), 0), msg.last_sample
                )
                out.append(msg)
            elif isinstance(msg, Flip | FixationBreak):
                self._control.append(msg)
        return out

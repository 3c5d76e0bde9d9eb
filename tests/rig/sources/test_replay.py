"""Recorder + ReplaySource: a recorded session replays through the aligner to the same records."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from rig.align import AlignConfig, Aligner
from rig.protocol import FixationBreak, Flip, Heartbeat, PresentationRecord
from rig.sources.base import Source
from rig.sources.replay import MAGIC, Recorder, ReplaySource, read_recording
from tests.rig.planted import PD_LINE, WORD_LINE, plant


def record_session(path: Path, n_pres: int = 10) -> tuple[list[PresentationRecord], int]:
    """Run the planted stream through an aligner while recording every native message."""
    p = plant(seed=31, n_pres=n_pres)
    aligner = Aligner(AlignConfig(n_sites=p.n_sites, word_line=WORD_LINE, photodiode_line=PD_LINE))
    records: list[PresentationRecord] = []
    next_flip = 0
    with Recorder(path) as rec:
        for k, (spk, evt) in enumerate(p.chunks()):
            while next_flip < len(p.flips) and p.word_samples[next_flip] <= spk.last_sample:
                rec.write(p.flips[next_flip].encode(), host_time_s=k * 0.01)
                aligner.add_flip(p.flips[next_flip])
                next_flip += 1
            rec.write(spk.encode(), host_time_s=k * 0.01)
            rec.write(evt.encode(), host_time_s=k * 0.01)
            aligner.add_spikes(spk)
            aligner.add_events(evt)
            records += aligner.finalize_ready(spk.last_sample)
        rec.write([b"junk", b"\x00"], host_time_s=0.0)  # undecodable frames are counted on replay
    return records, p.n_sites


def replay(
    path: Path, n_sites: int, speed: float | None = None
) -> tuple[list[PresentationRecord], ReplaySource]:
    src = ReplaySource(path, speed=speed)
    assert isinstance(src, Source)
    aligner = Aligner(AlignConfig(n_sites=n_sites, word_line=WORD_LINE, photodiode_line=PD_LINE))
    out: list[PresentationRecord] = []
    src.start()
    while not src.exhausted:
        chunks = src.read(100)
        for msg in src.read_control():
            if isinstance(msg, Flip):
                aligner.add_flip(msg)
            elif isinstance(msg, FixationBreak):
                aligner.add_fixation_break(msg)
        for chunk in chunks:
            if chunk.TOPIC == b"spk":
                aligner.add_spikes(chunk)  # type: ignore[arg-type]
            else:
                aligner.add_events(chunk)  # type: ignore[arg-type]
        out += aligner.finalize_ready(src.stream_position())
    src.stop()
    return out, src


def test_replay_reproduces_the_records(tmp_path: Path) -> None:
    path = tmp_path / "session.rec"
    live, n_sites = record_session(path)
    assert path.read_bytes()[: len(MAGIC)] == MAGIC
    replayed, src = replay(path, n_sites)
    assert len(live) == len(replayed) == 10
    for a, b in zip(live, replayed, strict=True):
        assert a.presentation_id == b.presentation_id and a.onset_sample == b.onset_sample
        assert np.array_equal(a.spike_counts, b.spike_counts)
        assert a.encode() == b.encode()
    assert src.stats.undecodable == {"bad_topic": 1}
    assert not src.stats.torn_tail


def test_torn_tail_stops_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "torn.rec"
    with Recorder(path) as rec:
        for i in range(5):
            rec.write(
                Heartbeat(rig="r", stream="hb", seq=i, host_time_s=float(i)).encode(),
                host_time_s=float(i),
            )
    data = path.read_bytes()
    path.write_bytes(data[:-3])  # the daemon died mid-write
    from rig.sources.replay import RecordingStats

    stats = RecordingStats()
    assert [t for t, _ in read_recording(path, stats)] == [0.0, 1.0, 2.0, 3.0]
    assert stats.torn_tail
    # a restarted recorder drops the torn record and appends after the intact ones
    with Recorder(path) as rec:
        rec.write(Heartbeat(rig="r", stream="hb", seq=9, host_time_s=9.0).encode(), host_time_s=9.0)
    stats = RecordingStats()
    assert [t for t, _ in read_recording(path, stats)] == [0.0, 1.0, 2.0, 3.0, 9.0]
    assert not stats.torn_tail


def test_not_a_recording(tmp_path: Path) -> None:
    path = tmp_path / "other.bin"
    path.write_bytes(b"something else")
    with pytest.raises(ValueError, match="not a popcontrol recording"):
        Recorder(path)
    with pytest.raises(ValueError, match="not a popcontrol recording"):
        list(read_recording(path))


def test_paced_replay_takes_the_recorded_time(tmp_path: Path) -> None:
    path = tmp_path / "paced.rec"
    record_session(path, n_pres=1)  # chunks recorded 10 ms apart
    n_chunks = sum(1 for _ in read_recording(path))
    t0 = time.monotonic()
    replay(path, 6, speed=20.0)
    elapsed = time.monotonic() - t0
    recorded_s = (n_chunks // 2) * 0.01
    assert elapsed >= 0.9 * recorded_s / 20.0

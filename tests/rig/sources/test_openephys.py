"""Open Ephys source against a publisher that speaks the ZMQ Interface plugin's format on loopback."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import zmq

from rig.align import AlignConfig, Aligner
from rig.protocol import PresentationRecord
from rig.sources.base import PHOTODIODE_LINE, WORD_LINE, Source
from rig.sources.openephys import OpenEphysConfig, OpenEphysSource
from tests.rig.planted import PD_LINE, RATE_HZ, Planted, plant

PD_TTL_LINE = 16
BUFFER = 300  # samples per continuous buffer (10 ms)


def free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return int(port)
    raise RuntimeError("no free pair of ports")


@dataclass
class PluginPublisher:
    """Sends a planted stream the way the plugin does: XPUB (so it knows the SUB joined) + REP."""

    port: int
    heartbeats: list[dict[str, object]] = field(default_factory=list)
    analog_photodiode: bool = False
    drop_spike_from: int | None = None  # lose the first spike message at or after this sample
    dropped_sample: int | None = None
    garbage: bool = False
    _num: int = 0

    def _send(
        self, sock: zmq.Socket, envelope: bytes, header: dict[str, object], payload: bytes | None
    ) -> None:
        self._num += 1
        header = {"message_num": self._num, **header}
        spike = header.get("spike")
        if (
            isinstance(spike, dict)
            and self.drop_spike_from is not None
            and spike["sample_num"] >= self.drop_spike_from
        ):
            self.drop_spike_from = None
            self.dropped_sample = int(spike["sample_num"])
            return  # lost on the way
        frames = [envelope, json.dumps(header).encode()]
        if payload is not None:
            frames.append(payload)
        sock.send_multipart(frames)

    def serve_heartbeats(self, stop: threading.Event) -> None:
        rep: zmq.Socket = zmq.Context.instance().socket(zmq.REP)
        rep.bind(f"tcp://127.0.0.1:{self.port + 1}")
        try:
            while not stop.is_set():
                if rep.poll(20):
                    self.heartbeats.append(json.loads(rep.recv()))
                    rep.send(b"heartbeat received")
        finally:
            rep.close(linger=0)

    def publish(self, p: Planted, stop: threading.Event) -> None:
        pub: zmq.Socket = zmq.Context.instance().socket(zmq.XPUB)
        pub.setsockopt(zmq.SNDHWM, 0)  # the test loses messages only where it means to
        pub.bind(f"tcp://127.0.0.1:{self.port}")
        try:
            while not stop.is_set() and not pub.poll(20):
                pass  # wait for the subscription
            if stop.is_set():
                return
            pub.recv()
            self._stream(pub, p)
            stop.wait(30)
        finally:
            pub.close(linger=0)

    def _stream(self, pub: zmq.Socket, p: Planted) -> None:
        ttl_state = 0
        pd_level = 0.0
        s_samples, e_samples = p.spikes["sample"], p.events["sample"]
        for a in range(0, p.end_sample, BUFFER):
            b = a + BUFFER
            for ev in p.events[np.searchsorted(e_samples, a) : np.searchsorted(e_samples, b)]:
                sample = int(ev["sample"])
                changes: list[tuple[int, int]] = []
                if ev["line"] == WORD_LINE:
                    target = int(ev["word"]) if ev["state"] else 0
                    for bit in range(16):
                        if (ttl_state >> bit & 1) != (target >> bit & 1):
                            changes.append((bit, target >> bit & 1))
                elif ev["line"] == PD_LINE and not self.analog_photodiode:
                    changes.append((PD_TTL_LINE, int(ev["state"])))
                for line, state in changes:
                    ttl_state = ttl_state | (1 << line) if state else ttl_state & ~(1 << line)
                    payload = np.array(
                        [(line, state, ttl_state)], [("l", "u1"), ("s", "u1"), ("w", "<u8")]
                    ).tobytes()
                    content = {"stream": "acq", "source_node": 100, "type": 3, "sample_num": sample}
                    self._send(
                        pub,
                        b"EVENT\x00",
                        {
                            "type": "event",
                            "content": content,
                            "data_size": 10,
                            "timestamp": sample / 30,
                        },
                        payload,
                    )
            for sp in p.spikes[np.searchsorted(s_samples, a) : np.searchsorted(s_samples, b)]:
                spike = {
                    "stream": "acq",
                    "source_node": 101,
                    "electrode": f"Electrode {int(sp['chan']) + 1}",
                    "sample_num": int(sp["sample"]),
                    "num_channels": 1,
                    "num_samples": 4,
                    "sorted_id": 0,
                    "threshold": [-50.0],
                }
                self._send(
                    pub,
                    b"EVENT\x00",
                    {"type": "spike", "spike": spike, "data_size": 16, "timestamp": 0},
                    np.zeros(4, "<f4").tobytes(),
                )
            if self.garbage and a == 10 * BUFFER:
                pub.send_multipart([b"EVENT\x00", b"{not json"])
            # continuous buffers: a neural channel, and the analog photodiode on channel 7
            for chan in (0, 7):
                x = np.zeros(BUFFER, "<f4")
                if chan == 7:
                    pd = p.events[(p.events["line"] == PD_LINE)]
                    x[:] = pd_level
                    for ev in pd[(pd["sample"] >= a) & (pd["sample"] < b)]:
                        pd_level = 1.0 if ev["state"] else 0.0
                        x[int(ev["sample"]) - a :] = pd_level
                    x += np.float32(0.02) * np.sin(
                        np.arange(BUFFER, dtype="<f4")
                    )  # noise within hysteresis
                content = {
                    "stream": "acq",
                    "channel_num": chan,
                    "channel_name": f"CH{chan}",
                    "num_samples": BUFFER,
                    "sample_num": a,
                    "sample_rate": RATE_HZ,
                }
                self._send(
                    pub,
                    b"DATA\x00",
                    {
                        "type": "data",
                        "content": content,
                        "data_size": 4 * BUFFER,
                        "timestamp": a / 30,
                    },
                    x.tobytes(),
                )


@pytest.fixture
def harness() -> Iterator[tuple[int, threading.Event]]:
    stop = threading.Event()
    port = free_port_pair()
    yield port, stop
    stop.set()


def run_source(
    p: Planted, pub: PluginPublisher, stop: threading.Event, cfg: OpenEphysConfig
) -> tuple[dict[str, PresentationRecord], OpenEphysSource, Aligner]:
    threads = [
        threading.Thread(target=pub.serve_heartbeats, args=(stop,), daemon=True),
        threading.Thread(target=pub.publish, args=(p, stop), daemon=True),
    ]
    for t in threads:
        t.start()
    source = OpenEphysSource(cfg)
    assert isinstance(source, Source)
    aligner = Aligner(
        AlignConfig(n_sites=p.n_sites, word_line=WORD_LINE, photodiode_line=PHOTODIODE_LINE)
    )
    out: dict[str, PresentationRecord] = {}
    source.start()
    try:
        next_flip = 0
        deadline = time.monotonic() + 30
        while source.stream_position() < p.end_sample - BUFFER and time.monotonic() < deadline:
            for chunk in source.read(50):
                if chunk.TOPIC == b"spk":
                    aligner.add_spikes(chunk)  # type: ignore[arg-type]
                else:
                    aligner.add_events(chunk)  # type: ignore[arg-type]
            while (
                next_flip < len(p.flips) and p.word_samples[next_flip] <= source.stream_position()
            ):
                aligner.add_flip(p.flips[next_flip])
                next_flip += 1
            for rec in aligner.finalize_ready(source.stream_position()):
                out[rec.presentation_id] = rec
        # keep reading briefly so a heartbeat sent near the end gets its reply counted
        deadline = time.monotonic() + 5
        while source.counters.heartbeat_replies == 0 and time.monotonic() < deadline:
            source.read(20)
    finally:
        source.stop()
        stop.set()
        for t in threads:
            t.join(5)
    return out, source, aligner


def test_plugin_stream_yields_planted_counts(harness: tuple[int, threading.Event]) -> None:
    port, stop = harness
    p = plant(seed=21, n_pres=16)
    pub = PluginPublisher(port, garbage=True)
    cfg = OpenEphysConfig(
        endpoint=f"tcp://127.0.0.1:{port}",
        photodiode_ttl_line=PD_TTL_LINE,
        heartbeat_interval_s=0.05,
    )
    out, source, aligner = run_source(p, pub, stop, cfg)
    assert len(out) == len(p.flips)
    for i, f in enumerate(p.flips):
        rec = out[f.presentation_id]
        assert rec.valid, rec.invalid_reason
        assert rec.onset_source == "photodiode"
        assert rec.onset_sample == p.onsets[i]
        assert np.array_equal(rec.spike_counts, p.expected[i]), i
    assert source.counters.bad_messages == 1
    assert source.counters.lost_messages == 0 and source.counters.late_records == 0
    assert aligner.counters.words_matched == len(p.flips)
    assert pub.heartbeats and pub.heartbeats[0]["type"] == "heartbeat"
    assert {"application", "uuid", "type"} <= set(pub.heartbeats[0])
    assert source.counters.heartbeat_replies >= 1


def test_analog_photodiode_is_thresholded(harness: tuple[int, threading.Event]) -> None:
    port, stop = harness
    p = plant(seed=22, n_pres=8)
    pub = PluginPublisher(port, analog_photodiode=True)
    cfg = OpenEphysConfig(
        endpoint=f"tcp://127.0.0.1:{port}", photodiode_ttl_line=None, photodiode_channel=7
    )
    out, source, _ = run_source(p, pub, stop, cfg)
    assert source.counters.lost_messages == 0
    for i, f in enumerate(p.flips):
        assert out[f.presentation_id].onset_sample == p.onsets[i]
        assert np.array_equal(out[f.presentation_id].spike_counts, p.expected[i])


def test_lost_messages_become_a_stream_gap(harness: tuple[int, threading.Event]) -> None:
    port, stop = harness
    p = plant(seed=23, n_pres=8)
    pub = PluginPublisher(port, drop_spike_from=int(p.onsets[3] + 100 * 30))
    cfg = OpenEphysConfig(endpoint=f"tcp://127.0.0.1:{port}", photodiode_ttl_line=PD_TTL_LINE)
    out, source, aligner = run_source(p, pub, stop, cfg)
    assert source.counters.lost_messages == 1
    assert aligner.counters.gaps >= 2  # the stream's start and the lost interval
    assert len(out) == len(p.flips)
    reasons = [out[f.presentation_id].invalid_reason for f in p.flips]
    assert pub.dropped_sample is not None
    hit = [
        i
        for i in range(len(p.flips))
        if p.onsets[i] + 70 * 30 <= pub.dropped_sample < p.onsets[i] + 170 * 30
    ]
    for i in hit:
        assert reasons[i] == "stream_gap", (i, reasons)
    assert reasons.count(None) >= len(p.flips) - 2, reasons  # only what overlaps the lost buffer
    for i, f in enumerate(p.flips):
        if out[f.presentation_id].valid:
            assert np.array_equal(out[f.presentation_id].spike_counts, p.expected[i])


def test_electrode_names_and_word_lines() -> None:
    src = OpenEphysSource(
        OpenEphysConfig(electrode_channels={"tetrode A": 40}, word_lines=(3, 4, 5))
    )
    assert src._channel("Electrode 1") == 0
    assert src._channel("CH96") == 95
    assert src._channel("tetrode A") == 40
    assert src._channel("nameless") is None
    assert src._words.value(0b101000) == 0b101  # lines 3 and 5 -> bits 0 and 2
    cfg = OpenEphysConfig(endpoint="tcp://10.0.0.2:6000")
    assert cfg.heartbeat_address() == "tcp://10.0.0.2:6001"

"""rig.protocol: every message round-trips; every malformed frame raises DecodeError with its reason."""

from __future__ import annotations

import random
import uuid
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rig import protocol as p

SHA = "ab" * 32


def _flip(**over: Any) -> p.Flip:
    fields: dict[str, Any] = dict(
        rig="rig-1",
        stream="flip",
        seq=7,
        presentation_id=str(uuid.uuid4()),
        session_id=3,
        block_id=4,
        stimulus_id=SHA,
        trial=2,
        position=5,
        event_word=0xBEEF,
        host_flip_time_s=12.5,
        dropped_frames=1,
        fixation_ok=True,
    )
    fields.update(over)
    return p.Flip(**fields)


def _record(**over: Any) -> p.PresentationRecord:
    fields: dict[str, Any] = dict(
        rig="rig-1",
        stream="pres",
        seq=2**64 - 1,
        presentation_id=str(uuid.uuid4()),
        session_id=1,
        block_id=2,
        stimulus_id=SHA,
        trial_index=3,
        position=1,
        onset_sample=123_456_789_012,
        onset_source="photodiode",
        fixation_ok=True,
        dropped_frames=0,
        valid=True,
        invalid_reason=None,
        window_start_ms=70.0,
        window_end_ms=170.0,
        spike_counts=np.array([0, 1, 65535, 7], dtype=np.uint16),
    )
    fields.update(over)
    return p.PresentationRecord(**fields)


def _spikes(n: int = 5) -> p.Spikes:
    arr = np.zeros(n, p.SPIKE_DTYPE)
    arr["sample"] = np.arange(n) * 10 + 100
    arr["chan"] = np.arange(n) % 3
    arr["unit"] = 1
    return p.Spikes(
        rig="r", stream="spk", seq=1, first_sample=100, last_sample=100 + 10 * n, spikes=arr
    )


def _events() -> p.DigitalEvents:
    ev = np.array([(10, 0, 1, 513), (12, 1, 1, 0), (40, 1, 0, 0)], p.EVENT_DTYPE)
    return p.DigitalEvents(rig="r", stream="evt", seq=9, first_sample=0, last_sample=41, events=ev)


def valid_messages() -> list[p.Message]:
    return [
        _spikes(),
        _spikes(0),
        _events(),
        _flip(),
        p.FixationBreak(
            rig="r", stream="flip", seq=8, session_id=1, block_id=2, trial=3, host_time_s=1.25
        ),
        p.Heartbeat(rig="r", stream="hb", seq=0, host_time_s=3.0, spool_depth=12),
        p.Heartbeat(rig="r", stream="hb", seq=1, host_time_s=3.0),
        _record(),
        _record(
            valid=False,
            invalid_reason="fixation_break",
            onset_sample=None,
            onset_source="host_clock",
            raster=np.arange(4 * 40, dtype=np.uint16).reshape(4, 40),
            raster_bin_ms=10.0,
            raster_start_ms=-100.0,
        ),
        _record(raster=np.ones((4, 3), np.uint8), raster_bin_ms=5, raster_start_ms=-100),
        p.Ack(
            rig="srv",
            stream="ack",
            seq=5,
            ids=[str(uuid.uuid4()), "fixb:1:2:3"],
            statuses=["stored", "rejected:unknown_session"],
        ),
        p.Ack(rig="srv", stream="ack", seq=6, ids=[], statuses=[]),
    ]


def _same(a: p.Message, b: p.Message) -> None:
    assert type(a) is type(b)
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray)
            assert x.dtype == y.dtype and np.array_equal(x, y), name
        else:
            assert x == y, name


@pytest.mark.parametrize("msg", valid_messages(), ids=lambda m: type(m).__name__)
def test_round_trip(msg: p.Message) -> None:
    frames = msg.encode()
    assert frames[0] == msg.TOPIC
    assert len(frames) == (3 if msg.HAS_PAYLOAD else 2)
    out = p.decode(frames)
    _same(msg, out)
    assert p.decode(out.encode())  # decoded messages re-encode


def test_payload_layouts_are_little_endian_records() -> None:
    spk = _spikes(2)
    assert spk.encode()[2] == spk.spikes.astype(p.SPIKE_DTYPE).tobytes()
    assert p.SPIKE_DTYPE.itemsize == 12 and p.EVENT_DTYPE.itemsize == 12
    rec = _record(raster=np.full((4, 2), 3, np.uint8), raster_bin_ms=10, raster_start_ms=-100)
    payload = rec.encode()[2]
    assert payload[:8] == np.array([0, 1, 65535, 7], "<u2").tobytes()
    assert payload[8:] == bytes([3] * 8)
    header = msgpack.unpackb(rec.encode()[1])
    assert header["n_sites"] == 4 and header["raster_bins"] == 2 and header["raster_dtype"] == "u1"
    assert header["v"] == p.PROTOCOL_VERSION


def test_ack_keys() -> None:
    flip = _flip()
    assert p.ack_key(flip) == flip.presentation_id
    fixb = p.FixationBreak(
        rig="r", stream="flip", seq=1, session_id=1, block_id=2, trial=3, host_time_s=0.0
    )
    again = p.FixationBreak(
        rig="r", stream="flip", seq=99, session_id=1, block_id=2, trial=3, host_time_s=0.0
    )
    assert p.ack_key(fixb) == p.ack_key(again) == "fixb:1:2:3"


def _header(msg: p.Message) -> dict[str, Any]:
    out: dict[str, Any] = msgpack.unpackb(msg.encode()[1])
    return out


def _with_header(msg: p.Message, header: dict[str, Any]) -> list[bytes]:
    frames = msg.encode()
    frames[1] = msgpack.packb(header)
    return frames


def _reason(frames: Any) -> str:
    with pytest.raises(p.DecodeError) as info:
        p.decode(frames)
    assert info.value.reason in p.REASONS
    assert info.value.message  # says what is wrong
    return info.value.reason


def test_each_reason_code() -> None:
    flip = _flip()
    h = _header(flip)
    assert _reason([b"nope", flip.encode()[1]]) == "bad_topic"
    assert _reason([b"flip"]) == "bad_frames"
    assert _reason([b"flip", b"x", b"y", b"z"]) == "bad_frames"
    assert _reason([b"flip", "text"]) == "bad_frames"
    assert _reason([b"flip", b"\xc1"]) == "bad_header"  # 0xc1 is never used in msgpack
    assert _reason([b"flip", msgpack.packb([1, 2])]) == "bad_header"
    assert _reason([b"flip", msgpack.packb(h) + b"\x00"]) == "bad_header"  # trailing bytes
    assert _reason([b"flip", b"\x00" * (p.MAX_HEADER_BYTES + 1)]) == "header_too_large"
    assert _reason(_with_header(flip, {**h, "v": 2})) == "bad_version"
    assert _reason(_with_header(flip, {**h, "v": True})) == "bad_version"
    assert _reason(_with_header(flip, {k: v for k, v in h.items() if k != "v"})) == "missing_field"
    assert (
        _reason(_with_header(flip, {k: v for k, v in h.items() if k != "trial"})) == "missing_field"
    )
    assert _reason(_with_header(flip, {**h, "extra": 1})) == "unknown_field"
    assert _reason(_with_header(flip, {**h, "host_flip_time_s": float("nan")})) == "nan_field"
    assert _reason(_with_header(flip, {**h, "host_flip_time_s": float("inf")})) == "nan_field"
    assert _reason(_with_header(flip, {**h, "event_word": 65536})) == "bad_field"
    assert _reason(_with_header(flip, {**h, "trial": -1})) == "bad_field"
    assert _reason(_with_header(flip, {**h, "trial": True})) == "bad_field"
    assert _reason(_with_header(flip, {**h, "fixation_ok": 1})) == "bad_field"
    assert _reason(_with_header(flip, {**h, "presentation_id": "not-a-uuid"})) == "bad_field"
    assert _reason(_with_header(flip, {**h, "stimulus_id": "AB" * 32})) == "bad_field"
    assert _reason(_with_header(flip, {**h, "rig": b"bytes"})) == "bad_field"
    assert _reason([*flip.encode(), b"payload"]) == "bad_payload"

    spk = _spikes(3)
    frames = spk.encode()
    assert _reason(frames[:2]) == "bad_payload"
    assert _reason([frames[0], frames[1], frames[2][:-1]]) == "bad_payload"  # truncated
    assert (
        _reason([frames[0], frames[1], b"\x00" * (p.MAX_PAYLOAD_BYTES + 12)]) == "payload_too_large"
    )
    unsorted = spk.spikes[::-1].tobytes()
    assert _reason([frames[0], frames[1], unsorted]) == "bad_payload"
    hs = _header(spk)
    assert _reason(_with_header(spk, {**hs, "last_sample": 110})) == "bad_payload"  # outside range
    assert (
        _reason(_with_header(spk, {**hs, "first_sample": 200, "last_sample": 100})) == "bad_field"
    )

    ev = _events()
    bad_state = ev.events.copy()
    bad_state["state"][0] = 2
    assert _reason([*ev.encode()[:2], bad_state.tobytes()]) == "bad_payload"

    rec = _record()
    hr = _header(rec)
    payload = rec.encode()[2]
    assert _reason([b"pres", rec.encode()[1], payload[:-1]]) == "bad_payload"
    assert _reason([b"pres", rec.encode()[1], payload + b"\x00\x00"]) == "bad_payload"
    assert _reason(_with_header(rec, {**hr, "n_sites": 0})) == "bad_field"
    assert _reason(_with_header(rec, {**hr, "onset_source": "guess"})) == "bad_field"
    assert _reason(_with_header(rec, {**hr, "valid": False})) == "bad_field"  # no reason given
    assert (
        _reason(_with_header(rec, {**hr, "invalid_reason": "x"})) == "bad_field"
    )  # valid + reason
    assert _reason(_with_header(rec, {**hr, "window_end_ms": 10.0})) == "bad_field"
    assert _reason(_with_header(rec, {**hr, "window_start_ms": float("nan")})) == "nan_field"
    assert _reason(_with_header(rec, {**hr, "raster_bins": 2, "raster_dtype": "f4"})) == "bad_field"
    assert (
        _reason(_with_header(rec, {**hr, "raster_bins": 2, "raster_dtype": "u1"})) == "bad_payload"
    )

    ack = p.Ack(rig="s", stream="ack", seq=0, ids=["a"], statuses=["stored"])
    ha = _header(ack)
    assert _reason(_with_header(ack, {**ha, "statuses": ["maybe"]})) == "bad_field"
    assert _reason(_with_header(ack, {**ha, "statuses": ["rejected:"]})) == "bad_field"
    assert _reason(_with_header(ack, {**ha, "statuses": []})) == "bad_field"
    assert _reason(_with_header(ack, {**ha, "ids": "a"})) == "bad_field"


def test_invalid_messages_cannot_be_built() -> None:
    with pytest.raises(p.MessageError) as info:
        _flip(host_flip_time_s=float("nan"))
    assert info.value.reason == "nan_field"
    with pytest.raises(p.MessageError):
        _record(spike_counts=np.array([70000]))
    with pytest.raises(p.MessageError):
        _record(raster=np.ones((4, 2), np.float32), raster_bin_ms=1, raster_start_ms=0)
    with pytest.raises(p.MessageError):
        p.Spikes(
            rig="r",
            stream="s",
            seq=0,
            first_sample=0,
            last_sample=16 * 1024 * 1024,
            spikes=np.zeros(1_500_000, p.SPIKE_DTYPE),
        ).encode()


def _mutations(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """One random corruption of a valid multipart message."""
    frames = list(frames)
    kind = rng.randrange(7)
    i = rng.randrange(len(frames))
    if kind == 0:  # random bytes in one frame
        frames[i] = rng.randbytes(rng.randrange(0, 64))
    elif kind == 1:  # truncate one frame
        frames[i] = frames[i][: rng.randrange(0, max(1, len(frames[i])))]
    elif kind == 2:  # flip bits
        b = bytearray(frames[i])
        for _ in range(rng.randrange(1, 4)):
            if b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        frames[i] = bytes(b)
    elif kind == 3:  # drop or add a frame
        if rng.random() < 0.5:
            frames.pop(i)
        else:
            frames.insert(i, rng.randbytes(8))
    elif kind == 4:  # header field swapped for a hostile value
        header = msgpack.unpackb(frames[1])
        key = rng.choice(sorted(header))
        header[key] = rng.choice(
            [None, float("nan"), -1, 2**64 - 1, "x" * 300, b"\x00", [1], {"a": 1}, True, 1.5]
        )
        frames[1] = msgpack.packb(header)
    elif kind == 5:  # oversized header
        frames[1] = msgpack.packb(
            {"v": 1, "pad": "x" * (p.MAX_HEADER_BYTES + rng.randrange(1, 100))}
        )
    else:  # wrong version
        header = msgpack.unpackb(frames[1])
        header["v"] = rng.choice([0, 2, 255, "1", 1.0])
        frames[1] = msgpack.packb(header)
    return frames


def test_seeded_fuzz_never_escapes_decode_error() -> None:
    rng = random.Random(20240501)
    valid = valid_messages()
    counts: dict[str, int] = {}
    still_valid = 0
    for _ in range(3000):
        frames = _mutations(rng, rng.choice(valid).encode())
        try:
            msg = p.decode(frames)
        except p.DecodeError as exc:
            assert exc.reason in p.REASONS
            counts[exc.reason] = counts.get(exc.reason, 0) + 1
            continue
        still_valid += 1  # a mutation that happens to stay valid must still re-encode
        assert p.decode(msg.encode())
    for reason in (
        "bad_frames",
        "bad_topic",
        "bad_header",
        "header_too_large",
        "bad_version",
        "bad_field",
        "nan_field",
        "bad_payload",
    ):
        assert counts.get(reason, 0) > 0, f"fuzz never produced {reason}: {counts}"
    assert still_valid < 1000


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_hypothesis_random_frames(frames: list[bytes]) -> None:
    try:
        p.decode(frames)
    except p.DecodeError as exc:
        assert exc.reason in p.REASONS


@settings(max_examples=200, deadline=None)
@given(
    topic=st.sampled_from(sorted(p.MESSAGE_TYPES)),
    header=st.dictionaries(
        st.sampled_from(
            [
                "v",
                "rig",
                "stream",
                "seq",
                "trial",
                "ids",
                "statuses",
                "host_time_s",
                "first_sample",
                "last_sample",
                "n_sites",
            ]
        ),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**63), 2**64 - 1),
            st.floats(),
            st.text(max_size=10),
            st.lists(st.text(max_size=3), max_size=3),
        ),
    ),
    payload=st.one_of(st.none(), st.binary(max_size=64)),
)
def test_hypothesis_structured_headers(
    topic: bytes, header: dict[str, Any], payload: bytes | None
) -> None:
    frames = [topic, msgpack.packb(header)]
    if payload is not None:
        frames.append(payload)
    try:
        msg = p.decode(frames)
    except p.DecodeError as exc:
        assert exc.reason in p.REASONS
    else:
        assert p.decode(msg.encode())

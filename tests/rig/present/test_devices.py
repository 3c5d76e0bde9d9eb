"""Device boundaries: spec parsing, serial event words over a real pseudo-terminal, sim gaze."""

from __future__ import annotations

import os
import time

import pytest

from rig.present.devices import (
    DeviceError,
    SerialDigitalOut,
    SimEyeTracker,
    in_window,
    open_digital_out,
    open_reward,
    parse_eye_spec,
    sim_eye_from_options,
)


def test_serial_output_writes_each_word_as_two_little_endian_bytes() -> None:
    master, slave = os.openpty()
    try:
        out = open_digital_out(f"serial:{os.ttyname(slave)}@115200")
        assert isinstance(out, SerialDigitalOut)
        for word in (0x1234, 1, 0xFFFF, 0):
            out.write_word(word)
        got = b""
        deadline = time.monotonic() + 2
        while len(got) < 8 and time.monotonic() < deadline:
            got += os.read(master, 8 - len(got))
        assert got == bytes([0x34, 0x12, 0x01, 0x00, 0xFF, 0xFF, 0x00, 0x00])
        with pytest.raises(ValueError, match="16-bit"):
            out.write_word(0x10000)
        out.close()
    finally:
        os.close(master)
        os.close(slave)


def test_specs_that_cannot_work_say_how_to_fix_them() -> None:
    with pytest.raises(DeviceError, match="choose sim, serial"):
        open_digital_out("usb")
    with pytest.raises(DeviceError, match="needs a port"):
        open_digital_out("serial")
    with pytest.raises(DeviceError, match="cannot open serial port"):
        open_digital_out("serial:/dev/does-not-exist")
    with pytest.raises(DeviceError, match="choose sim, serial"):
        open_reward("valve")
    with pytest.raises(DeviceError, match="choose sim, mouse or eyelink"):
        parse_eye_spec("tobii")
    with pytest.raises(DeviceError, match="key=value"):
        parse_eye_spec("sim:0.1")
    with pytest.raises(DeviceError, match="break_rate and seed"):
        sim_eye_from_options({"rate": "1"})
    assert parse_eye_spec("eyelink") == ("eyelink", {"address": "100.1.1.1"})


def test_sim_gaze_breaks_at_the_scripted_image_only() -> None:
    eye = SimEyeTracker(scripted_breaks={1: 2}, break_delay_s=0.03)
    eye.begin_trial(500, 4)
    for pos in range(4):
        eye.image_onset(pos, 10.0 + 0.2 * pos)
    assert in_window(eye.gaze_deg(11.0), 2.0)  # trial ordinal 0: no break
    eye.begin_trial(501, 4)
    eye.image_onset(0, 20.0)
    eye.image_onset(1, 20.2)
    assert in_window(eye.gaze_deg(20.3), 2.0)
    eye.image_onset(2, 20.4)
    assert in_window(eye.gaze_deg(20.42), 2.0)
    assert not in_window(eye.gaze_deg(20.44), 2.0)
    assert not in_window(None, 2.0)


def test_sim_break_rate_is_seeded() -> None:
    def breaks(seed: int) -> list[bool]:
        eye = sim_eye_from_options({"break_rate": "0.5", "seed": str(seed)})
        out = []
        for trial in range(40):
            eye.begin_trial(trial, 8)
            for pos in range(8):
                eye.image_onset(pos, trial + pos * 0.1)
            out.append(not in_window(eye.gaze_deg(trial + 0.99), 2.0))
        return out

    assert breaks(1) == breaks(1)
    assert 8 < sum(breaks(1)) < 32
    with pytest.raises(ValueError, match="probability"):
        SimEyeTracker(break_rate=1.5)

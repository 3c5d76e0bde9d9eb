"""Hardware boundaries of the presenter: digital output (event words), reward TTL, eye trackers.

Each kind is chosen by a short spec string on the command line (``--dout serial:/dev/ttyUSB0``,
``--eye sim``, ``--reward serial:/dev/ttyACM0``). Drivers (pyserial, PsychoPy's parallel port,
LabJackPython, pylink) are imported only when their kind is chosen, so a machine without them
can still run the simulated kinds.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger("popcontrol.present.devices")

Gaze = tuple[float, float]  # (x_deg, y_deg) from screen centre, +y up


class DeviceError(RuntimeError):
    """A device spec is malformed or its driver/hardware is missing; the message says how to fix it."""


# --------------------------------------------------------------------------- digital output


class DigitalOut(Protocol):
    """Writes a 16-bit event word to lines the acquisition system timestamps."""

    def write_word(self, word: int) -> None: ...

    def close(self) -> None: ...


def _check_word(word: int) -> int:
    if not 0 <= word <= 0xFFFF:
        raise ValueError(f"event words are 16-bit (0..65535), got {word}")
    return word


@dataclass
class SimDigitalOut:
    """Records words in memory (bench runs, tests, the demo)."""

    words: list[int] = field(default_factory=list)

    def write_word(self, word: int) -> None:
        self.words.append(_check_word(word))

    def close(self) -> None:
        return None


class SerialDigitalOut:
    """Each word as two bytes, little-endian, over a serial port (pyserial)."""

    def __init__(self, path: str, baudrate: int = 115200) -> None:
        try:
            import serial  # pyserial
        except ImportError as exc:
            raise DeviceError(
                "--dout serial needs pyserial: pip install 'popcontrol[present]'"
            ) from exc
        try:
            self._port: Any = serial.Serial(path, baudrate=baudrate, timeout=0, write_timeout=0.01)
        except Exception as exc:
            raise DeviceError(f"cannot open serial port {path!r} for event words: {exc}") from exc

    def write_word(self, word: int) -> None:
        self._port.write(_check_word(word).to_bytes(2, "little"))

    def close(self) -> None:
        self._port.close()


class ParallelDigitalOut:
    """The low 8 bits of each word on a parallel port's data lines (PsychoPy's driver).

    A parallel port has 8 data lines; words above 255 lose their high byte (logged once).
    Use serial or LabJack output for 16-bit words.
    """

    def __init__(self, address: int) -> None:
        try:
            from psychopy import parallel
        except ImportError as exc:
            raise DeviceError("--dout parallel needs PsychoPy's parallel module") from exc
        try:
            self._port: Any = parallel.ParallelPort(address=address)
        except Exception as exc:
            raise DeviceError(f"cannot open parallel port at {address:#x}: {exc}") from exc
        self._warned = False

    def write_word(self, word: int) -> None:
        if _check_word(word) > 0xFF and not self._warned:
            log.warning(
                "parallel port carries 8 bits; event word %d is sent as %d", word, word & 0xFF
            )
            self._warned = True
        self._port.setData(word & 0xFF)

    def close(self) -> None:
        self._port.setData(0)


class LabJackDigitalOut:
    """A LabJack U3: low byte on EIO0-7, high byte on FIO0-7 (LabJackPython's ``u3``)."""

    def __init__(self) -> None:
        try:
            import u3
        except ImportError as exc:
            raise DeviceError(
                "--dout labjack needs LabJackPython: pip install LabJackPython"
            ) from exc
        try:
            self._u3: Any = u3
            self._dev: Any = u3.U3()
            self._dev.configIO(FIOAnalog=0, EIOAnalog=0)
            self._dev.getFeedback(
                u3.PortDirWrite(Direction=[0xFF, 0xFF, 0], WriteMask=[0xFF, 0xFF, 0])
            )
        except Exception as exc:
            raise DeviceError(f"cannot open the LabJack U3: {exc}") from exc

    def write_word(self, word: int) -> None:
        _check_word(word)
        state = [(word >> 8) & 0xFF, word & 0xFF, 0]
        self._dev.getFeedback(self._u3.PortStateWrite(State=state, WriteMask=[0xFF, 0xFF, 0]))

    def close(self) -> None:
        self.write_word(0)
        self._dev.close()


def open_digital_out(spec: str) -> DigitalOut:
    """``sim`` | ``serial:/dev/PATH[@BAUD]`` | ``parallel[:0xADDR]`` | ``labjack``."""
    kind, _, arg = spec.partition(":")
    if kind == "sim":
        return SimDigitalOut()
    if kind == "serial":
        if not arg:
            raise DeviceError(
                "--dout serial needs a port, e.g. serial:/dev/ttyUSB0 or serial:COM3@115200"
            )
        path, _, baud = arg.partition("@")
        return SerialDigitalOut(path, int(baud) if baud else 115200)
    if kind == "parallel":
        return ParallelDigitalOut(int(arg, 0) if arg else 0x378)
    if kind == "labjack":
        return LabJackDigitalOut()
    raise DeviceError(
        f"unknown digital output {spec!r}; choose sim, serial:/dev/PATH, parallel[:0x378] or labjack"
    )


# --------------------------------------------------------------------------- reward


class Reward(Protocol):
    """A TTL pulse that opens the reward valve; must not block the frame loop."""

    def pulse(self, duration_ms: float) -> None: ...

    def close(self) -> None: ...


@dataclass
class SimReward:
    pulses_ms: list[float] = field(default_factory=list)

    def pulse(self, duration_ms: float) -> None:
        self.pulses_ms.append(duration_ms)

    def close(self) -> None:
        return None


class _TimedLine:
    """Raise a line now and lower it after ``duration_ms`` on a timer thread."""

    def __init__(self, set_line: Callable[[bool], None]) -> None:
        self._set = set_line
        self._timer: threading.Timer | None = None

    def pulse(self, duration_ms: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._set(True)
        self._timer = threading.Timer(duration_ms / 1000.0, self._set, args=(False,))
        self._timer.daemon = True
        self._timer.start()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._set(False)


class SerialReward(_TimedLine):
    """Pulses a serial port's RTS line (a common way to drive a solenoid through a relay)."""

    def __init__(self, path: str) -> None:
        try:
            import serial
        except ImportError as exc:
            raise DeviceError(
                "--reward serial needs pyserial: pip install 'popcontrol[present]'"
            ) from exc
        try:
            port: Any = serial.Serial(path)
        except Exception as exc:
            raise DeviceError(
                f"cannot open serial port {path!r} for the reward line: {exc}"
            ) from exc
        port.rts = False

        def set_line(on: bool) -> None:
            port.rts = on

        super().__init__(set_line)


class ParallelReward(_TimedLine):
    """Pulses one data pin (2-9) of a parallel port."""

    def __init__(self, address: int, pin: int) -> None:
        try:
            from psychopy import parallel
        except ImportError as exc:
            raise DeviceError("--reward parallel needs PsychoPy's parallel module") from exc
        port: Any = parallel.ParallelPort(address=address)

        def set_line(on: bool) -> None:
            port.setPin(pin, 1 if on else 0)

        super().__init__(set_line)


def open_reward(spec: str) -> Reward:
    """``sim`` | ``serial:/dev/PATH`` (RTS line) | ``parallel:0xADDR:PIN``."""
    kind, _, arg = spec.partition(":")
    if kind == "sim":
        return SimReward()
    if kind == "serial" and arg:
        return SerialReward(arg)
    if kind == "parallel":
        address, _, pin = arg.partition(":")
        return ParallelReward(int(address or "0x378", 0), int(pin or "2"))
    raise DeviceError(
        f"unknown reward output {spec!r}; choose sim, serial:/dev/PATH or parallel:0x378:PIN"
    )


# --------------------------------------------------------------------------- eye trackers


class EyeTracker(Protocol):
    """Gaze in degrees of visual angle from the screen centre; None when no sample (blink, loss)."""

    def begin_trial(self, trial_index: int, n_images: int) -> None: ...

    def image_onset(self, position: int, onset_s: float) -> None: ...

    def gaze_deg(self, t_s: float) -> Gaze | None: ...

    def calibrate(self) -> None: ...

    def close(self) -> None: ...


def in_window(gaze: Gaze | None, window_deg: float) -> bool:
    """Inside a circular fixation window of radius ``window_deg`` around the centre."""
    return gaze is not None and math.hypot(gaze[0], gaze[1]) <= window_deg


@dataclass
class SimEyeTracker:
    """Scripted gaze: steady fixation, with breaks at a configurable rate.

    At the start of each trial a seeded draw decides, with probability ``break_rate``, whether
    gaze leaves the window and during which image; ``scripted_breaks`` (trial index -> image
    position) forces breaks. Gaze leaves ``break_delay_s`` after that image's onset. Decisions
    depend only on trial and image indices, never on wall time, so the PsychoPy and headless
    presenters break at the same images.
    """

    break_rate: float = 0.0
    seed: int = 0
    scripted_breaks: Mapping[int, int] = field(default_factory=dict)
    break_delay_s: float = 0.03
    _rng: random.Random = field(init=False, repr=False)
    _break_position: int | None = field(init=False, default=None)
    _break_at_s: float = field(init=False, default=math.inf)
    _trials: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if not 0.0 <= self.break_rate <= 1.0:
            raise ValueError(f"break_rate is a probability per trial, got {self.break_rate}")
        self._rng = random.Random(self.seed)

    def begin_trial(self, trial_index: int, n_images: int) -> None:
        draw_break = self._rng.random() < self.break_rate
        position = self._rng.randrange(max(1, n_images))
        ordinal = self._trials
        self._trials += 1
        if ordinal in self.scripted_breaks:
            self._break_position = self.scripted_breaks[ordinal]
        else:
            self._break_position = position if draw_break else None
        self._break_at_s = math.inf

    def image_onset(self, position: int, onset_s: float) -> None:
        if position == self._break_position:
            self._break_at_s = onset_s + self.break_delay_s

    def gaze_deg(self, t_s: float) -> Gaze | None:
        return (15.0, 0.0) if t_s >= self._break_at_s else (0.0, 0.0)

    def calibrate(self) -> None:
        return None

    def close(self) -> None:
        return None


class MouseEyeTracker:
    """The mouse pointer stands in for gaze (bench testing without an animal)."""

    def __init__(self, window: Any) -> None:
        from psychopy import event

        self._mouse: Any = event.Mouse(visible=True, win=window)

    def begin_trial(self, trial_index: int, n_images: int) -> None:
        return None

    def image_onset(self, position: int, onset_s: float) -> None:
        return None

    def gaze_deg(self, t_s: float) -> Gaze | None:
        x, y = self._mouse.getPos()  # window units, which the presenter sets to degrees
        return float(x), float(y)

    def calibrate(self) -> None:
        return None

    def close(self) -> None:
        return None


class EyeLinkTracker:
    """An SR Research EyeLink over pylink; samples in screen pixels are converted to degrees."""

    def __init__(
        self,
        address: str,
        screen_size_px: tuple[int, int],
        pix_to_deg: Callable[[float], float],
        window: Any = None,
    ) -> None:
        try:
            import pylink
        except ImportError as exc:
            raise DeviceError(
                "--eye eyelink needs SR Research's pylink (from the EyeLink Developers Kit)"
            ) from exc
        try:
            self._tracker: Any = pylink.EyeLink(address)
        except Exception as exc:
            raise DeviceError(f"cannot reach the EyeLink host at {address}: {exc}") from exc
        self._pylink: Any = pylink
        self._window = window
        self._w, self._h = screen_size_px
        self._pix_to_deg = pix_to_deg
        self._tracker.sendCommand(f"screen_pixel_coords = 0 0 {self._w - 1} {self._h - 1}")
        self._tracker.startRecording(1, 1, 1, 1)

    def begin_trial(self, trial_index: int, n_images: int) -> None:
        self._tracker.sendMessage(f"TRIALID {trial_index}")

    def image_onset(self, position: int, onset_s: float) -> None:
        self._tracker.sendMessage(f"IMAGE_ONSET {position}")

    def gaze_deg(self, t_s: float) -> Gaze | None:
        sample = self._tracker.getNewestSample()
        if sample is None:
            return None
        eye = sample.getRightEye() if sample.isRightSample() else sample.getLeftEye()
        if eye is None:
            return None
        x_px, y_px = eye.getGaze()
        if x_px < -1e6 or y_px < -1e6:  # pylink's MISSING_DATA
            return None
        return self._pix_to_deg(x_px - self._w / 2), self._pix_to_deg(self._h / 2 - y_px)

    def calibrate(self) -> None:
        self._tracker.stopRecording()
        if self._window is not None:
            self._tracker.doTrackerSetup()
        self._tracker.startRecording(1, 1, 1, 1)

    def close(self) -> None:
        self._tracker.stopRecording()
        self._tracker.close()


def parse_eye_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``sim[:break_rate=0.1,seed=3]`` | ``mouse`` | ``eyelink[:100.1.1.1]`` -> (kind, options)."""
    kind, _, arg = spec.partition(":")
    if kind not in ("sim", "mouse", "eyelink"):
        raise DeviceError(f"unknown eye tracker {spec!r}; choose sim, mouse or eyelink")
    options: dict[str, str] = {}
    if kind == "eyelink":
        options["address"] = arg or "100.1.1.1"
    elif arg:
        for part in arg.split(","):
            key, eq, value = part.partition("=")
            if not eq:
                raise DeviceError(f"eye tracker option {part!r} must read key=value")
            options[key.strip()] = value.strip()
    return kind, options


def sim_eye_from_options(options: Mapping[str, str]) -> SimEyeTracker:
    unknown = set(options) - {"break_rate", "seed"}
    if unknown:
        raise DeviceError(f"sim eye tracker options are break_rate and seed, not {sorted(unknown)}")
    return SimEyeTracker(
        break_rate=float(options.get("break_rate", "0")), seed=int(options.get("seed", "0"))
    )

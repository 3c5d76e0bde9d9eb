"""The PsychoPy presenter: RSVP blocks in a window, flips reported to the rig daemon.

PsychoPy is imported only inside ``run_present`` and the window classes' constructors, so
``rig.present`` loads on machines without it (the ``[present]`` extra).

On a display without vertical sync (Xvfb, some laptops) ``win.flip`` returns at once; the screen
then paces flips to the nominal refresh rate itself, so N frames still last N periods.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rig.present.blocks import PreparedBlock, finish_block, prepare_block
from rig.present.cli import CORNERS
from rig.present.devices import (
    DeviceError,
    EyeLinkTracker,
    EyeTracker,
    MouseEyeTracker,
    SimEyeTracker,
    open_digital_out,
    open_reward,
    parse_eye_spec,
    sim_eye_from_options,
)
from rig.present.engine import BlockResult, BlockRunner, EngineConfig, OnFlip
from rig.present.messages import FlipStream, SentMessage, decode_ack_keys
from rig.present.net import FlipChannel, ImageCache, ProgressReporter, ServerClient, ServerError
from rig.present.schedule import first_trial_index

log = logging.getLogger("popcontrol.present")

MAX_VSYNC_HZ = 250.0  # a "measured" rate above this means flips do not wait for the display


@dataclass(frozen=True)
class PresentConfig:
    server_url: str
    token: str
    rig: str
    daemon_endpoint: str = "tcp://127.0.0.1:5610"
    fullscreen: bool = False
    screen: int = 0
    monitor: str | None = None  # a PsychoPy Monitor Center name; None: the two numbers below
    monitor_width_cm: float = 53.0
    monitor_distance_cm: float = 57.0
    window_size_px: tuple[int, int] = (1280, 720)
    refresh_hz: float | None = None  # None: measured (60 Hz when the display has no vsync)
    dout: str = "sim"
    eye: str = "sim"
    reward: str = "sim"
    photodiode_corner: str = "bottom-left"
    photodiode_size_px: int = 60
    background: float | None = None  # luminance 0..1; None: the block's mean image luminance
    help_line: bool = True
    cache_dir: Path = Path("var/stimulus-cache")
    until_idle: bool = False  # stop when the server has no block due, instead of waiting
    poll_s: float = 5.0
    engine: EngineConfig = field(default_factory=EngineConfig)
    scripted_breaks: Mapping[int, int] = field(default_factory=dict)  # sim eye tracker only
    resend_after_s: float = 1.0

    def __post_init__(self) -> None:
        if self.photodiode_corner not in CORNERS:
            raise ValueError(
                f"photodiode corner {self.photodiode_corner!r} is not one of {', '.join(CORNERS)}"
            )


class PsychoPyScreen:
    """The ``Screen`` of the trial loop, drawn with PsychoPy into ``win`` (units: degrees)."""

    def __init__(
        self,
        win: Any,
        refresh_hz: float,
        pace: bool,
        config: PresentConfig,
        image_size_deg: float = 8.0,
    ) -> None:
        from psychopy import core, event, visual

        self.refresh_hz = refresh_hz
        self._win = win
        self._core: Any = core
        self._event: Any = event
        self._visual: Any = visual
        self._pace = pace
        self._period_s = 1.0 / refresh_hz
        self._next_due_s: float | None = None
        self._flip_s = 0.0
        self._image_size_deg = image_size_deg
        self._images: dict[str, Any] = {}
        self.fixation = visual.Circle(
            win, radius=0.15, units="deg", fillColor=[1, 0, 0], lineColor=None, edges=32
        )
        w_px, h_px = (int(v) for v in win.size)
        size = config.photodiode_size_px
        x = (-w_px / 2 + size / 2) if "left" in config.photodiode_corner else (w_px / 2 - size / 2)
        y = (
            (-h_px / 2 + size / 2)
            if "bottom" in config.photodiode_corner
            else (h_px / 2 - size / 2)
        )
        self.photodiode = visual.Rect(
            win, width=size, height=size, pos=(x, y), units="pix", fillColor=[-1, -1, -1],
            lineColor=None,
        )  # fmt: skip
        self.message = visual.TextStim(win, text="", height=0.6, units="deg", wrapWidth=30)
        self.help = visual.TextStim(
            win,
            text=config.engine.help_line,
            height=14,
            units="pix",
            pos=(0, -h_px / 2 + 14),
            color=[0.2, 0.2, 0.2],
        )
        self._show_help = config.help_line

    def set_background(self, luminance: float) -> None:
        grey = 2.0 * float(np.clip(luminance, 0.0, 1.0)) - 1.0
        self._win.color = [grey, grey, grey]

    def preload(self, images: Mapping[str, np.ndarray], image_size_deg: float) -> None:
        """Make every texture before the block starts (no texture uploads during RSVP)."""
        self._image_size_deg = image_size_deg
        self._images.clear()
        for sid, luminance in images.items():
            h, w = luminance.shape  # (H, W) in [0, 1]
            scale = image_size_deg / max(h, w)
            self._images[sid] = self._visual.ImageStim(
                self._win,
                image=np.flipud(luminance * 2.0 - 1.0),  # PsychoPy puts row 0 at the bottom
                size=(w * scale, h * scale),
                units="deg",
                colorSpace="rgb",
                interpolate=True,
            )

    def _chrome(self, diode_on: bool) -> None:
        self.fixation.draw()
        self.photodiode.fillColor = [1, 1, 1] if diode_on else [-1, -1, -1]
        self.photodiode.draw()
        if self._show_help:
            self.help.draw()

    def draw_fixation(self) -> None:
        self._chrome(False)

    def draw_image(self, stimulus_id: str) -> None:
        self._images[stimulus_id].draw()
        self._chrome(True)

    def draw_blank(self) -> None:
        self._chrome(False)

    def draw_message(self, text: str) -> None:
        self.message.text = text
        self.message.draw()

    def _stamp(self) -> None:
        self._flip_s = self._core.getTime()

    def flip(self, on_flip: OnFlip | None = None) -> float:
        if self._pace and self._next_due_s is not None:
            wait_s = self._next_due_s - self._core.getTime()
            if wait_s > 0:
                self._core.wait(wait_s, hogCPUperiod=min(wait_s, 0.002))
        self._win.callOnFlip(self._stamp)
        if on_flip is not None:
            self._win.callOnFlip(lambda: on_flip(self._flip_s))
        self._win.flip()
        t = self._flip_s
        if self._next_due_s is None or t - self._next_due_s > self._period_s:
            self._next_due_s = t + self._period_s  # first flip, or fell behind: resynchronise
        else:
            self._next_due_s += self._period_s
        return t

    def pressed_keys(self) -> list[str]:
        keys = self._event.getKeys(keyList=["q", "p", "c", "escape"])
        return ["q" if k == "escape" else k for k in keys]


def _open_monitor(config: PresentConfig) -> Any:
    from psychopy import monitors

    if config.monitor is not None:
        if config.monitor not in monitors.getAllMonitors():
            raise DeviceError(
                f"no PsychoPy monitor named {config.monitor!r} (known: "
                f"{', '.join(monitors.getAllMonitors()) or 'none'}); define it in PsychoPy's "
                "Monitor Center (screen width in cm, viewing distance, resolution)"
            )
        return monitors.Monitor(config.monitor)
    log.warning(
        "no --monitor given: degrees assume a %.0f cm wide screen at %.0f cm",
        config.monitor_width_cm,
        config.monitor_distance_cm,
    )
    mon = monitors.Monitor(
        "popcontrol-default", width=config.monitor_width_cm, distance=config.monitor_distance_cm
    )
    mon.setSizePix(list(config.window_size_px))
    return mon


SOFTWARE_RENDERERS = ("llvmpipe", "softpipe", "swrast", "software rasterizer")


def _software_renderer(win: Any) -> str | None:
    """The OpenGL renderer's name when it renders in software (Xvfb, a VM: no vertical sync)."""
    if getattr(win, "winType", "pyglet") != "pyglet":
        return None
    try:
        from pyglet.gl import gl_info

        renderer = str(gl_info.get_renderer())
    except Exception:  # no GL information: decide on the measured rate alone
        return None
    return renderer if any(s in renderer.lower() for s in SOFTWARE_RENDERERS) else None


def _refresh(win: Any, config: PresentConfig) -> tuple[float, bool]:
    """(nominal refresh rate, whether the screen must pace its own flips).

    Flips must be paced when they do not wait for the display: a software OpenGL renderer
    (whose flip rate only says how fast the CPU is, 180-300 Hz here) or a measured rate above
    any real display's."""
    measured = win.getActualFrameRate(nIdentical=10, nMaxFrames=60, nWarmUpFrames=5)
    software = _software_renderer(win)
    no_vsync = measured is None or measured > MAX_VSYNC_HZ or software is not None
    if config.refresh_hz is not None:
        nominal = config.refresh_hz
        if measured is not None and not no_vsync and abs(measured - nominal) > 0.1 * nominal:
            log.warning(
                "measured refresh %.1f Hz differs from --refresh-hz %.1f", measured, nominal
            )
    elif no_vsync:
        nominal = 60.0
        log.warning("the display does not wait for vertical sync; pacing flips at 60 Hz")
    else:
        nominal = float(measured)
    if no_vsync:
        log.warning(
            "no vertical sync (measured %s Hz%s): pacing flips to %.1f Hz",
            measured,
            f", software renderer {software}" if software else "",
            nominal,
        )
    return nominal, no_vsync


def _open_eye(config: PresentConfig, win: Any, monitor: Any) -> EyeTracker:
    kind, options = parse_eye_spec(config.eye)
    if kind == "sim":
        sim = sim_eye_from_options(options)
        return SimEyeTracker(
            break_rate=sim.break_rate, seed=sim.seed, scripted_breaks=config.scripted_breaks
        )
    if kind == "mouse":
        return MouseEyeTracker(win)
    from psychopy.tools.monitorunittools import pix2deg

    return EyeLinkTracker(
        options["address"],
        (int(win.size[0]), int(win.size[1])),
        lambda px: float(pix2deg(px, monitor)),
        window=win,
    )


@dataclass
class PresentRun:
    """What a presenter run did (returned for logs and tests)."""

    results: list[BlockResult] = field(default_factory=list)
    messages: list[SentMessage] = field(default_factory=list)
    words: list[int] = field(default_factory=list)
    refresh_hz: float = 0.0
    paced: bool = False


def _wait_screen(screen: PsychoPyScreen, text: str, seconds: float) -> bool:
    """Show ``text`` for ``seconds``; True when the operator pressed q."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        screen.draw_message(text)
        screen.flip()
        if "q" in screen.pressed_keys():
            return True
    return False


def run_present(config: PresentConfig) -> PresentRun:
    """Open the window and run blocks until q, or until none is due (``until_idle``)."""
    from psychopy import logging as psychopy_logging
    from psychopy import visual

    psychopy_logging.console.setLevel(psychopy_logging.ERROR)
    monitor = _open_monitor(config)
    dout = open_digital_out(config.dout)
    reward = open_reward(config.reward)
    win = visual.Window(
        size=list(config.window_size_px),
        fullscr=config.fullscreen,
        screen=config.screen,
        monitor=monitor,
        units="deg",
        color=[0, 0, 0],
        colorSpace="rgb",
        allowGUI=not config.fullscreen,
        waitBlanking=True,
        checkTiming=False,
    )
    run = PresentRun()
    client = ServerClient(config.server_url, config.token, config.rig)
    channel = FlipChannel(
        config.daemon_endpoint, decode_ack_keys, resend_after_s=config.resend_after_s
    ).start()
    progress = ProgressReporter(client)
    flips = FlipStream(config.rig, channel.send)
    tracker: EyeTracker | None = None
    try:
        win.recordFrameIntervals = True
        refresh_hz, paced = _refresh(win, config)
        run.refresh_hz, run.paced = refresh_hz, paced
        tracker = _open_eye(config, win, monitor)
        screen = PsychoPyScreen(win, refresh_hz, paced, config)
        cache = ImageCache(config.cache_dir)
        while True:
            screen.draw_message(f"rig {config.rig}: asking {config.server_url} for a block")
            screen.flip()
            try:
                block: PreparedBlock | None = prepare_block(client, cache)
            except ServerError as exc:
                log.warning("%s", exc)
                if _wait_screen(screen, f"server problem, retrying:\n{exc}", config.poll_s):
                    break
                continue
            if block is None:
                if config.until_idle:
                    break
                if _wait_screen(
                    screen, f"no block due on rig {config.rig}; asking again", config.poll_s
                ):
                    break
                continue
            plan = block.plan
            screen.preload(block.images, plan.image_size_deg)
            screen.set_background(
                config.background if config.background is not None else block.mean_luminance
            )
            flips.set_block(plan.session_id, plan.block_id)
            runner = BlockRunner(
                plan,
                screen,
                tracker,
                dout,
                reward,
                flips,
                progress,
                config.engine,
                base_counts=block.base_counts,
                channel_healthy=channel.healthy,
                channel_pending=lambda: channel.stats().pending,
                first_trial=first_trial_index(time.time()),
            )
            result = runner.run()
            finish_block(result, channel, progress, config.engine.drain_timeout_s)
            run.results.append(result)
            log.info(
                "block %d %s: %d trials, %d flips, %d breaks, %d dropped frames",
                result.block_id,
                result.state,
                result.trials,
                result.flips,
                result.fixation_breaks,
                result.dropped_frames,
            )
            if result.state == "stopped":
                break
    finally:
        run.messages = list(flips.sent)
        words = getattr(dout, "words", None)
        run.words = list(words) if words is not None else []
        channel.close(drain_timeout_s=config.engine.drain_timeout_s)
        progress.close()
        client.close()
        if tracker is not None:
            tracker.close()
        dout.close()
        reward.close()
        win.close()
    return run

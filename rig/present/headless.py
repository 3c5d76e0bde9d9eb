"""The headless presenter: the PsychoPy presenter's scheduling and message stream, without a window.

Frames advance a ``VirtualClock`` instead of waiting for a display, so a block runs as fast as
the network allows. Flip messages carry ``host_flip_time_s`` on that clock, which the simulated
acquisition source maps to its sample clock. Gaze comes from the scripted ``SimEyeTracker``.

Use it from code::

    clock = VirtualClock()
    results = run_headless(server_url, token, "rig-a", "tcp://127.0.0.1:5610",
                           HeadlessConfig(break_rate=0.05), seed=1, clock=clock)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rig.present.blocks import PreparedBlock, finish_block, prepare_block
from rig.present.devices import SimDigitalOut, SimEyeTracker, SimReward
from rig.present.engine import BlockResult, BlockRunner, EngineConfig, OnFlip
from rig.present.messages import FlipStream, SentMessage, decode_ack_keys
from rig.present.net import FlipChannel, ImageCache, ProgressReporter, ServerClient
from rig.present.schedule import first_trial_index

log = logging.getLogger("popcontrol.present")


class VirtualClock:
    """Seconds on a clock that only moves when told to (thread-safe reads)."""

    def __init__(self, start_s: float | None = None) -> None:
        # Default: the wall time now, so trial numbers of later runs never meet earlier ones.
        self._t = time.time() if start_s is None else start_s
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._t

    def advance(self, dt_s: float) -> float:
        if dt_s < 0:
            raise ValueError(f"a clock only moves forward; got dt_s={dt_s}")
        with self._lock:
            self._t += dt_s
            return self._t


class HeadlessScreen:
    """A ``Screen`` that draws nothing: each flip advances the virtual clock by one period."""

    def __init__(
        self,
        clock: VirtualClock,
        refresh_hz: float,
        keys_at_frame: Mapping[int, str] | None = None,
        message_sleep_s: float = 0.005,
    ) -> None:
        self.refresh_hz = refresh_hz
        self._clock = clock
        self._keys_at_frame = dict(keys_at_frame or {})
        self._message_sleep_s = message_sleep_s
        self._images: dict[str, tuple[int, int]] = {}
        self._showing_message = False
        self.frames = 0
        self.last_message = ""

    def preload(self, images: Mapping[str, np.ndarray]) -> None:
        self._images = {sid: (int(a.shape[0]), int(a.shape[1])) for sid, a in images.items()}

    def draw_fixation(self) -> None:
        self._showing_message = False

    def draw_image(self, stimulus_id: str) -> None:
        if stimulus_id not in self._images:
            raise KeyError(f"image {stimulus_id} was not preloaded before the block")
        self._showing_message = False

    def draw_blank(self) -> None:
        self._showing_message = False

    def draw_message(self, text: str) -> None:
        self._showing_message = True
        self.last_message = text

    def flip(self, on_flip: OnFlip | None = None) -> float:
        if self._showing_message:
            # Waiting for the network: let real time pass, or the pause would spin.
            time.sleep(self._message_sleep_s)
        t = self._clock.advance(1.0 / self.refresh_hz)
        self.frames += 1
        if on_flip is not None:
            on_flip(t)
        return t

    def pressed_keys(self) -> list[str]:
        key = self._keys_at_frame.pop(self.frames, None)
        return [key] if key else []


@dataclass(frozen=True)
class HeadlessConfig:
    refresh_hz: float = 60.0
    break_rate: float = 0.0  # probability per trial that the virtual monkey breaks fixation
    scripted_breaks: Mapping[int, int] = field(default_factory=dict)  # trial -> image position
    keys_at_frame: Mapping[int, str] = field(default_factory=dict)  # scripted key presses
    engine: EngineConfig = field(default_factory=EngineConfig)
    cache_dir: Path = Path("var/stimulus-cache")
    resend_after_s: float = 1.0
    http_timeout_s: float = 10.0


class HeadlessPresenter:
    """Connections and devices kept across blocks (one flip stream, one seq counter)."""

    def __init__(
        self,
        server_url: str,
        token: str,
        rig: str,
        daemon_endpoint: str,
        config: HeadlessConfig,
        seed: int,
        clock: VirtualClock,
    ) -> None:
        self.config = config
        self.clock = clock
        self.client = ServerClient(server_url, token, rig, timeout_s=config.http_timeout_s)
        self.cache = ImageCache(config.cache_dir)
        self.channel = FlipChannel(
            daemon_endpoint, decode_ack_keys, resend_after_s=config.resend_after_s
        ).start()
        self.progress = ProgressReporter(self.client)
        self.flips = FlipStream(rig, self.channel.send)
        self.tracker = SimEyeTracker(
            break_rate=config.break_rate, seed=seed, scripted_breaks=config.scripted_breaks
        )
        self.dout = SimDigitalOut()
        self.reward = SimReward()
        self.screen = HeadlessScreen(clock, config.refresh_hz, config.keys_at_frame)

    @property
    def messages(self) -> list[SentMessage]:
        return self.flips.sent

    def run_prepared(self, block: PreparedBlock) -> BlockResult:
        plan = block.plan
        self.screen.preload(block.images)
        self.flips.set_block(plan.session_id, plan.block_id)
        runner = BlockRunner(
            plan,
            self.screen,
            self.tracker,
            self.dout,
            self.reward,
            self.flips,
            self.progress,
            self.config.engine,
            base_counts=block.base_counts,
            channel_healthy=self.channel.healthy,
            channel_pending=lambda: self.channel.stats().pending,
            first_trial=first_trial_index(self.clock.now()),
        )
        result = runner.run()
        finish_block(result, self.channel, self.progress, self.config.engine.drain_timeout_s)
        log.info(
            "block %d %s: %d trials, %d flips, %d fixation breaks, %d re-queued",
            result.block_id,
            result.state,
            result.trials,
            result.flips,
            result.fixation_breaks,
            result.requeued,
        )
        return result

    def run_block(self) -> BlockResult | None:
        """Run the rig's next block; None when nothing is due (the server answered 204)."""
        block = prepare_block(self.client, self.cache)
        if block is None:
            return None
        return self.run_prepared(block)

    def run(
        self, until_idle: bool = True, max_blocks: int | None = None, poll_s: float = 1.0
    ) -> list[BlockResult]:
        """Run blocks until the server has none (``until_idle``) or ``max_blocks`` ran."""
        results: list[BlockResult] = []
        while max_blocks is None or len(results) < max_blocks:
            result = self.run_block()
            if result is None:
                if until_idle:
                    break
                time.sleep(poll_s)
                continue
            results.append(result)
            if result.state == "stopped":
                break
        return results

    def close(self) -> None:
        self.channel.close(drain_timeout_s=self.config.engine.drain_timeout_s)
        self.progress.close()
        self.client.close()

    def __enter__(self) -> HeadlessPresenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_headless_block(
    server_url: str,
    token: str,
    rig: str,
    daemon_endpoint: str,
    config: HeadlessConfig,
    seed: int,
    clock: VirtualClock,
) -> BlockResult | None:
    """Run the rig's next block headless; None when nothing is due."""
    with HeadlessPresenter(server_url, token, rig, daemon_endpoint, config, seed, clock) as p:
        return p.run_block()


def run_headless(
    server_url: str,
    token: str,
    rig: str,
    daemon_endpoint: str,
    config: HeadlessConfig,
    seed: int,
    clock: VirtualClock,
    until_idle: bool = True,
    max_blocks: int | None = None,
) -> list[BlockResult]:
    """Keep asking for blocks and run them until the server answers 204 (``until_idle``)."""
    with HeadlessPresenter(server_url, token, rig, daemon_endpoint, config, seed, clock) as p:
        return p.run(until_idle=until_idle, max_blocks=max_blocks)

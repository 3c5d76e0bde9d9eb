"""The RSVP trial loop, shared by the PsychoPy and headless presenters.

Both presenters drive the same ``run_block`` with their own ``Screen``: PsychoPy draws into a
window and flips it; the headless screen only advances a virtual clock. Scheduling, fixation
control, re-queueing, event words and the flip message stream are therefore identical.

Timing is counted in frames. A trial: the fixation point until gaze has stayed in the window for
``fixation_frames``; then up to K images, each ``on_frames`` with the photodiode patch white and
``off_frames`` of background. Gaze leaving the window aborts the trial: the images already fully
shown (on and off period) stay valid, the rest go back into the queue, and a FixationBreak message
tells the daemon to invalidate the image that was on screen.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from rig.present.devices import DigitalOut, EyeTracker, Reward, in_window
from rig.present.messages import FlipStream
from rig.present.schedule import (
    BlockPlan,
    BlockScheduler,
    RSVPTiming,
    Trial,
    cumulative_counts,
    event_words,
)

log = logging.getLogger("popcontrol.present")

OnFlip = Callable[[float], None]  # called right after the buffer swap with the flip time (s)


class Screen(Protocol):
    """What the trial loop needs from a display. ``draw_*`` prepare the next frame."""

    refresh_hz: float

    def draw_fixation(self) -> None: ...

    def draw_image(self, stimulus_id: str) -> None: ...

    def draw_blank(self) -> None: ...

    def draw_message(self, text: str) -> None: ...

    def flip(self, on_flip: OnFlip | None = None) -> float: ...

    def pressed_keys(self) -> list[str]: ...


class Progress(Protocol):
    def report(self, block_id: int, state: str, shown_counts: Mapping[str, int]) -> None: ...

    def healthy(self, stall_after_s: float) -> bool: ...

    def flush(self, timeout_s: float) -> bool: ...


@dataclass(frozen=True)
class EngineConfig:
    iti_ms: float = 300.0  # blank between trials
    reward_ms: float = 80.0  # TTL pulse after each completed trial
    onset_lag_ms: float = 50.0  # the daemon's photodiode_max_lag_ms (see BlockPlan.valid_after_s)
    stall_after_s: float = 2.0  # unacked flips or failing progress older than this pause the block
    max_stall_s: float | None = None  # give up (raise) after this long paused; None waits forever
    drain_timeout_s: float = 30.0  # at block end, wait this long for the last acks
    dropped_frame_factor: float = 1.5  # an interval above this many periods drops frames
    interval_tolerance: float = 0.10  # warn when intervals stray more than this from nominal
    help_line: str = "q: end block   p: pause   c: calibrate / skip trial"


class BlockStopped(Exception):
    """Raised inside the loop when the operator ends the block (q)."""


class StallTimeout(RuntimeError):
    """The daemon or server stayed unreachable for longer than ``max_stall_s``."""


@dataclass(frozen=True)
class BlockResult:
    session_id: int
    block_id: int
    state: str  # "completed" or "stopped"
    trials: int
    flips: int
    fixation_breaks: int
    requeued: int
    shown_counts: dict[str, int]  # valid presentations per image over all runs of the block
    frame_intervals_s: tuple[float, ...]
    dropped_frames: int
    paused_s: float


@dataclass
class _Counters:
    flips: int = 0
    breaks: int = 0
    dropped: int = 0
    paused_s: float = 0.0
    intervals: list[float] = field(default_factory=list)


class _TrialAbort(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BlockRunner:
    """Runs one block on a screen; one instance per block."""

    def __init__(
        self,
        plan: BlockPlan,
        screen: Screen,
        tracker: EyeTracker,
        dout: DigitalOut,
        reward: Reward,
        flips: FlipStream,
        progress: Progress | None,
        config: EngineConfig,
        base_counts: Mapping[str, int] | None = None,
        channel_healthy: Callable[[float], bool] | None = None,
        channel_pending: Callable[[], int] | None = None,
        first_trial: int = 0,
    ) -> None:
        self.plan = plan
        self.screen = screen
        self.tracker = tracker
        self.dout = dout
        self.reward = reward
        self.flips = flips
        self.progress = progress
        self.config = config
        self.base_counts = dict(base_counts or {})
        self.timing: RSVPTiming = plan.timing(screen.refresh_hz)
        self.words = event_words(list(plan.image_urls))
        self.scheduler = BlockScheduler.for_plan(plan, first_trial)
        self._channel_healthy = channel_healthy or (lambda _s: True)
        self._channel_pending = channel_pending or (lambda: 0)
        self._n = _Counters()
        self._last_flip_s: float | None = None
        self._stop_requested = False
        self._valid_after_s = plan.valid_after_s(screen.refresh_hz, config.onset_lag_ms) - 1e-9

    # -- frames ------------------------------------------------------------------------

    def _flip(self, on_flip: OnFlip | None = None) -> tuple[float, int]:
        """Flip; return (flip time, refreshes missed since the previous flip)."""
        t = self.screen.flip(on_flip)
        dropped = self._missed(t)
        if self._last_flip_s is not None:
            self._n.intervals.append(t - self._last_flip_s)
        self._last_flip_s = t
        return t, dropped

    def _missed(self, t: float) -> int:
        """Refreshes missed between the previous flip and one at ``t``."""
        if self._last_flip_s is None:
            return 0
        periods = (t - self._last_flip_s) * self.timing.refresh_hz
        return round(periods) - 1 if periods > self.config.dropped_frame_factor else 0

    def _check_keys(self) -> None:
        for key in self.screen.pressed_keys():
            if key == "q":
                self._stop_requested = True
                raise _TrialAbort("stopped")
            if key == "p":
                raise _TrialAbort("paused")
            if key == "c":
                raise _TrialAbort("calibrate")

    # -- trial ---------------------------------------------------------------------------

    def _acquire_fixation(self) -> None:
        needed = max(1, self.timing.fixation_frames)
        held = 0
        while held < needed:
            self.screen.draw_fixation()
            t, _ = self._flip()
            held = (
                held + 1
                if in_window(self.tracker.gaze_deg(t), self.plan.fixation_window_deg)
                else 0
            )
            self._check_keys()

    def _run_trial(self, trial: Trial) -> tuple[int, str]:
        """Show one trial; return (images fully shown, outcome)."""
        self.tracker.begin_trial(trial.index, len(trial.stimulus_ids))
        window = self.plan.fixation_window_deg
        onsets_s: list[float] = []
        try:
            self._acquire_fixation()
            for position, sid in enumerate(trial.stimulus_ids):
                word = self.words[sid]

                def onset(
                    t: float, sid: str = sid, position: int = position, word: int = word
                ) -> None:
                    # Runs right after the buffer swap (win.callOnFlip): word first, then message.
                    self.dout.write_word(word)
                    onsets_s.append(t)
                    self.tracker.image_onset(position, t)
                    self.flips.flip(
                        trial=trial.index,
                        position=position,
                        stimulus_id=sid,
                        event_word=word,
                        host_flip_time_s=t,
                        dropped_frames=self._missed(t),
                        fixation_ok=in_window(self.tracker.gaze_deg(t), window),
                    )

                for frame in range(self.timing.on_frames):
                    self.screen.draw_image(sid)
                    t, dropped = self._flip(onset if frame == 0 else None)
                    if frame == 0:
                        self._n.flips += 1
                    self._n.dropped += dropped
                    if not in_window(self.tracker.gaze_deg(t), window):
                        raise _TrialAbort("fixation_break")
                    self._check_keys()
                for frame in range(self.timing.off_frames):
                    self.screen.draw_blank()
                    t, dropped = self._flip(self._word_off if frame == 0 else None)
                    self._n.dropped += dropped
                    if not in_window(self.tracker.gaze_deg(t), window):
                        raise _TrialAbort("fixation_break")
                    self._check_keys()
                if self.timing.off_frames == 0:
                    self.dout.write_word(0)
        except _TrialAbort as abort:
            self.dout.write_word(0)
            if not onsets_s:
                return 0, abort.reason
            assert self._last_flip_s is not None
            break_s = self._last_flip_s
            self.flips.fixation_break(trial=trial.index, host_time_s=break_s)
            self._n.breaks += 1
            # Valid: images whose display and count window ended before fixation broke.
            valid = sum(1 for onset_s in onsets_s if onset_s + self._valid_after_s <= break_s)
            return valid, abort.reason
        return len(trial.stimulus_ids), "completed"

    def _word_off(self, _t: float) -> None:
        self.dout.write_word(0)

    # -- pauses ------------------------------------------------------------------------

    def _blank_frames(self, duration_ms: float) -> None:
        for _ in range(max(0, round(duration_ms * self.timing.refresh_hz / 1000.0))):
            self.screen.draw_blank()
            self._flip()

    def _wait_healthy(self) -> None:
        stall = self.config.stall_after_s
        if self._channel_healthy(stall) and (self.progress is None or self.progress.healthy(stall)):
            return
        started = time.monotonic()
        log.warning(
            "block %d: %d flip messages unacknowledged by the rig daemon for over %.1f s, or "
            "the server failing; pausing between trials",
            self.plan.block_id,
            self._channel_pending(),
            stall,
        )
        while True:
            flips_ok = self._channel_pending() == 0
            server_ok = self.progress is None or self.progress.healthy(stall)
            if flips_ok and server_ok:
                break
            waited_s = time.monotonic() - started
            if self.config.max_stall_s is not None and waited_s > self.config.max_stall_s:
                raise StallTimeout(
                    f"block {self.plan.block_id}: still unreachable after {waited_s:.0f} s "
                    f"({self._channel_pending()} flip messages unacknowledged, server "
                    f"{'ok' if server_ok else 'failing'}); check that `popcontrol rig` and the "
                    "server are running"
                )
            what = "rig daemon" if not flips_ok else "server"
            self.screen.draw_message(
                f"waiting for the {what} ({self._channel_pending()} flips queued, "
                f"{waited_s:.0f} s)\n{self.config.help_line}"
            )
            self._flip()
            for key in self.screen.pressed_keys():
                if key == "q":
                    self._stop_requested = True
                    break
            if self._stop_requested:
                break
        self._n.paused_s += time.monotonic() - started
        self._last_flip_s = None  # the pause is not a frame interval
        log.info("block %d: connection back; resuming", self.plan.block_id)

    def _operator_pause(self) -> None:
        self.screen.draw_message(f"paused: press p to resume\n{self.config.help_line}")
        self._flip()
        while True:
            keys = self.screen.pressed_keys()
            if "q" in keys:
                self._stop_requested = True
                return
            if "p" in keys:
                break
            self.screen.draw_message(f"paused: press p to resume\n{self.config.help_line}")
            self._flip()
        self._last_flip_s = None

    # -- block -------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        return cumulative_counts(self.base_counts, self.scheduler.shown_counts())

    def run(self) -> BlockResult:
        plan = self.plan
        log.info(
            "block %d (session %d): %d presentations of %d images, %s",
            plan.block_id,
            plan.session_id,
            len(plan.sequence),
            len(plan.image_urls),
            self.timing,
        )
        self.dout.write_word(0)
        while not self._stop_requested:
            self._wait_healthy()
            if self._stop_requested:
                break
            trial = self.scheduler.next_trial()
            if trial is None:
                break
            n_before = len(self._n.intervals)
            shown, outcome = self._run_trial(trial)
            requeued = self.scheduler.finish_trial(trial, shown)
            log.info(
                "block %d trial %d: %s, %d/%d images valid%s",
                plan.block_id,
                trial.index,
                outcome,
                shown,
                len(trial.stimulus_ids),
                f", {len(requeued)} re-queued" if requeued else "",
            )
            self._warn_intervals(self._n.intervals[n_before:], trial.index)
            if outcome == "completed":
                self.reward.pulse(self.config.reward_ms)
            if self.progress is not None:
                self.progress.report(plan.block_id, "running", self.counts())
            if outcome == "paused":
                self._operator_pause()
            elif outcome == "calibrate":
                self.tracker.calibrate()
                self._last_flip_s = None
            if not self._stop_requested:
                self._blank_frames(self.config.iti_ms)
        state = "completed" if self.scheduler.done else "stopped"
        self.dout.write_word(0)
        return BlockResult(
            session_id=plan.session_id,
            block_id=plan.block_id,
            state=state,
            trials=self.scheduler.trials_started,
            flips=self._n.flips,
            fixation_breaks=self._n.breaks,
            requeued=self.scheduler.requeued_total,
            shown_counts=self.counts(),
            frame_intervals_s=tuple(self._n.intervals),
            dropped_frames=self._n.dropped,
            paused_s=self._n.paused_s,
        )

    def _warn_intervals(self, intervals: list[float], trial_index: int) -> None:
        nominal = self.timing.frame_s
        tol = self.config.interval_tolerance
        off = [dt for dt in intervals if abs(dt - nominal) > tol * nominal]
        if off:
            log.warning(
                "block %d trial %d: %d of %d frame intervals stray more than %.0f%% from the "
                "nominal %.2f ms (worst %.2f ms)",
                self.plan.block_id,
                trial_index,
                len(off),
                len(intervals),
                tol * 100,
                nominal * 1000,
                max(off, key=lambda dt: abs(dt - nominal)) * 1000,
            )

"""Block scheduling for RSVP presentation: pure logic shared by the PsychoPy and headless presenters.

A block arrives from ``GET /api/v1/rigs/{rig}/next-block`` as a seeded sequence of stimulus ids
(each id repeated as often as it still needs valid presentations). The scheduler cuts the queue
into trials of up to ``images_per_trial`` images. When fixation breaks, the images of that trial
that were not fully shown go back into the queue at random later positions (seeded), so the block
ends exactly when every image has its valid repetitions.

Nothing here touches a clock, a window or a socket.
"""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_EVENT_WORD = 0xFFFF


@dataclass(frozen=True)
class RSVPTiming:
    """Trial timing in whole frames of the display's refresh (the presenter counts frames)."""

    refresh_hz: float
    on_frames: int
    off_frames: int
    fixation_frames: int
    images_per_trial: int

    @property
    def frame_s(self) -> float:
        return 1.0 / self.refresh_hz

    @property
    def image_cycle_frames(self) -> int:
        return self.on_frames + self.off_frames


def frames_for_ms(duration_ms: float, refresh_hz: float, minimum: int = 0) -> int:
    """``duration_ms`` rounded to whole frames at ``refresh_hz`` (half-frames round up)."""
    if refresh_hz <= 0 or not math.isfinite(refresh_hz):
        raise ValueError(f"refresh rate must be a positive number of Hz, got {refresh_hz!r}")
    if duration_ms < 0 or not math.isfinite(duration_ms):
        raise ValueError(f"a duration must be ≥ 0 ms, got {duration_ms!r}")
    return max(minimum, math.floor(duration_ms * refresh_hz / 1000.0 + 0.5))


@dataclass(frozen=True)
class BlockPlan:
    """One block as the server hands it out (``NextBlockOut``), in presenter terms."""

    session_id: int
    block_id: int
    block_index: int
    seed: int
    on_ms: float
    off_ms: float
    images_per_trial: int
    fixation_ms: float
    image_size_deg: float
    fixation_window_deg: float
    response_window_end_ms: float  # spikes are counted until onset + this
    image_urls: Mapping[str, str]  # stimulus id -> URL path of its PNG
    remaining: Mapping[str, int]  # stimulus id -> valid presentations still needed
    sequence: tuple[str, ...]  # seeded order, with repeats

    @classmethod
    def from_next_block(cls, body: Mapping[str, Any]) -> BlockPlan:
        """Parse the JSON body of ``next-block``; raise ValueError naming what is wrong."""
        try:
            rsvp = body["rsvp"]
            protocol = body.get("protocol") or {}
            items = body["items"]
            plan = cls(
                session_id=int(body["session_id"]),
                block_id=int(body["block_id"]),
                block_index=int(body["block_index"]),
                seed=int(body["seed"]),
                on_ms=float(rsvp.get("on_ms") or protocol.get("on_ms") or 100.0),
                off_ms=float(rsvp.get("off_ms", protocol.get("off_ms", 100.0)) or 0.0),
                images_per_trial=int(
                    rsvp.get("images_per_trial") or protocol.get("images_per_trial") or 8
                ),
                fixation_ms=float(rsvp.get("fixation_ms", protocol.get("fixation_ms", 300.0))),
                image_size_deg=float(protocol.get("image_size_deg", 8.0)),
                fixation_window_deg=float(protocol.get("fixation_window_deg", 2.0)),
                response_window_end_ms=float(protocol.get("response_window_end_ms", 170.0)),
                image_urls={str(i["stimulus_id"]): str(i["image_url"]) for i in items},
                remaining={str(i["stimulus_id"]): int(i["remaining"]) for i in items},
                sequence=tuple(str(s) for s in body["sequence"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"the server's next-block answer is not a block the presenter understands ({exc!r}); "
                "check that server and rig run the same popcontrol version"
            ) from exc
        unknown = set(plan.sequence) - set(plan.image_urls)
        if unknown:
            raise ValueError(
                f"next-block sequence names {len(unknown)} stimuli without an item entry, "
                f"e.g. {sorted(unknown)[0]}"
            )
        if plan.images_per_trial < 1:
            raise ValueError(f"images_per_trial must be ≥ 1, got {plan.images_per_trial}")
        return plan

    def valid_after_s(self, refresh_hz: float, onset_lag_ms: float = 50.0) -> float:
        """Time after a flip that fixation must hold for the presentation to count as valid.

        Both the image's on and off period and its spike-count window must be over; the window
        is measured from the photodiode onset, which the rig daemon accepts up to
        ``onset_lag_ms`` after the flip (its ``photodiode_max_lag_ms``), so the presenter and
        the daemon agree on which images a fixation break spoils.
        """
        t = self.timing(refresh_hz)
        window_s = (self.response_window_end_ms + onset_lag_ms) / 1000.0
        return max(t.image_cycle_frames * t.frame_s, window_s)

    def timing(self, refresh_hz: float) -> RSVPTiming:
        return RSVPTiming(
            refresh_hz=refresh_hz,
            on_frames=frames_for_ms(self.on_ms, refresh_hz, minimum=1),
            off_frames=frames_for_ms(self.off_ms, refresh_hz),
            fixation_frames=frames_for_ms(self.fixation_ms, refresh_hz),
            images_per_trial=self.images_per_trial,
        )


def event_words(stimulus_ids: Sequence[str]) -> dict[str, int]:
    """The 16-bit event word of each image of a block: 1 + its rank among the sorted ids.

    Word 0 is the idle state of the digital lines, so an onset is always a change. Words are
    unique within a block; the flip message carries the stimulus id, so words need not be
    stable across blocks.
    """
    unique = sorted(set(stimulus_ids))
    if len(unique) > MAX_EVENT_WORD:
        raise ValueError(
            f"a block holds {len(unique)} distinct images but 16-bit event words name at most "
            f"{MAX_EVENT_WORD}; split the stimulus set into smaller blocks"
        )
    return {sid: i + 1 for i, sid in enumerate(unique)}


@dataclass(frozen=True)
class Trial:
    index: int  # first_trial_index + trials started before it in this run of the block
    stimulus_ids: tuple[str, ...]


@dataclass
class BlockScheduler:
    """Cuts a block's queue into trials and re-queues what a fixation break spoiled."""

    plan: BlockPlan
    images_per_trial: int
    first_trial_index: int = 0
    queue: deque[str] = field(init=False)
    valid_counts: Counter[str] = field(init=False)
    requeued_total: int = field(init=False, default=0)
    _rng: random.Random = field(init=False, repr=False)
    _trials_started: int = field(init=False, default=0)
    _open: Trial | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.queue = deque(self.plan.sequence)
        self.valid_counts = Counter()
        # Seeded by the block, so two presenters given the same block re-queue identically.
        self._rng = random.Random(self.plan.seed * 7919 + 17)

    @classmethod
    def for_plan(cls, plan: BlockPlan, first_trial_index: int = 0) -> BlockScheduler:
        return cls(
            plan=plan, images_per_trial=plan.images_per_trial, first_trial_index=first_trial_index
        )

    @property
    def done(self) -> bool:
        return not self.queue and self._open is None

    @property
    def trials_started(self) -> int:
        return self._trials_started

    def next_trial(self) -> Trial | None:
        """The next trial's images (taken off the queue), or None when the block is done."""
        if self._open is not None:
            raise RuntimeError(f"trial {self._open.index} is still open; call finish_trial first")
        if not self.queue:
            return None
        n = min(self.images_per_trial, len(self.queue))
        trial = Trial(
            self.first_trial_index + self._trials_started,
            tuple(self.queue.popleft() for _ in range(n)),
        )
        self._trials_started += 1
        self._open = trial
        return trial

    def finish_trial(self, trial: Trial, n_fully_shown: int) -> list[str]:
        """Close ``trial``; its first ``n_fully_shown`` images count as valid.

        The rest go back into the queue, each at a uniformly random position, and are returned
        in trial order.
        """
        if self._open is None or trial != self._open:
            raise RuntimeError(f"trial {trial.index} is not the open trial")
        if not 0 <= n_fully_shown <= len(trial.stimulus_ids):
            raise ValueError(
                f"n_fully_shown must be within 0..{len(trial.stimulus_ids)}, got {n_fully_shown}"
            )
        self._open = None
        self.valid_counts.update(trial.stimulus_ids[:n_fully_shown])
        unseen = list(trial.stimulus_ids[n_fully_shown:])
        for sid in unseen:
            self.queue.insert(self._rng.randint(0, len(self.queue)), sid)
        self.requeued_total += len(unseen)
        return unseen

    def shown_counts(self) -> dict[str, int]:
        """Valid presentations per image in this run of the block."""
        return {sid: int(n) for sid, n in sorted(self.valid_counts.items())}


def first_trial_index(run_start_s: float) -> int:
    """Trial numbers of a run start at its start time in ms on the presenter's clock.

    A block may run several times (stopped, resumed). The daemon and the stored presentations key
    trials by (block, trial), so the numbers of two runs must not meet: counting from the start
    time in milliseconds keeps them apart while a run starts fewer than 1000 trials per second.
    """
    return int(run_start_s * 1000.0)


def cumulative_counts(
    base_counts: Mapping[str, int], run_counts: Mapping[str, int]
) -> dict[str, int]:
    """Per-image valid presentations of a block over all its runs (what the server records)."""
    keys = set(base_counts) | set(run_counts)
    return {k: int(base_counts.get(k, 0)) + int(run_counts.get(k, 0)) for k in sorted(keys)}

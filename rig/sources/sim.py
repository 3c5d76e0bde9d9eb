"""``SimSource``: the virtual monkey behind the ``Source`` interface.

The presenter's flips reach the source through ``on_flip`` (the daemon forwards every flip);
the monkey looks at the image (``image_loader(stimulus_id)``) and its evoked spikes, the event
word and the photodiode edges are queued on the acquisition clock, where
``sample = round((host_flip_time_s + clock_offset_s) * sample_rate_hz)``.

Two clocks:

- virtual (default): the stream is generated up to the latest flip's time (it never runs
  ahead of what the presenter has shown), as fast as the CPU allows; ``advance_to(host_time_s)``
  moves it on (e.g. past the last image's window at the end of a block). ``read`` never blocks.
- real time: the stream follows ``clock()`` minus ``lag_ms`` (flips must arrive within that
  lag to land in the stream; later ones are counted in ``late_flips``), paced chunk by chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rig.protocol import FixationBreak, Flip
from rig.sim.monkey import ImageLoader, MonkeyConfig, VirtualMonkey
from rig.sources.base import Chunk, ChunkCutter


@dataclass(frozen=True)
class SimSourceConfig:
    monkey: MonkeyConfig = field(default_factory=MonkeyConfig)
    chunk_ms: float = 50.0
    real_time: bool = False
    lag_ms: float = 150.0  # real time: how far the stream trails the clock
    clock_offset_s: float = 0.0
    lead_in_s: float = 1.0  # virtual: the stream starts this long before the first flip
    max_chunks_per_read: int = 40
    rig: str = "sim"


@dataclass
class SimCounters:
    flips: int = 0
    late_flips: int = 0
    fixation_breaks: int = 0
    chunks: int = 0


class SimSource:
    def __init__(
        self,
        config: SimSourceConfig,
        image_loader: ImageLoader,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.monkey = VirtualMonkey(config.monkey, image_loader)
        self.sample_rate_hz = config.monkey.sample_rate_hz
        self.clock = clock
        self.counters = SimCounters()
        self.onsets: dict[str, int] = {}  # presentation id -> true onset sample (ground truth)
        self._cutter = ChunkCutter(config.rig, "sim")
        self._chunk = max(1, self.monkey.samples(config.chunk_ms))
        self._target: int | None = None
        self._running = False

    def sample_of(self, host_time_s: float) -> int:
        return round((host_time_s + self.config.clock_offset_s) * self.sample_rate_hz)

    def start(self) -> None:
        self._running = True
        if self.config.real_time:
            self._cutter.position = self.sample_of(self.clock() - self.config.lag_ms / 1000)

    def stop(self) -> None:
        self._running = False

    def stream_position(self) -> int:
        return self._cutter.position or 0

    def on_flip(self, flip: Flip) -> None:
        sample = self.sample_of(flip.host_flip_time_s)
        if self._cutter.position is None:
            self._cutter.position = sample - round(self.config.lead_in_s * self.sample_rate_hz)
        if sample < self._cutter.position:
            self.counters.late_flips += (
                1  # its word is already in the past; what is not still lands
            )
        spikes, events, onset = self.monkey.respond(sample, flip.event_word, flip.stimulus_id)
        self.onsets[flip.presentation_id] = onset
        self._cutter.add_spikes(spikes)
        self._cutter.add_events(events)
        self.counters.flips += 1
        if not self.config.real_time:
            self._target = max(self._target or sample, sample)

    def on_fixation_break(self, brk: FixationBreak) -> None:
        self.counters.fixation_breaks += 1

    def advance_to(self, host_time_s: float) -> None:
        """Virtual clock: let the stream run up to this host time."""
        sample = self.sample_of(host_time_s)
        if self._cutter.position is None:
            self._cutter.position = sample
        self._target = max(self._target or sample, sample)

    def read(self, timeout_ms: int) -> list[Chunk]:
        if self.config.real_time:
            deadline = time.monotonic() + timeout_ms / 1000
            while True:
                target = self.sample_of(self.clock() - self.config.lag_ms / 1000)
                pos = self._cutter.position
                if pos is not None and target >= pos + self._chunk:
                    return self._generate(target)
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                wait_s = (
                    (pos + self._chunk - target) / self.sample_rate_hz if pos is not None else 0.01
                )
                time.sleep(min(left, max(wait_s, 0.001)))
        if self._target is None:
            return []
        return self._generate(self._target)

    def _generate(self, target: int) -> list[Chunk]:
        out: list[Chunk] = []
        pos = self._cutter.position
        assert pos is not None
        for _ in range(self.config.max_chunks_per_read):
            if pos >= target:
                break
            end = min(pos + self._chunk, target)
            self._cutter.add_spikes(self.monkey.background(pos, end))
            out += self._cutter.cut(end)
            self.counters.chunks += 1
            pos = end
        return out

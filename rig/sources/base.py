"""The acquisition source interface the rig daemon reads from, and chunk helpers shared by sources.

A source delivers the acquisition stream as ``Spikes`` and ``DigitalEvents`` chunks on the
acquisition sample clock (``sample_rate_hz``, 30 kHz by default). Chunks of each kind are
contiguous half-open sample ranges ``[first_sample, last_sample)``: a jump between one chunk's
``last_sample`` and the next one's ``first_sample`` is a gap the aligner marks as such.

Digital events follow the aligner's conventions (``rig.align``): on ``WORD_LINE`` a state-1
record carries a 16-bit event word in ``word`` (state 0: lines back to idle); on
``PHOTODIODE_LINE`` the photodiode's rising (1) and falling (0) edges.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from rig.protocol import EVENT_DTYPE, SPIKE_DTYPE, DigitalEvents, FixationBreak, Flip, Spikes

WORD_LINE = 0
PHOTODIODE_LINE = 1
DEFAULT_SAMPLE_RATE_HZ = 30_000.0

Chunk = Spikes | DigitalEvents


@runtime_checkable
class Source(Protocol):
    """An acquisition stream. ``read`` returns what arrived within ``timeout_ms`` (maybe nothing)."""

    sample_rate_hz: float

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def read(self, timeout_ms: int) -> list[Chunk]: ...

    def on_flip(self, flip: Flip) -> None:
        """What the presenter shows (the simulator uses it; real sources ignore it)."""

    def on_fixation_break(self, brk: FixationBreak) -> None: ...

    def stream_position(self) -> int:
        """The sample up to which every chunk has been delivered (the aligner finalises up to it)."""
        ...


class ChunkCutter:
    """Cuts sorted spike / event records into contiguous chunks with per-stream sequence numbers.

    Records are added as they arrive (any order within what is not yet emitted); ``cut(end)``
    returns the chunks covering [previous end, end). Records older than the previous end arrive
    too late to be placed and are counted in ``late_records``. ``skip_to(end)`` drops the interval
    (a detected loss), which the aligner then sees as a gap.
    """

    def __init__(self, rig: str, stream_prefix: str, start_sample: int | None = None) -> None:
        self.rig = rig
        self.stream_prefix = stream_prefix
        self.position: int | None = start_sample
        self.late_records = 0
        self._spk: list[np.ndarray] = []
        self._evt: list[np.ndarray] = []
        self._seq = 0

    def add_spikes(self, records: np.ndarray) -> None:
        """(n,) SPIKE_DTYPE records, any order."""
        if records.size:
            self._spk.append(self._fresh(records.astype(SPIKE_DTYPE, copy=False)))

    def add_events(self, records: np.ndarray) -> None:
        """(n,) EVENT_DTYPE records, any order."""
        if records.size:
            self._evt.append(self._fresh(records.astype(EVENT_DTYPE, copy=False)))

    def _fresh(self, records: np.ndarray) -> np.ndarray:
        if self.position is None:
            return records
        ok = records["sample"] >= self.position
        late = int(records.size - np.count_nonzero(ok))
        if late:
            self.late_records += late
            return records[ok]
        return records

    def _take(
        self, parts: list[np.ndarray], dtype: np.dtype, end: int
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        if not parts:
            return np.zeros(0, dtype), []
        allr = np.concatenate(parts) if len(parts) > 1 else parts[0]
        allr = allr[np.argsort(allr["sample"], kind="stable")]
        i = int(np.searchsorted(allr["sample"], end, "left"))
        rest = [allr[i:]] if i < allr.size else []
        return allr[:i], rest

    def cut(self, end: int) -> list[Chunk]:
        """Chunks for [position, end); nothing when end does not advance."""
        if self.position is None:
            self.position = min(
                [int(p["sample"].min()) for p in self._spk + self._evt if p.size] + [end]
            )
        start = self.position
        if end <= start:
            return []
        spikes, self._spk = self._take(self._spk, SPIKE_DTYPE, end)
        events, self._evt = self._take(self._evt, EVENT_DTYPE, end)
        seq = self._seq
        self._seq += 1
        self.position = end
        return [
            Spikes(
                rig=self.rig,
                stream=f"{self.stream_prefix}.spk",
                seq=seq,
                first_sample=start,
                last_sample=end,
                spikes=spikes,
            ),
            DigitalEvents(
                rig=self.rig,
                stream=f"{self.stream_prefix}.evt",
                seq=seq,
                first_sample=start,
                last_sample=end,
                events=events,
            ),
        ]

    def skip_to(self, end: int) -> None:
        """Give up [position, end): whatever it held is dropped, the next chunk starts at end."""
        if self.position is None or end > self.position:
            self._spk = [p[p["sample"] >= end] for p in self._spk]
            self._evt = [p[p["sample"] >= end] for p in self._evt]
            self.position = end

"""Onset alignment and spike counting: flips + acquisition stream -> one PresentationRecord per image.

Inputs, all on the acquisition sample clock except flips (presenter's host clock):

- ``Flip`` messages (presentation id, 16-bit event word, host flip time, dropped frames, fixation);
- ``DigitalEvents``: on ``word_line`` every record with state 1 carries an event word in ``word``
  (a source turns its hardware's representation into that); on ``photodiode_line`` the
  photodiode's rising (state 1) and falling (state 0) edges;
- ``Spikes``: (sample, channel, unit); ``channel_to_site`` maps channels to the session's site
  order (all units of a channel count for its site: multi-unit activity);
- ``FixationBreak`` messages and stream gaps.

Matching a flip to its word. Words repeat (one per image of a block, and images repeat), so a
flip is matched by value *and* time: the offset between the host clock and the sample clock is
first found by a vote over all (flip, word) pairs with equal values (the offset most pairs agree
on within ``word_match_tolerance_ms``), then each flip takes the unused word of its value nearest
its predicted sample, within the tolerance; the offset follows the median of recent matches. A
word that never arrives (the stream passed the prediction + tolerance) leaves the flip with a host
clock onset (prediction + ``fallback_latency_ms``); a word no flip claims is counted as extra.

Onset: the first photodiode rising edge in [word, word + ``photodiode_max_lag_ms``]; else the
word's sample + ``fallback_latency_ms`` (``onset_source`` says which of photodiode / event_word /
host_clock). Counts: spikes in [onset + window_start_ms, onset + window_end_ms) per site;
optional raster over [raster_start_ms, raster_end_ms) in ``raster_bin_ms`` bins.

A presentation is finalised once the stream has passed the end of everything it needs (window,
raster) plus ``fixation_grace_ms``. It is stored invalid, with the first reason that applies:

- ``no_onset``: no word matched and no clock offset known to place it;
- ``late_flip``: its data were already discarded (the flip came more than ``retain_ms`` late);
- ``stream_gap``: a gap in the stream (or its start) overlaps what the record depends on: from
  its event word (or where the word was looked for) to the end of its counting window;
- ``fixation_break``: the flip says fixation was lost, or a ``FixationBreak`` of its trial came
  before its counting window had ended (host time of the break < flip time + photodiode
  max lag + window end); images whose window ended before the break stay valid;
- ``dropped_frames``: more than ``max_dropped_frames`` frames dropped around its flip.

Everything per spike is vectorised numpy (``np.searchsorted``, ``np.repeat``, ``np.bincount``);
Python loops run only per flip (tens per second).
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rig.protocol import DigitalEvents, FixationBreak, Flip, PresentationRecord, Spikes

log = logging.getLogger(__name__)

INVALID_REASONS: tuple[str, ...] = (
    "no_onset",
    "late_flip",
    "stream_gap",
    "fixation_break",
    "dropped_frames",
)


@dataclass(frozen=True)
class AlignConfig:
    """How flips are matched, onsets found and spikes counted. Times in ms, clocks in samples."""

    n_sites: int
    sample_rate_hz: float = 30_000.0
    window_start_ms: float = 70.0
    window_end_ms: float = 170.0
    word_line: int = 0  # DigitalEvents line whose state-1 records carry event words
    word_mask: int = 0xFFFF  # bits of the flip's event word that reach the acquisition system
    photodiode_line: int | None = 1  # None: no photodiode, onsets from words
    photodiode_max_lag_ms: float = 50.0
    fallback_latency_ms: float = 20.0  # onset = word (or predicted word) + this, without photodiode
    word_match_tolerance_ms: float = 30.0  # flip's predicted sample vs its word
    raster: bool = False
    raster_start_ms: float = -100.0
    raster_end_ms: float = 300.0
    raster_bin_ms: float = 10.0
    max_dropped_frames: int = 0
    channel_to_site: tuple[int, ...] | None = (
        None  # channel -> site index, -1 to ignore; None: identity
    )
    fixation_grace_ms: float = 20.0  # wait this long past the window for a late FixationBreak
    retain_ms: float = 5_000.0  # spikes/events kept behind the stream for late flips
    no_onset_after_ms: float = 5_000.0  # give up placing a flip when no clock offset is known
    rig: str = "rig"
    record_stream: str = "pres"
    finalize_batch: int = 256  # presentations counted together (bounds raster memory)

    def __post_init__(self) -> None:
        assert self.n_sites >= 1, f"n_sites must be >= 1, got {self.n_sites}"
        assert self.sample_rate_hz > 0, "sample_rate_hz must be positive"
        assert self.window_end_ms > self.window_start_ms, (
            "window_end_ms must exceed window_start_ms"
        )
        assert self.raster_end_ms > self.raster_start_ms, (
            "raster_end_ms must exceed raster_start_ms"
        )
        assert self.raster_bin_ms > 0, "raster_bin_ms must be positive"
        assert 0 <= self.word_mask <= 0xFFFF, "word_mask is a 16-bit mask"
        if self.channel_to_site is not None:
            bad = [s for s in self.channel_to_site if not -1 <= s < self.n_sites]
            assert not bad, f"channel_to_site has sites outside [-1, {self.n_sites}): {bad[:5]}"

    def samples(self, ms: float) -> int:
        """A duration in ms as a whole number of samples."""
        return round(ms * self.sample_rate_hz / 1000.0)

    @property
    def n_raster_bins(self) -> int:
        return max(1, round((self.raster_end_ms - self.raster_start_ms) / self.raster_bin_ms))


@dataclass
class AlignCounters:
    flips: int = 0
    duplicate_flips: int = 0
    records: int = 0
    valid: int = 0
    invalid: dict[str, int] = field(default_factory=dict)
    onsets: dict[str, int] = field(default_factory=dict)  # by onset source
    words_matched: int = 0
    words_missing: int = 0
    extra_words: int = 0
    gaps: int = 0
    gap_samples: int = 0
    spikes_in: int = 0
    spikes_unmapped: int = 0  # channel without a site
    spikes_counted: int = 0  # spikes that fell in a counting window
    overlapping_chunks: int = 0  # chunks that started before the previous chunk's end
    late_fixation_breaks: int = 0  # breaks whose trial's records were already finalised

    def as_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}


@dataclass
class _Pending:
    flip: Flip
    added_at_sample: int
    word_sample: int | None = None
    missing_word: bool = False
    onset_sample: int | None = None
    onset_source: str = "event_word"


class Aligner:
    """Turns flips and the acquisition stream into PresentationRecords; see the module docstring."""

    def __init__(self, config: AlignConfig, first_seq: int = 0) -> None:
        self.config = config
        self.counters = AlignCounters()
        self._seq = first_seq
        c = config
        self._rate_per_s = c.sample_rate_hz
        self._win = (c.samples(c.window_start_ms), c.samples(c.window_end_ms))
        self._raster_start = c.samples(c.raster_start_ms)
        self._raster_bin = max(1, c.samples(c.raster_bin_ms))
        self._n_bins = c.n_raster_bins
        need_lo = min(self._win[0], self._raster_start if c.raster else self._win[0])
        need_hi = max(
            self._win[1], self._raster_start + self._n_bins * self._raster_bin if c.raster else 0
        )
        self._need = (need_lo, need_hi)  # samples relative to onset that a record reads
        self._grace = c.samples(c.fixation_grace_ms)
        self._tol = c.samples(c.word_match_tolerance_ms)
        self._pd_lag = c.samples(c.photodiode_max_lag_ms)
        self._fallback = c.samples(c.fallback_latency_ms)
        self._retain = c.samples(c.retain_ms)
        self._give_up = c.samples(c.no_onset_after_ms)
        if c.channel_to_site is None:
            self._chan_map = np.arange(c.n_sites, dtype=np.int32)
        else:
            self._chan_map = np.asarray(c.channel_to_site, dtype=np.int32)

        # Spikes: sorted sample buffer + site of each; new chunks wait in a list.
        # Spikes: one entry per chunk, in stream order: (first, last, samples (n,) i8, sites (n,) i4).
        self._spk_store: deque[tuple[int, int, np.ndarray, np.ndarray]] = deque()
        self._map_drops = bool(np.any(self._chan_map < 0))
        # Words: sample, value, used flag. Photodiode rising edges: samples.
        self._word_samples = np.zeros(0, np.int64)
        self._word_values = np.zeros(0, np.int64)
        self._word_used = np.zeros(0, bool)
        self._pd_rising = np.zeros(0, np.int64)
        # Stream bookkeeping.
        self._next_sample: dict[
            str, int
        ] = {}  # per kind ("spk"/"evt"): where the next chunk starts
        self._gaps: list[tuple[int, int]] = []  # half-open sample ranges without data
        self._horizon = 0  # data below this sample were discarded
        self._stream_pos = 0
        # Flips.
        self._pending: list[_Pending] = []
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._breaks: dict[tuple[int, int, int], float] = {}  # (session, block, trial) -> host time
        self._offset: float | None = None  # sample = offset + rate * host_time_s
        self._recent_offsets: deque[float] = deque(maxlen=16)
        self._consecutive_missing = 0
        self._finalised_trials: OrderedDict[tuple[int, int, int], None] = OrderedDict()

    # ------------------------------------------------------------------ inputs

    def add_flip(self, flip: Flip) -> bool:
        """Queue a flip; False when its presentation id was seen before (a re-sent flip)."""
        if flip.presentation_id in self._seen:
            self.counters.duplicate_flips += 1
            return False
        self._seen[flip.presentation_id] = None
        if len(self._seen) > 200_000:
            self._seen.popitem(last=False)
        self.counters.flips += 1
        self._pending.append(_Pending(flip, added_at_sample=-1))  # set at the next finalize
        return True

    def add_fixation_break(self, brk: FixationBreak) -> None:
        key = (brk.session_id, brk.block_id, brk.trial)
        self._breaks[key] = min(brk.host_time_s, self._breaks.get(key, brk.host_time_s))
        if key in self._finalised_trials:
            self.counters.late_fixation_breaks += 1
        if len(self._breaks) > 100_000:
            del self._breaks[next(iter(self._breaks))]

    def add_spikes(self, msg: Spikes) -> None:
        spikes = self._contiguous("spk", msg.first_sample, msg.last_sample, msg.spikes)
        self.counters.spikes_in += int(spikes.size)
        if not spikes.size:
            return
        chan = spikes["chan"]
        samples = spikes["sample"]
        if int(chan.max()) < self._chan_map.size:
            sites = self._chan_map[chan]  # (n,) int32
        else:
            sites = np.full(chan.shape, -1, np.int32)
            known = chan < self._chan_map.size
            sites[known] = self._chan_map[chan[known]]
        if self._map_drops or (sites.size and int(sites.min()) < 0):
            keep = sites >= 0
            self.counters.spikes_unmapped += int(spikes.size - np.count_nonzero(keep))
            samples, sites = samples[keep], sites[keep]
        if sites.size:
            self._spk_store.append((int(samples[0]), int(samples[-1]) + 1, samples, sites))

    def add_events(self, msg: DigitalEvents) -> None:
        ev = self._contiguous("evt", msg.first_sample, msg.last_sample, msg.events)
        if not ev.size:
            return
        c = self.config
        is_word = (ev["line"] == c.word_line) & (ev["state"] == 1)
        if np.any(is_word):
            self._word_samples = np.concatenate([self._word_samples, ev["sample"][is_word]])
            self._word_values = np.concatenate(
                [self._word_values, ev["word"][is_word].astype(np.int64) & c.word_mask]
            )
            self._word_used = np.concatenate([self._word_used, np.zeros(int(is_word.sum()), bool)])
        if c.photodiode_line is not None:
            rising = (ev["line"] == c.photodiode_line) & (ev["state"] == 1)
            if np.any(rising):
                self._pd_rising = np.concatenate([self._pd_rising, ev["sample"][rising]])

    def note_gap(self, first_sample: int, last_sample: int, *, stream_start: bool = False) -> None:
        """The stream has no data in [first_sample, last_sample) (loss, a restart, a dropped
        chunk). ``stream_start``: the span before the first data, expected and not a loss."""
        if last_sample <= first_sample:
            return
        self._gaps.append((int(first_sample), int(last_sample)))
        if stream_start:
            log.info("stream starts at sample %d", last_sample)
            return
        self.counters.gaps += 1
        self.counters.gap_samples += int(last_sample - first_sample)
        log.warning("stream gap: samples [%d, %d) missing", first_sample, last_sample)

    def _contiguous(self, kind: str, first: int, last: int, records: np.ndarray) -> np.ndarray:
        """Track the chunk sequence of one kind; a jump is a gap, an overlap is trimmed."""
        expected = self._next_sample.get(kind)
        if expected is None:
            if first > 0:
                self.note_gap(0, first, stream_start=True)  # nothing is known before it
        elif first > expected:
            self.note_gap(expected, first)
        elif first < expected:
            self.counters.overlapping_chunks += 1
            records = records[records["sample"] >= expected]
        self._next_sample[kind] = max(last, expected or 0)
        return records

    # ------------------------------------------------------------------ output

    @property
    def pending(self) -> int:
        """Flips not finalised yet."""
        return len(self._pending)

    def finalize_ready(self, stream_sample: int) -> list[PresentationRecord]:
        """Records of every presentation whose data the stream (delivered up to ``stream_sample``) covers."""
        self._stream_pos = max(self._stream_pos, int(stream_sample))
        pos = self._stream_pos
        self._match_words(pos)
        ready: list[_Pending] = []
        keep: list[_Pending] = []
        for p in self._pending:
            if p.added_at_sample < 0:
                p.added_at_sample = pos
            self._place_onset(p, pos)
            if p.onset_sample is None:
                if self._offset is None and pos - p.added_at_sample > self._give_up:
                    ready.append(p)  # cannot be placed: invalid no_onset
                else:
                    keep.append(p)
            elif p.onset_sample + self._need[1] + self._grace <= pos:
                ready.append(p)
            else:
                keep.append(p)
        self._pending = keep
        records: list[PresentationRecord] = []
        if ready:
            batch = self.config.finalize_batch
            for i in range(0, len(ready), batch):
                records.extend(self._records(ready[i : i + batch]))
        self._prune(pos)
        return records

    # ------------------------------------------------------------------ matching

    def _predict(self, flip: Flip) -> int | None:
        if self._offset is None:
            return None
        return round(self._offset + self._rate_per_s * flip.host_flip_time_s)

    def _match_words(self, pos: int) -> None:
        unmatched = [p for p in self._pending if p.word_sample is None and not p.missing_word]
        if not unmatched:
            return
        if self._offset is None:
            self._offset = self._vote_offset(unmatched)
            if self._offset is None:
                return
        free = ~self._word_used
        for p in unmatched:
            predicted = self._predict(p.flip)
            assert predicted is not None
            value = p.flip.event_word & self.config.word_mask
            lo = np.searchsorted(self._word_samples, predicted - self._tol, "left")
            hi = np.searchsorted(self._word_samples, predicted + self._tol, "right")
            cand = np.arange(lo, hi)
            cand = cand[(self._word_values[lo:hi] == value) & free[lo:hi]]
            if cand.size:
                best = int(cand[np.argmin(np.abs(self._word_samples[cand] - predicted))])
                self._word_used[best] = True
                free[best] = False
                p.word_sample = int(self._word_samples[best])
                self.counters.words_matched += 1
                self._consecutive_missing = 0
                self._recent_offsets.append(
                    p.word_sample - self._rate_per_s * p.flip.host_flip_time_s
                )
                self._offset = float(np.median(self._recent_offsets))
            elif predicted + self._tol < pos:
                p.missing_word = True
                self.counters.words_missing += 1
                self._consecutive_missing += 1
        if self._consecutive_missing >= 5:
            # Five flips in a row without their word: the clocks jumped (a restart); vote again.
            log.warning("5 flips in a row without their event word: re-estimating the clock offset")
            self._offset = None
            self._recent_offsets.clear()
            self._consecutive_missing = 0

    def _vote_offset(self, unmatched: list[_Pending]) -> float | None:
        """The host->sample clock offset most (flip, word) pairs of equal value agree on."""
        flips = unmatched[:64]
        free = np.flatnonzero(~self._word_used)
        if not free.size:
            return None
        w_samples = self._word_samples[free]
        w_values = self._word_values[free]
        host = np.array([p.flip.host_flip_time_s for p in flips])  # (F,)
        values = np.array([p.flip.event_word & self.config.word_mask for p in flips])  # (F,)
        same = values[:, None] == w_values[None, :]  # (F, W)
        fi, wi = np.nonzero(same)
        if not fi.size:
            return None
        offsets = w_samples[wi] - self._rate_per_s * host[fi]  # (pairs,)
        order = np.argsort(offsets)
        offsets, fi = offsets[order], fi[order]
        hi = np.searchsorted(offsets, offsets + self._tol, "right")
        lo = np.searchsorted(offsets, offsets - self._tol, "left")
        votes = hi - lo
        # A vote counts distinct flips: one flip agreeing with two words of its value counts once.
        best = int(np.argmax(votes))
        agreeing = np.unique(fi[lo[best] : hi[best]]).size
        if agreeing < min(3, len(flips)):
            return None
        # An offset a whole stimulus-onset interval away that explains as many pairs is as likely
        # (repeated words, a missing one): wait for more flips rather than guess.
        elsewhere = np.abs(offsets - offsets[best]) > 2 * self._tol
        if np.any(elsewhere) and int(votes[elsewhere].max()) >= agreeing:
            return None
        return float(np.median(offsets[lo[best] : hi[best]]))

    def _place_onset(self, p: _Pending, pos: int) -> None:
        if p.onset_sample is not None:
            return
        if p.word_sample is not None:
            word = p.word_sample
            if self.config.photodiode_line is not None:
                if pos < word + self._pd_lag:
                    return  # the photodiode edge may still come
                i = int(np.searchsorted(self._pd_rising, word, "left"))
                if i < self._pd_rising.size and self._pd_rising[i] <= word + self._pd_lag:
                    p.onset_sample, p.onset_source = int(self._pd_rising[i]), "photodiode"
                    return
            p.onset_sample, p.onset_source = word + self._fallback, "event_word"
        elif p.missing_word:
            predicted = self._predict(p.flip)
            if predicted is not None:
                p.onset_sample, p.onset_source = predicted + self._fallback, "host_clock"

    # ------------------------------------------------------------------ counting

    def _gather(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(samples, sites) of the stored spikes in chunks overlapping [lo, hi), sorted."""
        parts = [(sa, si) for first, last, sa, si in self._spk_store if last > lo and first < hi]
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    @property
    def retained_spikes(self) -> int:
        """Spikes held for presentations still to come."""
        return sum(int(e[2].size) for e in self._spk_store)

    def _invalid_reason(self, p: _Pending) -> str | None:
        flip = p.flip
        if p.onset_sample is None:
            return "no_onset"
        if p.onset_sample + self._need[0] < self._horizon:
            return "late_flip"
        # The onset depends on the stream from the word (or where it was looked for) onwards:
        # a gap there may have swallowed the word or the photodiode edge.
        if p.word_sample is not None:
            w0 = min(p.word_sample, p.onset_sample + self._win[0])
        else:
            w0 = min(p.onset_sample - self._fallback - self._tol, p.onset_sample + self._win[0])
        w1 = p.onset_sample + self._win[1]
        if any(g0 < w1 and g1 > w0 for g0, g1 in self._gaps):
            return "stream_gap"
        if not flip.fixation_ok:
            return "fixation_break"
        brk = self._breaks.get((flip.session_id, flip.block_id, flip.trial))
        if brk is not None:
            window_end_s = (self.config.photodiode_max_lag_ms + self.config.window_end_ms) / 1000
            if brk < flip.host_flip_time_s + window_end_s:
                return "fixation_break"
        if flip.dropped_frames > self.config.max_dropped_frames:
            return "dropped_frames"
        return None

    def _records(self, ready: list[_Pending]) -> list[PresentationRecord]:
        c = self.config
        onsets = np.array(
            [p.onset_sample if p.onset_sample is not None else 0 for p in ready], np.int64
        )
        has_onset = np.array([p.onset_sample is not None for p in ready])
        if has_onset.any():
            placed = onsets[has_onset]
            buf = self._gather(int(placed.min()) + self._need[0], int(placed.max()) + self._need[1])
        else:
            buf = self._gather(0, 0)
        counts = self._count(
            buf, onsets + self._win[0], onsets + self._win[1], has_onset
        )  # (k, sites)
        self.counters.spikes_counted += int(counts.sum())
        raster = None
        if c.raster:
            raster = self._raster(buf, onsets, has_onset)  # (k, sites, bins)
        out = []
        for i, p in enumerate(ready):
            reason = self._invalid_reason(p)
            key = (p.flip.session_id, p.flip.block_id, p.flip.trial)
            self._finalised_trials[key] = None
            if len(self._finalised_trials) > 10_000:
                self._finalised_trials.popitem(last=False)
            rast = None
            if raster is not None and p.onset_sample is not None:
                r = raster[i]
                rast = (
                    r.astype(np.uint8)
                    if r.max(initial=0) <= 0xFF
                    else np.minimum(r, 0xFFFF).astype("<u2")
                )
            out.append(
                PresentationRecord(
                    rig=c.rig,
                    stream=c.record_stream,
                    seq=self._seq,
                    presentation_id=p.flip.presentation_id,
                    session_id=p.flip.session_id,
                    block_id=p.flip.block_id,
                    stimulus_id=p.flip.stimulus_id,
                    trial_index=p.flip.trial,
                    position=p.flip.position,
                    onset_sample=p.onset_sample,
                    onset_source=p.onset_source if p.onset_sample is not None else "host_clock",
                    fixation_ok=p.flip.fixation_ok,
                    dropped_frames=p.flip.dropped_frames,
                    valid=reason is None,
                    invalid_reason=reason,
                    window_start_ms=c.window_start_ms,
                    window_end_ms=c.window_end_ms,
                    spike_counts=np.minimum(counts[i], 0xFFFF).astype("<u2"),
                    raster=rast,
                    raster_bin_ms=c.raster_bin_ms if rast is not None else None,
                    raster_start_ms=c.raster_start_ms if rast is not None else None,
                )
            )
            self._seq += 1
            self.counters.records += 1
            if reason is None:
                self.counters.valid += 1
            else:
                self.counters.invalid[reason] = self.counters.invalid.get(reason, 0) + 1
            src = out[-1].onset_source if p.onset_sample is not None else "none"
            self.counters.onsets[src] = self.counters.onsets.get(src, 0) + 1
        return out

    @staticmethod
    def _window_spikes(
        samples: np.ndarray, start: np.ndarray, end: np.ndarray, use: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Indices into ``samples`` of every spike in [start_i, end_i), and the i of each."""
        lo = np.searchsorted(samples, start, "left")  # (k,)
        hi = np.searchsorted(samples, end, "left")  # (k,)
        lens = np.where(use, hi - lo, 0)
        total = int(lens.sum())
        owner = np.repeat(np.arange(start.size), lens)  # (total,)
        first = np.repeat(lo - np.cumsum(lens) + lens, lens)  # (total,)
        idx = first + np.arange(total)
        return idx, owner

    def _count(
        self,
        buf: tuple[np.ndarray, np.ndarray],
        start: np.ndarray,
        end: np.ndarray,
        use: np.ndarray,
    ) -> np.ndarray:
        n_sites = self.config.n_sites
        samples, sites = buf
        idx, owner = self._window_spikes(samples, start, end, use)
        flat = owner * n_sites + sites[idx]
        return np.bincount(flat, minlength=start.size * n_sites).reshape(start.size, n_sites)

    def _raster(
        self, buf: tuple[np.ndarray, np.ndarray], onsets: np.ndarray, use: np.ndarray
    ) -> np.ndarray:
        n_sites, n_bins = self.config.n_sites, self._n_bins
        samples, sites = buf
        start = onsets + self._raster_start
        idx, owner = self._window_spikes(samples, start, start + n_bins * self._raster_bin, use)
        b = (samples[idx] - start[owner]) // self._raster_bin
        flat = (owner * n_sites + sites[idx]) * n_bins + b
        size = onsets.size * n_sites * n_bins
        return np.bincount(flat, minlength=size).reshape(onsets.size, n_sites, n_bins)

    # ------------------------------------------------------------------ memory

    def _prune(self, pos: int) -> None:
        horizon = pos - self._retain
        for p in self._pending:
            ref = p.onset_sample if p.onset_sample is not None else p.word_sample
            if ref is None:
                predicted = self._predict(p.flip)
                ref = predicted if predicted is not None else None
            if ref is not None:
                horizon = min(horizon, ref + self._need[0] - self._pd_lag)
        if horizon <= self._horizon:
            return
        self._horizon = horizon
        while self._spk_store and self._spk_store[0][1] <= horizon:
            self._spk_store.popleft()
        # words: keep those within reach of a flip still to come (tolerance below the horizon)
        j = int(np.searchsorted(self._word_samples, horizon - self._tol, "left"))
        if j:
            self.counters.extra_words += int(np.count_nonzero(~self._word_used[:j]))
            self._word_samples = self._word_samples[j:]
            self._word_values = self._word_values[j:]
            self._word_used = self._word_used[j:]
        m = int(np.searchsorted(self._pd_rising, horizon - self._pd_lag, "left"))
        if m:
            self._pd_rising = self._pd_rising[m:]
        self._gaps = [g for g in self._gaps if g[1] > horizon - self._retain]

"""A planted acquisition stream for alignment tests: flips, words, photodiode and spikes with known counts."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from rig.protocol import EVENT_DTYPE, SPIKE_DTYPE, DigitalEvents, Flip, Spikes

RATE_HZ = 30_000
WORD_LINE = 0
PD_LINE = 1


def sha(i: int) -> str:
    return f"{i:064x}"


@dataclass
class Planted:
    flips: list[Flip]
    word_samples: np.ndarray  # (n_pres,) where each flip's word was written
    onsets: np.ndarray  # (n_pres,) photodiode rising edge
    expected: np.ndarray  # (n_pres, n_sites) spikes planted in [onset + 70 ms, onset + 170 ms)
    spikes: np.ndarray  # (n,) SPIKE_DTYPE, sorted
    events: np.ndarray  # (m,) EVENT_DTYPE, sorted
    end_sample: int
    offset_samples: int
    n_sites: int
    extra: dict[str, int] = field(default_factory=dict)

    def index(self, presentation_id: str) -> int:
        return [f.presentation_id for f in self.flips].index(presentation_id)

    def chunks(
        self, chunk_ms: float = 10.0, skip: tuple[int, int] | None = None
    ) -> Iterator[tuple[Spikes, DigitalEvents]]:
        """The stream in consecutive chunks; ``skip=(a, b)`` leaves out chunks inside [a, b)."""
        step = int(chunk_ms * RATE_HZ / 1000)
        s_samples, e_samples = self.spikes["sample"], self.events["sample"]
        seq = 0
        for a in range(0, self.end_sample, step):
            b = min(a + step, self.end_sample)
            if skip is not None and a >= skip[0] and b <= skip[1]:
                continue
            sp = self.spikes[np.searchsorted(s_samples, a) : np.searchsorted(s_samples, b)]
            ev = self.events[np.searchsorted(e_samples, a) : np.searchsorted(e_samples, b)]
            yield (
                Spikes(rig="t", stream="spk", seq=seq, first_sample=a, last_sample=b, spikes=sp),
                DigitalEvents(
                    rig="t", stream="evt", seq=seq, first_sample=a, last_sample=b, events=ev
                ),
            )
            seq += 1


def plant(
    n_pres: int = 24,
    n_sites: int = 6,
    seed: int = 0,
    per_trial: int = 8,
    soa_ms: float = 200.0,
    words: list[int] | None = None,
    drop_words: tuple[int, ...] = (),
    extra_words: tuple[tuple[int, int], ...] = (),  # (sample, value)
    drop_photodiode: tuple[int, ...] = (),
    photodiode: bool = True,
    offset_samples: int = 45_678,
    session_id: int = 1,
    block_id: int = 2,
) -> Planted:
    rng = np.random.default_rng(seed)
    ms = RATE_HZ // 1000
    host = np.array(
        [
            0.5
            + (i // per_trial) * (per_trial * soa_ms / 1000 + 0.6)
            + (i % per_trial) * soa_ms / 1000
            for i in range(n_pres)
        ]
    )
    if words is None:
        words = [1 + (i * 5) % 7 for i in range(n_pres)]  # values repeat: matching needs time too
    word_samples = np.round(offset_samples + RATE_HZ * host).astype(np.int64) + rng.integers(
        -ms, ms + 1, n_pres
    )
    lags = rng.integers(5 * ms, 40 * ms, n_pres)
    onsets = word_samples + lags
    flips = [
        Flip(
            rig="t",
            stream="flip",
            seq=i,
            presentation_id=str(uuid.UUID(int=int(rng.integers(0, 2**62)) * 128 + i + 1)),
            session_id=session_id,
            block_id=block_id,
            stimulus_id=sha(words[i]),
            trial=i // per_trial,
            position=i % per_trial,
            event_word=words[i],
            host_flip_time_s=float(host[i]),
            dropped_frames=0,
            fixation_ok=True,
        )
        for i in range(n_pres)
    ]
    expected = rng.poisson(3.0, (n_pres, n_sites))
    samples: list[np.ndarray] = []
    chans: list[np.ndarray] = []
    for i in range(n_pres):
        o = int(onsets[i])
        for s in range(n_sites):
            k = int(expected[i, s])
            inside = rng.integers(o + 70 * ms, o + 170 * ms, k)
            if k:
                inside[0] = o + 70 * ms  # the first sample of the window counts
            outside = np.concatenate(
                [rng.integers(o + 172 * ms, o + 230 * ms, 2), [o + 170 * ms, o + 69 * ms + 29]]
            )
            samples += [inside, outside]
            chans += [np.full(k, s), np.full(outside.size, s)]
    all_samples = np.concatenate(samples)
    order = np.argsort(all_samples, kind="stable")
    spikes = np.zeros(all_samples.size, SPIKE_DTYPE)
    spikes["sample"] = all_samples[order]
    spikes["chan"] = np.concatenate(chans)[order]
    ev_rows = []
    for i in range(n_pres):
        if i not in drop_words:
            ev_rows.append((word_samples[i], WORD_LINE, 1, words[i]))
            ev_rows.append((word_samples[i] + 3 * ms, WORD_LINE, 0, 0))
        if photodiode and i not in drop_photodiode:
            ev_rows.append((onsets[i], PD_LINE, 1, 0))
            ev_rows.append((onsets[i] + 100 * ms, PD_LINE, 0, 0))
    for sample, value in extra_words:
        ev_rows.append((sample, WORD_LINE, 1, value))
    events = np.array(sorted(ev_rows), EVENT_DTYPE)
    end = int(onsets[-1] + 600 * ms)
    return Planted(
        flips, word_samples, onsets, expected, spikes, events, end, offset_samples, n_sites
    )

"""Alignment throughput: spike events aligned and counted per second on one core (target >= 5 M/s).

A synthetic 288-site stream at a high spike rate (so the aligner, not the stream, is the load)
with one image every 200 ms, word + photodiode per image, fed in 100 ms chunks to
``rig.align.Aligner`` exactly as the daemon does (add_spikes / add_events / add_flip /
finalize_ready). Only the aligner's time is measured; generating the stream is not. Every count
is checked against an independent computation.

Run alone: ``python bench/rig_align.py`` prints a table, then one JSON line. ``bench/rig.py``
imports ``measure_alignment``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rig.align import AlignConfig, Aligner
from rig.protocol import EVENT_DTYPE, SPIKE_DTYPE, DigitalEvents, Flip, Spikes

RATE_HZ = 30_000


def _stream(
    n_spikes: int, n_sites: int, duration_s: float, soa_s: float, seed: int
) -> tuple[list[tuple[Spikes, DigitalEvents]], list[Flip], np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_samples = int(duration_s * RATE_HZ)
    samples = np.sort(rng.integers(0, n_samples, n_spikes))
    spikes = np.zeros(n_spikes, SPIKE_DTYPE)
    spikes["sample"] = samples
    spikes["chan"] = rng.integers(0, n_sites, n_spikes)
    host = np.arange(0.5, duration_s - 1.0, soa_s)  # flip times; host clock = sample clock / rate
    words = np.round(host * RATE_HZ).astype(np.int64)
    onsets = words + rng.integers(150, 900, host.size)  # 5-30 ms photodiode lag
    ev_rows = [(w, 0, 1, 1 + i % 500) for i, w in enumerate(words)] + [(o, 1, 1, 0) for o in onsets]
    events = np.array(sorted(ev_rows), EVENT_DTYPE)
    flips = [
        Flip(
            rig="b",
            stream="flip",
            seq=i,
            presentation_id=str(uuid.UUID(int=i + 1)),
            session_id=1,
            block_id=1,
            stimulus_id=f"{i % 500:064x}",
            trial=i // 8,
            position=i % 8,
            event_word=1 + i % 500,
            host_flip_time_s=float(t),
            dropped_frames=0,
            fixation_ok=True,
        )
        for i, t in enumerate(host)
    ]
    chunk = int(0.1 * RATE_HZ)
    chunks = []
    for k, a in enumerate(range(0, n_samples, chunk)):
        b = min(a + chunk, n_samples)
        sp = spikes[np.searchsorted(samples, a) : np.searchsorted(samples, b)]
        ev = events[np.searchsorted(events["sample"], a) : np.searchsorted(events["sample"], b)]
        chunks.append(
            (
                Spikes(rig="b", stream="spk", seq=k, first_sample=a, last_sample=b, spikes=sp),
                DigitalEvents(
                    rig="b", stream="evt", seq=k, first_sample=a, last_sample=b, events=ev
                ),
            )
        )
    return chunks, flips, words, onsets, spikes


def _run(n_spikes: int, n_sites: int, raster: bool, seed: int) -> dict[str, float]:
    duration_s = 40.0
    chunks, flips, words, onsets, spikes = _stream(n_spikes, n_sites, duration_s, 0.2, seed)
    aligner = Aligner(AlignConfig(n_sites=n_sites, raster=raster, fixation_grace_ms=0.0))
    records = []
    next_flip = 0
    t0 = time.perf_counter()
    for spk, evt in chunks:
        while next_flip < len(flips) and words[next_flip] < spk.last_sample:
            aligner.add_flip(flips[next_flip])
            next_flip += 1
        aligner.add_spikes(spk)
        aligner.add_events(evt)
        records += aligner.finalize_ready(spk.last_sample)
    elapsed = time.perf_counter() - t0
    # independent check of every count
    assert len(records) == len(flips), f"{len(records)} records for {len(flips)} flips"
    by_id = {r.presentation_id: r for r in records}
    s = spikes["sample"]
    for i in range(0, len(flips), max(1, len(flips) // 20)):
        o = int(onsets[i])
        win = spikes[np.searchsorted(s, o + 2100) : np.searchsorted(s, o + 5100)]
        want = np.bincount(win["chan"], minlength=n_sites)
        got = by_id[flips[i].presentation_id].spike_counts
        assert np.array_equal(got, want), (
            f"presentation {i}: counts differ from the direct computation"
        )
    return {
        "spikes": float(n_spikes),
        "seconds": elapsed,
        "spike_events_per_s": n_spikes / elapsed,
        "presentations": float(len(records)),
        "stream_s_per_wall_s": duration_s / elapsed,
    }


def measure_alignment(
    n_spikes: int = 8_000_000, n_sites: int = 288, seed: int = 0
) -> dict[str, float]:
    """Throughput of the aligner; keys: spike_events_per_s (counts only) and ..._raster."""
    counts = _run(n_spikes, n_sites, raster=False, seed=seed)
    with_raster = _run(n_spikes, n_sites, raster=True, seed=seed)
    return {
        "spike_events_per_s": counts["spike_events_per_s"],
        "spike_events_per_s_raster": with_raster["spike_events_per_s"],
        "align_spikes": counts["spikes"],
        "align_seconds": counts["seconds"],
        "align_seconds_raster": with_raster["seconds"],
        "align_presentations": counts["presentations"],
        "align_stream_s_per_wall_s": counts["stream_s_per_wall_s"],
        "align_sites": float(n_sites),
    }


def main() -> None:
    res = measure_alignment()
    target = 5e6
    print(f"{'measure':40s} {'value':>14s} {'target':>10s}")
    print(
        f"{'spikes aligned+counted /s (counts)':40s} {res['spike_events_per_s']:14,.0f} {target:10,.0f}"
    )
    print(
        f"{'spikes aligned+counted /s (+raster)':40s} {res['spike_events_per_s_raster']:14,.0f} {'':>10s}"
    )
    print(f"{'spikes in run':40s} {res['align_spikes']:14,.0f}")
    print(f"{'presentations finalised':40s} {res['align_presentations']:14,.0f}")
    print(f"{'stream seconds per wall second':40s} {res['align_stream_s_per_wall_s']:14,.1f}")
    print(json.dumps({k: round(v, 3) for k, v in res.items()}))


if __name__ == "__main__":
    main()

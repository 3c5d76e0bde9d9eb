"""rig.align: planted spikes, words and photodiode edges -> exact counts, onsets and invalid reasons."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rig.align import AlignConfig, Aligner
from rig.protocol import FixationBreak, PresentationRecord, decode
from tests.rig.planted import PD_LINE, RATE_HZ, WORD_LINE, Planted, plant

MS = RATE_HZ // 1000


def config(p: Planted, **over: object) -> AlignConfig:
    fields: dict[str, object] = dict(
        n_sites=p.n_sites, sample_rate_hz=RATE_HZ, word_line=WORD_LINE, photodiode_line=PD_LINE
    )
    fields.update(over)
    return AlignConfig(**fields)  # type: ignore[arg-type]


def run(
    p: Planted,
    aligner: Aligner,
    skip: tuple[int, int] | None = None,
    breaks: dict[int, float] | None = None,
    flips_late_ms: float = 0.0,
) -> dict[str, PresentationRecord]:
    """Stream the planted data in 10 ms chunks; each flip arrives when the stream reaches its word."""
    out: dict[str, PresentationRecord] = {}
    next_flip = 0
    for spk, evt in p.chunks(skip=skip):
        while (
            next_flip < len(p.flips)
            and p.word_samples[next_flip] + flips_late_ms * MS <= spk.last_sample
        ):
            aligner.add_flip(p.flips[next_flip])
            if breaks and next_flip in breaks:
                f = p.flips[next_flip]
                aligner.add_fixation_break(
                    FixationBreak(
                        rig="t",
                        stream="flip",
                        seq=0,
                        session_id=f.session_id,
                        block_id=f.block_id,
                        trial=f.trial,
                        host_time_s=breaks[next_flip],
                    )
                )
            next_flip += 1
        aligner.add_spikes(spk)
        aligner.add_events(evt)
        for rec in aligner.finalize_ready(spk.last_sample):
            assert rec.presentation_id not in out, "a presentation was finalised twice"
            out[rec.presentation_id] = decode(rec.encode())  # type: ignore[assignment]
    return out


def test_planted_counts_are_exact() -> None:
    p = plant(seed=1)
    aligner = Aligner(config(p))
    out = run(p, aligner)
    assert len(out) == len(p.flips)
    for i, flip in enumerate(p.flips):
        rec = out[flip.presentation_id]
        assert rec.valid and rec.invalid_reason is None
        assert rec.onset_source == "photodiode"
        assert rec.onset_sample == p.onsets[i]
        assert np.array_equal(rec.spike_counts, p.expected[i]), i
        assert (rec.trial_index, rec.position, rec.stimulus_id) == (
            flip.trial,
            flip.position,
            flip.stimulus_id,
        )
    c = aligner.counters
    assert c.words_matched == len(p.flips) and c.words_missing == 0
    assert c.spikes_counted == int(p.expected.sum())
    assert c.valid == len(p.flips) and aligner.pending == 0


def test_flips_arriving_before_or_after_their_data() -> None:
    p = plant(seed=2)
    early = run(p, Aligner(config(p)), flips_late_ms=-150)
    late = run(p, Aligner(config(p)), flips_late_ms=150)  # onset still ahead of the window end
    for out in (early, late):
        assert all(
            np.array_equal(out[f.presentation_id].spike_counts, p.expected[i])
            for i, f in enumerate(p.flips)
        )


def test_missing_word_falls_back_to_host_clock() -> None:
    p = plant(seed=3, drop_words=(5,))
    aligner = Aligner(config(p))
    out = run(p, aligner)
    rec = out[p.flips[5].presentation_id]
    assert rec.onset_source == "host_clock" and rec.valid
    assert rec.onset_sample is not None
    assert (
        abs(rec.onset_sample - (p.word_samples[5] + 20 * MS)) <= 2 * MS
    )  # predicted word + fallback
    assert aligner.counters.words_missing == 1
    for i, f in enumerate(p.flips):
        if i != 5:
            assert out[f.presentation_id].onset_source == "photodiode"
            assert np.array_equal(out[f.presentation_id].spike_counts, p.expected[i])


def test_first_word_missing_with_repeated_values() -> None:
    # Word values repeat every 7 images and the first word never arrives; flips come late, so
    # several words are already there when the first flip is matched.
    p = plant(seed=4, n_pres=16, drop_words=(0,))
    out = run(p, Aligner(config(p)), flips_late_ms=400)
    assert out[p.flips[0].presentation_id].onset_source == "host_clock"
    for i, f in enumerate(p.flips[1:], start=1):
        assert out[f.presentation_id].onset_sample == p.onsets[i]
        assert np.array_equal(out[f.presentation_id].spike_counts, p.expected[i])


def test_identical_words_do_not_anchor_on_a_guess() -> None:
    # All words equal: one flip and two candidate words is ambiguous, so no offset is chosen yet.
    p = plant(seed=4, n_pres=12, words=[9] * 12)
    aligner = Aligner(config(p))
    for spk, evt in p.chunks():
        aligner.add_spikes(spk)
        aligner.add_events(evt)
        if spk.last_sample > p.word_samples[1] + 30 * MS:
            break
    aligner.add_flip(p.flips[0])
    assert aligner.finalize_ready(spk.last_sample) == []
    assert aligner._offset is None
    out = run(p, aligner)  # the rest arrive in time: all placed on their own words
    for i, f in enumerate(p.flips):
        assert (
            out.get(f.presentation_id) is None or out[f.presentation_id].onset_sample == p.onsets[i]
        )


def test_extra_words_are_ignored_and_counted() -> None:
    base = plant(seed=5)
    extra = (
        (
            int(base.word_samples[3] + 12 * MS),
            base.flips[3].event_word,
        ),  # same value, farther than the real one
        (
            int(base.word_samples[7] - 90 * MS),
            base.flips[7].event_word,
        ),  # same value, outside tolerance
        (int(base.word_samples[9] + 50 * MS), 4321),  # a value no flip has
    )
    p = plant(seed=5, extra_words=extra)
    aligner = Aligner(config(p, retain_ms=500.0))
    out = run(p, aligner)
    for i, f in enumerate(p.flips):
        assert out[f.presentation_id].onset_sample == p.onsets[i]
        assert np.array_equal(out[f.presentation_id].spike_counts, p.expected[i])
    assert aligner.counters.extra_words == 3


def test_no_photodiode_uses_word_plus_latency() -> None:
    p = plant(seed=6, photodiode=False)
    out = run(p, Aligner(config(p, photodiode_line=None, fallback_latency_ms=17.0)))
    for i, f in enumerate(p.flips):
        rec = out[f.presentation_id]
        assert rec.onset_source == "event_word"
        assert rec.onset_sample == p.word_samples[i] + 17 * MS


def test_one_photodiode_edge_missing() -> None:
    p = plant(seed=7, drop_photodiode=(4,))
    out = run(p, Aligner(config(p)))
    assert out[p.flips[4].presentation_id].onset_source == "event_word"
    assert out[p.flips[4].presentation_id].onset_sample == p.word_samples[4] + 20 * MS
    assert out[p.flips[5].presentation_id].onset_source == "photodiode"


def test_gap_invalidates_overlapping_windows_only() -> None:
    p = plant(seed=8)
    o = int(p.onsets[10])
    gap = (o + 100 * MS, o + 130 * MS)
    skip = (gap[0] - gap[0] % (10 * MS), gap[1] + 10 * MS - gap[1] % (10 * MS))
    aligner = Aligner(config(p))
    out = run(p, aligner, skip=skip)
    assert out[p.flips[10].presentation_id].invalid_reason == "stream_gap"
    assert not out[p.flips[10].presentation_id].valid
    for i, f in enumerate(p.flips):
        if i != 10:
            assert out[f.presentation_id].valid, i
            assert np.array_equal(out[f.presentation_id].spike_counts, p.expected[i])
    assert aligner.counters.gaps == 2  # the stream's start, and the skipped chunks
    assert aligner.counters.invalid == {"stream_gap": 1}


def test_explicit_gap_note() -> None:
    p = plant(seed=8, n_pres=4)
    aligner = Aligner(config(p))
    o = int(p.onsets[2])
    aligner.note_gap(o + 160 * MS, o + 161 * MS)
    out = run(p, aligner)
    assert [out[f.presentation_id].invalid_reason for f in p.flips] == [
        None,
        None,
        "stream_gap",
        None,
    ]


def test_fixation_break_invalidates_windows_that_overlap_it() -> None:
    p = plant(seed=9)
    # Trial 1 holds flips 8..15; fixation breaks 120 ms after flip 11 (its window is still open,
    # flip 10's has ended).
    t_break = p.flips[11].host_flip_time_s + 0.120
    out = run(p, Aligner(config(p)), breaks={11: t_break})
    reasons = [out[f.presentation_id].invalid_reason for f in p.flips]
    assert reasons[:11] == [None] * 11  # trial 0, and flips 8-10 whose windows ended before
    assert reasons[11:16] == ["fixation_break"] * 5  # 11 and the rest of its trial
    assert reasons[16:] == [None] * 8  # trial 2
    assert np.array_equal(
        out[p.flips[11].presentation_id].spike_counts, p.expected[11]
    )  # still counted


def test_fixation_break_right_after_a_flip_also_spoils_the_previous_image() -> None:
    p = plant(seed=9)
    t_break = p.flips[11].host_flip_time_s + 0.010  # flip 10's window may still be open
    out = run(p, Aligner(config(p)), breaks={11: t_break})
    reasons = [out[f.presentation_id].invalid_reason for f in p.flips]
    assert reasons[8:16] == [None, None] + ["fixation_break"] * 6


def test_flip_without_fixation_and_dropped_frames() -> None:
    p = plant(seed=10, n_pres=6)
    p.flips[1] = dataclasses.replace(p.flips[1], fixation_ok=False)
    p.flips[2] = dataclasses.replace(p.flips[2], dropped_frames=3)
    p.flips[3] = dataclasses.replace(p.flips[3], dropped_frames=2)
    out = run(p, Aligner(config(p, max_dropped_frames=2)))
    reasons = [out[f.presentation_id].invalid_reason for f in p.flips]
    assert reasons == [None, "fixation_break", "dropped_frames", None, None, None]


def test_finalises_only_after_the_window_end() -> None:
    p = plant(seed=11, n_pres=1)
    cfg = config(p, fixation_grace_ms=0.0)
    aligner = Aligner(cfg)
    aligner.add_flip(p.flips[0])
    end = int(p.onsets[0] + 170 * MS)
    spk, evt = next(iter(p.chunks(chunk_ms=end / MS + 1)))  # one chunk covering everything
    aligner.add_spikes(spk)
    aligner.add_events(evt)
    assert aligner.finalize_ready(end - 1) == []
    assert aligner.pending == 1
    (rec,) = aligner.finalize_ready(end)
    assert np.array_equal(rec.spike_counts, p.expected[0])
    assert aligner.finalize_ready(end + 10_000) == []


def test_duplicate_flips_are_dropped() -> None:
    p = plant(seed=12, n_pres=3)
    aligner = Aligner(config(p))
    out = run(p, aligner)
    assert len(out) == 3
    assert not aligner.add_flip(p.flips[0])  # a re-sent flip after its record went out
    assert aligner.finalize_ready(p.end_sample + 30_000) == []
    assert aligner.counters.duplicate_flips == 1 and aligner.counters.records == 3


def test_channel_map_and_raster() -> None:
    p = plant(seed=13, n_pres=5, n_sites=4)
    # channel 0 -> site 2, 1 -> 0, 2 -> ignored, 3 -> 1; site 3 gets nothing.
    aligner = Aligner(config(p, channel_to_site=(2, 0, -1, 1), raster=True, raster_bin_ms=10.0))
    out = run(p, aligner)
    for i, f in enumerate(p.flips):
        rec = out[f.presentation_id]
        e = p.expected[i]
        assert list(rec.spike_counts) == [e[1], e[3], e[0], 0]
        assert rec.raster is not None and rec.raster.shape == (4, 40)
        assert rec.raster_start_ms == -100.0 and rec.raster_bin_ms == 10.0
        # bins 17..26 are [70, 170) ms after onset
        assert np.array_equal(rec.raster[:, 17:27].sum(axis=1), rec.spike_counts)
    assert aligner.counters.spikes_unmapped > 0


def test_unplaceable_flip_is_invalid_no_onset() -> None:
    p = plant(seed=14, n_pres=2, drop_words=(0, 1))
    aligner = Aligner(config(p, no_onset_after_ms=300.0))
    out = run(p, aligner)
    assert [out[f.presentation_id].invalid_reason for f in p.flips] == ["no_onset", "no_onset"]
    assert all(out[f.presentation_id].onset_sample is None for f in p.flips)


def test_memory_stays_bounded() -> None:
    p = plant(seed=15, n_pres=40)
    aligner = Aligner(config(p, retain_ms=200.0))
    run(p, aligner)
    assert aligner.retained_spikes < 0.2 * p.spikes.size  # only the recent tail is kept


def test_config_rejects_bad_values() -> None:
    with pytest.raises(AssertionError):
        AlignConfig(n_sites=0)
    with pytest.raises(AssertionError):
        AlignConfig(n_sites=2, window_start_ms=170, window_end_ms=70)
    with pytest.raises(AssertionError):
        AlignConfig(n_sites=2, channel_to_site=(0, 5))

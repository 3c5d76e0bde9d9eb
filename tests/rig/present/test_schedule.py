"""Block scheduling: frames, event words, trials and re-queueing (pure logic)."""

from __future__ import annotations

from collections import Counter

import pytest

from rig.present.schedule import (
    BlockPlan,
    BlockScheduler,
    cumulative_counts,
    event_words,
    first_trial_index,
    frames_for_ms,
)

IDS = [f"{i:064x}" for i in range(1, 11)]


def _plan(sequence: list[str], k: int = 4, seed: int = 3, **rsvp: float) -> BlockPlan:
    body = {
        "session_id": 1,
        "block_id": 2,
        "block_index": 0,
        "seed": seed,
        "rsvp": {"on_ms": 100, "off_ms": 100, "images_per_trial": k, "fixation_ms": 300, **rsvp},
        "protocol": {"image_size_deg": 8, "fixation_window_deg": 2, "response_window_end_ms": 170},
        "items": [
            {"stimulus_id": s, "image_url": f"/api/v1/stimuli/{s}/image", "remaining": n}
            for s, n in Counter(sequence).items()
        ],
        "sequence": sequence,
    }
    return BlockPlan.from_next_block(body)


def test_durations_round_to_whole_frames() -> None:
    assert frames_for_ms(100, 60) == 6
    assert frames_for_ms(100, 144) == 14  # 14.4 frames
    assert frames_for_ms(100, 75) == 8  # 7.5 rounds up
    assert frames_for_ms(0, 60) == 0
    t = _plan(IDS, on_ms=8).timing(60)
    assert t.on_frames == 1  # an image is on for at least one frame
    assert (t.off_frames, t.fixation_frames) == (6, 18)
    with pytest.raises(ValueError, match="refresh rate"):
        frames_for_ms(100, 0)


def test_valid_after_covers_display_and_count_window() -> None:
    assert _plan(IDS).valid_after_s(60) == pytest.approx(0.22)  # 170 ms window + 50 ms lag
    assert _plan(IDS).valid_after_s(60, onset_lag_ms=0) == pytest.approx(0.2)  # on + off
    assert _plan(IDS, on_ms=50, off_ms=50).valid_after_s(60, 0) == pytest.approx(0.17)


def test_event_words_are_unique_nonzero_16_bit() -> None:
    words = event_words(list(reversed(IDS)))
    assert sorted(words.values()) == list(range(1, 11))
    assert words[IDS[0]] == 1  # rank among sorted ids, whatever the input order
    with pytest.raises(ValueError, match="split the stimulus set"):
        event_words([f"{i:064x}" for i in range(70_000)])


def test_plan_rejects_what_it_cannot_show() -> None:
    with pytest.raises(ValueError, match="next-block"):
        BlockPlan.from_next_block({"session_id": 1})
    body = {
        "session_id": 1, "block_id": 2, "block_index": 0, "seed": 1, "rsvp": {}, "items": [],
        "sequence": [IDS[0]],
    }  # fmt: skip
    with pytest.raises(ValueError, match="without an item"):
        BlockPlan.from_next_block(body)


def test_trials_take_the_queue_in_order() -> None:
    sequence = IDS * 2
    sched = BlockScheduler.for_plan(_plan(sequence, k=4), first_trial_index=1000)
    trials = []
    while (trial := sched.next_trial()) is not None:
        trials.append(trial)
        assert sched.finish_trial(trial, len(trial.stimulus_ids)) == []
    assert [t.index for t in trials] == [1000, 1001, 1002, 1003, 1004]
    assert [s for t in trials for s in t.stimulus_ids] == sequence
    assert [len(t.stimulus_ids) for t in trials] == [4, 4, 4, 4, 4]
    assert sched.done and sched.shown_counts() == {s: 2 for s in IDS}


def test_a_break_requeues_the_unseen_images_later_and_the_block_still_completes() -> None:
    sched = BlockScheduler.for_plan(_plan(IDS * 3, k=5, seed=8))
    first = sched.next_trial()
    assert first is not None
    back = sched.finish_trial(first, 2)
    assert back == list(first.stimulus_ids[2:])
    assert len(sched.queue) == 30 - 2 and sched.requeued_total == 3
    # Keep breaking every other trial at position 1; every image still ends at exactly 3.
    n = 0
    while (trial := sched.next_trial()) is not None:
        n += 1
        sched.finish_trial(trial, 1 if n % 2 else len(trial.stimulus_ids))
    assert sched.shown_counts() == {s: 3 for s in IDS}


def test_requeue_positions_are_seeded() -> None:
    def order(seed: int) -> list[str]:
        sched = BlockScheduler.for_plan(_plan(IDS * 2, k=4, seed=seed))
        shown = []
        while (trial := sched.next_trial()) is not None:
            sched.finish_trial(trial, 1)
            shown.append(trial.stimulus_ids[0])
        return shown

    assert order(5) == order(5)
    assert order(5) != order(6)


def test_finish_trial_checks_its_arguments() -> None:
    sched = BlockScheduler.for_plan(_plan(IDS, k=4))
    trial = sched.next_trial()
    assert trial is not None
    with pytest.raises(RuntimeError, match="still open"):
        sched.next_trial()
    with pytest.raises(ValueError, match="n_fully_shown"):
        sched.finish_trial(trial, 5)


def test_counts_over_runs_and_trial_numbers_per_run() -> None:
    assert cumulative_counts({"a": 1, "b": 2}, {"a": 1, "c": 1}) == {"a": 2, "b": 2, "c": 1}
    assert first_trial_index(12.3456) == 12345
    assert first_trial_index(1_800_000_000.0) == 1_800_000_000_000  # fits the protocol's int64

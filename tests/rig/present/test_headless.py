"""The headless presenter against the real server (HTTP over loopback) and a real ZeroMQ receiver."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from fastapi.testclient import TestClient

from rig import protocol
from rig.present.engine import EngineConfig
from rig.present.headless import HeadlessConfig, HeadlessPresenter, VirtualClock, run_headless
from tests.conftest import auth
from tests.rig.present.checks import (
    VALID_AFTER_S,
    assert_stream_consistent,
    sent_summary,
    summary,
    valid_counts,
)
from tests.rig.present.conftest import (
    LoopbackReceiver,
    complete_session,
    free_port,
    make_image_set,
    schedule_block,
    wait_until,
)


def _config(cache_dir: Path, **kwargs: object) -> HeadlessConfig:
    engine = EngineConfig(iti_ms=50, stall_after_s=0.3, max_stall_s=20, drain_timeout_s=10)
    return HeadlessConfig(cache_dir=cache_dir, engine=engine, resend_after_s=0.3, **kwargs)  # type: ignore[arg-type]


def test_block_reaches_exact_repetitions_and_requeues_after_a_break(
    client: TestClient,
    tokens: dict[str, str],
    live_server: str,
    receiver: LoopbackReceiver,
    cache_dir: Path,
) -> None:
    image_set = make_image_set(client, tokens)
    block = schedule_block(client, tokens, image_set)
    clock_start_s = 100.0
    clock = VirtualClock(clock_start_s)
    config = _config(cache_dir, scripted_breaks={1: 3})  # trial 1 breaks during its 4th image
    with HeadlessPresenter(
        live_server, tokens["rig"], "rig-a", receiver.endpoint, config, seed=5, clock=clock
    ) as presenter:
        results = presenter.run(until_idle=True)
        sent = list(presenter.messages)
        words = list(presenter.dout.words)
        rewards = list(presenter.reward.pulses_ms)
    assert [r.state for r in results] == ["completed"]
    result = results[0]
    assert result.fixation_breaks == 1 and result.requeued == 5  # position 3 + the 4 unseen

    wait_until(lambda: len(receiver.snapshot()) == len(sent), 5, "every message to arrive")
    received = receiver.snapshot()
    assert receiver.duplicates == 0
    assert valid_counts(received, VALID_AFTER_S) == Counter({s: 2 for s in block.stimulus_ids})
    assert result.shown_counts == {s: 2 for s in block.stimulus_ids}
    assert_stream_consistent(received, block.stimulus_ids)
    assert summary(received) == sent_summary(sent)

    # The broken trial: 4 images flipped, then the break; its last 5 images come back later.
    flips = [m for m in received if isinstance(m, protocol.Flip)]
    trials = sorted({m.trial for m in flips})
    trial1 = [m.stimulus_id for m in flips if m.trial == trials[1]]
    assert len(trial1) == 4
    later = Counter(m.stimulus_id for m in flips if m.trial > trials[1])
    assert all(later[s] >= 1 for s in trial1[3:])
    assert len(flips) == 32 + 1  # 32 valid + the one spoiled by the break
    assert [m.trial for m in received if isinstance(m, protocol.FixationBreak)] == [trials[1]]
    assert trials[0] == int(clock_start_s * 1000)  # trial numbers start at the run's start (ms)

    # Flips carry virtual-clock times; frames were counted at the nominal 60 Hz.
    assert all(m.host_flip_time_s > 100.0 for m in flips)
    assert result.frame_intervals_s and all(
        abs(dt - 1 / 60) < 1e-9 for dt in result.frame_intervals_s
    )
    assert result.dropped_frames == 0
    # Event words: each onset writes its image's word, each offset writes 0.
    assert [w for w in words if w] == [m.event_word for m in flips]
    assert len(rewards) == result.trials - 1  # every trial but the broken one

    # The server saved the block as completed with its counts; nothing more is due.
    b = client.get(f"/api/v1/blocks/{flips[0].block_id}", headers=auth(tokens["operator"])).json()
    assert b["state"] == "completed" and b["shown_counts"] == {s: 2 for s in block.stimulus_ids}
    assert (
        client.get("/api/v1/rigs/rig-a/next-block", headers=auth(tokens["rig"])).status_code == 204
    )


def test_same_seed_gives_the_same_message_sequence(
    client: TestClient, tokens: dict[str, str], live_server: str, cache_dir: Path
) -> None:
    image_set = make_image_set(client, tokens)
    streams = []
    for _ in range(2):
        block = schedule_block(client, tokens, image_set, seed=23)
        rx = LoopbackReceiver(f"tcp://127.0.0.1:{free_port()}").start()
        try:
            results = run_headless(
                live_server,
                tokens["rig"],
                "rig-a",
                rx.endpoint,
                _config(cache_dir, break_rate=0.4),
                seed=9,
                clock=VirtualClock(),
            )
            assert [r.state for r in results] == ["completed"]
            assert results[0].fixation_breaks >= 1
            wait_until(lambda: len(rx.snapshot()) >= results[0].flips, 5, "flips")  # noqa: B023
            received = rx.snapshot()
        finally:
            rx.stop()
        assert valid_counts(received, VALID_AFTER_S) == Counter({s: 2 for s in block.stimulus_ids})
        streams.append(summary(received))
        complete_session(client, tokens, block.session_id)
    assert streams[0] == streams[1]


def test_unreachable_receiver_mid_block_loses_and_duplicates_nothing(
    client: TestClient, tokens: dict[str, str], live_server: str, cache_dir: Path
) -> None:
    image_set = make_image_set(client, tokens)
    block = schedule_block(client, tokens, image_set)
    rx = LoopbackReceiver(
        f"tcp://127.0.0.1:{free_port()}", outage_after_flips=10, outage_s=2.0
    ).start()
    try:
        with HeadlessPresenter(
            live_server, tokens["rig"], "rig-a", rx.endpoint, _config(cache_dir), 3, VirtualClock()
        ) as presenter:
            results = presenter.run()
            sent = list(presenter.messages)
            stats = presenter.channel.stats()
        assert rx.outages == 1
        wait_until(lambda: len(rx.snapshot()) == len(sent), 5, "every message to arrive")
        received = rx.snapshot()
    finally:
        rx.stop()
    result = results[0]
    assert result.state == "completed"
    assert result.paused_s > 1.0  # it waited between trials while the receiver was away
    assert stats.pending == 0 and stats.resends >= 1
    flips = [m for m in received if isinstance(m, protocol.Flip)]
    ids = [m.presentation_id for m in flips]
    assert len(ids) == len(set(ids)) == 32 == result.flips  # none lost, none twice
    assert summary(received) == sent_summary(sent)
    assert_stream_consistent(received, block.stimulus_ids)


def test_quit_key_saves_the_block_and_a_second_run_finishes_it(
    client: TestClient, tokens: dict[str, str], live_server: str, cache_dir: Path
) -> None:
    image_set = make_image_set(client, tokens)
    block = schedule_block(client, tokens, image_set)
    rx = LoopbackReceiver(f"tcp://127.0.0.1:{free_port()}").start()
    try:
        # One trial is 3 fixation + 8 × 6 image frames + 3 blank frames; q lands in trial 2.
        first = run_headless(
            live_server,
            tokens["rig"],
            "rig-a",
            rx.endpoint,
            _config(cache_dir, keys_at_frame={70: "q"}),
            seed=1,
            clock=VirtualClock(),
        )
        assert [r.state for r in first] == ["stopped"]
        shown_first = first[0].shown_counts
        assert 8 <= sum(shown_first.values()) < 32
        b = client.get("/api/v1/rigs/rig-a/next-block", headers=auth(tokens["rig"])).json()
        assert Counter(b["sequence"]) == Counter(
            {s: 2 - shown_first.get(s, 0) for s in block.stimulus_ids if shown_first.get(s, 0) < 2}
        )
        second = run_headless(
            live_server,
            tokens["rig"],
            "rig-a",
            rx.endpoint,
            _config(cache_dir),
            seed=1,
            clock=VirtualClock(),
        )
        wait_until(lambda: len(rx.flips()) == first[0].flips + second[0].flips, 5, "every flip")
        received = rx.snapshot()
    finally:
        rx.stop()
    assert [r.state for r in second] == ["completed"]
    assert second[0].shown_counts == {s: 2 for s in block.stimulus_ids}
    assert valid_counts(received, VALID_AFTER_S) == Counter({s: 2 for s in block.stimulus_ids})

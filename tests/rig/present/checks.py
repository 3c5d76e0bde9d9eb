"""Assertions shared by the PsychoPy and headless presenter tests, computed from received messages."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rig import protocol

VALID_AFTER_S = 0.11  # count window end 60 ms + 50 ms photodiode lag > 50 ms on + 50 ms off


def valid_counts(messages: list[Any], valid_after_s: float) -> Counter[str]:
    """Valid presentations per image: flips with fixation held at onset and not spoiled by a break.

    A FixationBreak spoils the flips of its trial whose onset + ``valid_after_s`` (display and
    count window) had not passed when fixation broke.
    """
    breaks = {
        (m.block_id, m.trial): m.host_time_s
        for m in messages
        if isinstance(m, protocol.FixationBreak)
    }
    counts: Counter[str] = Counter()
    for m in messages:
        if not isinstance(m, protocol.Flip) or not m.fixation_ok:
            continue
        broke_s = breaks.get((m.block_id, m.trial))
        if broke_s is not None and m.host_flip_time_s + valid_after_s > broke_s + 1e-9:
            continue
        counts[m.stimulus_id] += 1
    return counts


def summary(messages: list[Any]) -> list[tuple[Any, ...]]:
    """The message stream without ids and times: what must match between presenters.

    Trials are renumbered 0, 1, ... in order of appearance (runs number them from their start
    time, so absolute numbers differ between runs).
    """
    ordinal: dict[tuple[int, int], int] = {}
    out: list[tuple[Any, ...]] = []
    for m in messages:
        trial = ordinal.setdefault((m.block_id, m.trial), len(ordinal))
        if isinstance(m, protocol.Flip):
            out.append(("flip", trial, m.position, m.stimulus_id, m.event_word, m.fixation_ok))
        elif isinstance(m, protocol.FixationBreak):
            out.append(("fixb", trial))
    return out


def sent_summary(sent: list[Any]) -> list[tuple[Any, ...]]:
    """``summary`` of a presenter's own record of what it sent (``SentMessage``)."""
    ordinal: dict[tuple[int, int], int] = {}
    out: list[tuple[Any, ...]] = []
    for m in sent:
        trial = ordinal.setdefault((m.block_id, m.trial), len(ordinal))
        if m.kind == "flip":
            out.append(("flip", trial, m.position, m.stimulus_id, m.event_word, m.fixation_ok))
        else:
            out.append(("fixb", trial))
    return out


def assert_stream_consistent(messages: list[Any], stimulus_ids: list[str]) -> None:
    """Seq strictly increasing; within a trial positions count up from 0; words name images."""
    seqs = [m.seq for m in messages]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "messages arrived out of order"
    words = {sid: i + 1 for i, sid in enumerate(sorted(stimulus_ids))}
    expected_position: dict[int, int] = {}
    for m in messages:
        if isinstance(m, protocol.Flip):
            assert m.event_word == words[m.stimulus_id], "event word does not match its image"
            assert m.position == expected_position.get(m.trial, 0), "positions out of order"
            expected_position[m.trial] = m.position + 1
    flip_times = [m.host_flip_time_s for m in messages if isinstance(m, protocol.Flip)]
    assert flip_times == sorted(flip_times), "flip times go backwards"

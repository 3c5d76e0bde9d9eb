"""The real rig daemon with a planted acquisition system, run as its own process by the tests.

``PlantedSource`` stands in for the acquisition hardware (the one boundary the tests replace): for
every flip it is told about it emits the event word, a photodiode edge 5 ms later and spikes
whose counts in the response window are ``expected_counts(n_sites, i)`` for presentation ``i``
(plus spikes outside the window that must not count). Its clock is virtual: the stream runs to
0.5 s past the newest flip, as fast as the daemon reads it.

    python -m tests.rig.daemon_harness --spool S --flip-bind EP --server EP --session ID \
        --n-sites N [--server-key Z85 --key-file F] --status-file F
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from rig import protocol
from rig.align import AlignConfig
from rig.daemon import DaemonConfig, RigDaemon, SessionLayout, UnknownSession
from rig.delivery import DeliveryConfig
from tests.rig.ingest_fixtures import expected_counts

RATE_HZ = 30_000.0
OFFSET_S = 1.0  # acquisition clock = host clock + 1 s
PHOTODIODE_LAG_MS = 5.0


def presentation_index(presentation_id: str) -> int:
    return uuid.UUID(presentation_id).int - 1


def _by_sample(parts: list[np.ndarray], dtype: np.dtype[Any]) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype)
    merged = np.concatenate(parts)
    return merged[np.argsort(merged["sample"], kind="stable")]


class PlantedSource:
    sample_rate_hz = RATE_HZ

    def __init__(
        self,
        n_sites: int,
        *,
        chunk_ms: float = 50.0,
        tail_ms: float = 500.0,
        chunks_per_read: int = 100,
    ) -> None:
        self.n_sites = n_sites
        self._chunks_per_read = chunks_per_read
        self._chunk = round(chunk_ms * RATE_HZ / 1000)
        self._tail = round(tail_ms * RATE_HZ / 1000)
        self._pos = 0
        self._target = 0
        self._idle_target = 0
        self._last_flip_at = 0.0
        self.flip_pause_s = 0.05
        self._seq = {"spk": 0, "evt": 0}
        self._active: deque[tuple[int, int, np.ndarray, np.ndarray]] = deque()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def stream_position(self) -> int:
        return self._pos

    def on_fixation_break(self, brk: protocol.FixationBreak) -> None:
        pass

    def on_flip(self, flip: protocol.Flip) -> None:
        i = presentation_index(flip.presentation_id)
        word_at = round((OFFSET_S + flip.host_flip_time_s) * RATE_HZ)
        if not self._active and self._pos == 0 and self._target == 0:
            # a running acquisition system: its stream starts shortly before the first flip
            self._pos = self._target = max(0, word_at - round(RATE_HZ))
        if word_at < self._pos:
            return  # the stream is past it: like real data, lost
        onset = word_at + round(PHOTODIODE_LAG_MS * RATE_HZ / 1000)
        ms = RATE_HZ / 1000
        events = np.zeros(4, protocol.EVENT_DTYPE)
        events["sample"] = [word_at, word_at + round(ms), onset, onset + round(100 * ms)]
        events["line"] = [0, 0, 1, 1]
        events["state"] = [1, 0, 1, 0]
        events["word"] = [flip.event_word, 0, 0, 0]
        rng = np.random.default_rng(i)
        counts = expected_counts(self.n_sites, i).astype(np.int64)
        sites = np.concatenate(
            [np.repeat(np.arange(self.n_sites), counts), np.arange(self.n_sites)]
        )
        offsets = np.concatenate(
            [
                rng.integers(round(70 * ms), round(170 * ms), int(counts.sum())),
                rng.integers(round(10 * ms), round(60 * ms), self.n_sites),  # before the window
            ]
        )
        order = np.argsort(offsets, kind="stable")
        spikes = np.zeros(order.size, protocol.SPIKE_DTYPE)
        spikes["sample"] = onset + offsets[order]
        spikes["chan"] = sites[order]
        self._active.append((word_at, int(spikes["sample"][-1]) + 1, spikes, events))
        # While flips keep coming the stream only runs up to the newest word (a later flip can
        # never find its word already passed); once they pause, it runs on past the window.
        self._target = max(self._target, word_at)
        self._idle_target = max(self._idle_target, onset + round(170 * ms) + self._tail)
        self._last_flip_at = time.monotonic()

    def read(self, timeout_ms: int) -> list[protocol.Spikes | protocol.DigitalEvents]:
        if time.monotonic() - self._last_flip_at > self.flip_pause_s:
            self._target = max(self._target, self._idle_target)
        if self._pos >= self._target:
            time.sleep(timeout_ms / 1000)  # an idle acquisition system: nothing new yet
            return []
        out: list[protocol.Spikes | protocol.DigitalEvents] = []
        for _ in range(self._chunks_per_read):
            if self._pos >= self._target:
                break
            a, b = self._pos, min(self._pos + self._chunk, self._target)
            near = []
            for flip in self._active:  # ordered by first sample
                if flip[0] >= b:
                    break
                near.append(flip)
            spk = [s[(s["sample"] >= a) & (s["sample"] < b)] for _, hi, s, _ in near if hi > a]
            evt = [e[(e["sample"] >= a) & (e["sample"] < b)] for _, _, _, e in near]
            spikes = _by_sample(spk, protocol.SPIKE_DTYPE)
            events = _by_sample(evt, protocol.EVENT_DTYPE)
            out.append(
                protocol.Spikes(
                    rig="planted",
                    stream="spk",
                    seq=self._seq["spk"],
                    first_sample=a,
                    last_sample=b,
                    spikes=spikes,
                )
            )
            out.append(
                protocol.DigitalEvents(
                    rig="planted",
                    stream="evt",
                    seq=self._seq["evt"],
                    first_sample=a,
                    last_sample=b,
                    events=events,
                )
            )
            self._seq["spk"] += 1
            self._seq["evt"] += 1
            self._pos = b
            while (
                self._active
                and max(self._active[0][1], int(self._active[0][3]["sample"][-1]) + 1) <= b
            ):
                self._active.popleft()
        return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spool", type=Path, required=True)
    p.add_argument("--flip-bind", required=True)
    p.add_argument("--server", required=True)
    p.add_argument("--session", type=int, required=True)
    p.add_argument("--n-sites", type=int, required=True)
    p.add_argument("--server-key")
    p.add_argument("--key-file", type=Path)
    p.add_argument("--status-file", type=Path, required=True)
    p.add_argument("--resend-after-s", type=float, default=2.0)
    p.add_argument("--auth-retry-s", type=float, default=1.0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    keys: dict[str, Any] = {}
    if args.server_key:
        from rig.cli import load_key_pair

        public, secret = load_key_pair(args.key_file)
        keys = {
            "server_public_key": args.server_key,
            "rig_public_key": public,
            "rig_secret_key": secret,
        }

    def layouts(session_id: int) -> SessionLayout:
        if session_id != args.session:
            raise UnknownSession(f"session {session_id} does not exist")
        return SessionLayout(n_sites=args.n_sites)

    config = DaemonConfig(
        rig="rig-1",
        spool_path=args.spool,
        flip_bind=args.flip_bind,
        delivery=DeliveryConfig(
            server=args.server,
            resend_after_s=args.resend_after_s,
            auth_retry_s=args.auth_retry_s,
            **keys,
        ),
        align=AlignConfig(n_sites=1, sample_rate_hz=RATE_HZ, word_line=0, photodiode_line=1),
        status_interval_s=0.2,
    )
    daemon = RigDaemon(config, PlantedSource(args.n_sites), layouts)
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())

    def write_status(st: dict[str, Any]) -> None:
        tmp = args.status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(st))
        os.replace(tmp, args.status_file)

    try:
        daemon.run(status=write_status)
    finally:
        write_status(daemon.status())
        daemon.close()


if __name__ == "__main__":
    main()

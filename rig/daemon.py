"""The rig daemon: presenter flips + acquisition stream -> presentation records -> server.

One loop, one thread::

    presenter DEALER --flip/fixb--> ROUTER (flip_bind)  --ack-->  presenter
    Source.read() --spk/evt--> Aligner (one per session) --records--> Spool --> Delivery --> ingest

Durability: a presenter message is written to the spool's inbox *before* it is acknowledged, and
leaves the inbox in the same transaction that puts its finalised record in the outbox; records
leave the outbox only on the server's ack. So whatever process dies, an acknowledged flip ends as
exactly one stored presentation (the presentation id makes every re-send idempotent). Data the
acquisition system produced while the daemon was down cannot be recovered: presentations that
needed it are stored as invalid (``stream_gap`` / ``late_flip``), never silently dropped.

Sites: each session's site count and response window come from a ``LayoutProvider`` (the REST
API in production, see ``rest_layout_provider``); each session gets its own ``Aligner``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import zmq

from rig import protocol
from rig.align import AlignConfig, Aligner
from rig.delivery import Delivery, DeliveryConfig
from rig.spool import Spool

log = logging.getLogger("popcontrol.rig.daemon")

StreamMessage = protocol.Spikes | protocol.DigitalEvents
ACK_CHUNK = 500  # ids per Ack: 500 UUIDs + statuses stay well under the 64 KiB header limit


class StreamSource(Protocol):
    """What the daemon needs of an acquisition source (``rig.sources``)."""

    sample_rate_hz: float

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def read(self, timeout_ms: int) -> list[StreamMessage]: ...
    def on_flip(self, flip: protocol.Flip) -> None: ...
    def on_fixation_break(self, brk: protocol.FixationBreak) -> None: ...
    def stream_position(self) -> int: ...


class StreamRecorder(Protocol):
    def write(self, frames: list[bytes]) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class SessionLayout:
    """What the daemon must know about a session before it can count its presentations."""

    n_sites: int
    window_start_ms: float = 70.0
    window_end_ms: float = 170.0
    channel_to_site: tuple[int, ...] | None = None  # None: channel i is site i


LayoutProvider = Callable[[int], SessionLayout]


class UnknownSession(LookupError):
    """Raised by a LayoutProvider for a session that does not exist (a permanent failure)."""


@dataclass(frozen=True)
class DaemonConfig:
    rig: str
    spool_path: Path
    delivery: DeliveryConfig
    align: AlignConfig  # template: n_sites, windows and channel map are set per session
    flip_bind: str = "tcp://127.0.0.1:5610"
    read_timeout_ms: int = 5
    replay_window_s: float = 3.0  # recent stream kept to prime an aligner made for a new session
    layout_retry_s: float = 2.0
    status_interval_s: float = 0.5
    forget_fixation_breaks_after_s: float = 600.0
    spool_synchronous: str = "FULL"


@dataclass
class DaemonCounters:
    presenter_messages: int = 0
    presenter_duplicates: int = 0
    presenter_rejected: Counter[str] = field(default_factory=Counter)
    stream_messages: int = 0
    finalised: int = 0
    valid: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    waiting_for_layout: int = 0


class RigDaemon:
    def __init__(
        self,
        config: DaemonConfig,
        source: StreamSource,
        layouts: LayoutProvider,
        *,
        recorder: StreamRecorder | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.config = config
        self.source = source
        self.layouts = layouts
        self.recorder = recorder
        self.counters = DaemonCounters()
        self._own_ctx = context is None
        self.ctx: zmq.Context[Any] = context or zmq.Context()
        self.spool = Spool(config.spool_path, synchronous=config.spool_synchronous)
        self.delivery = Delivery(self.ctx, self.spool, config.delivery)
        self.flips: zmq.Socket[bytes] = self.ctx.socket(zmq.ROUTER)
        self.flips.setsockopt(zmq.LINGER, 0)
        self.flips.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted presenter takes its identity
        self.flips.bind(config.flip_bind)
        self.flip_endpoint = self.flips.getsockopt_string(zmq.LAST_ENDPOINT)
        self._aligners: dict[int, Aligner] = {}
        self._layout_failed_at: dict[int, float] = {}
        self._waiting: list[protocol.Flip] = []  # flips of sessions whose layout is not known yet
        self._recent: deque[StreamMessage] = deque()
        self._record_seq = 0
        self._ack_seq = 0
        self._stop = threading.Event()
        self._started = False
        self._fixb_swept_at = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the source and re-apply presenter messages kept from a previous run."""
        self.source.start()
        kept = self.spool.inbox()
        for key, frames in kept:
            try:
                msg = protocol.decode(frames)
            except protocol.DecodeError:
                log.error("dropping an unreadable kept presenter message %s", key)
                self.spool.put_many([], forget_inbox=[key])
                continue
            if isinstance(msg, protocol.Flip | protocol.FixationBreak):
                self._apply(msg)
        if kept:
            log.info("re-applied %d presenter messages kept from the previous run", len(kept))
        self._started = True

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        try:
            self.source.stop()
        finally:
            if self.recorder is not None:
                self.recorder.close()
            self.delivery.close()
            self.flips.close(0)
            self.spool.close()
            if self._own_ctx:
                self.ctx.term()

    def run(self, status: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Loop until ``stop()``; ``status`` gets ``status()`` every ``status_interval_s``."""
        if not self._started:
            self.start()
        next_status = 0.0
        while not self._stop.is_set():
            self.step()
            now = time.monotonic()
            if status is not None and now >= next_status:
                status(self.status())
                next_status = now + self.config.status_interval_s

    def step(self) -> None:
        """One round: presenter messages, stream data, finalisation, delivery."""
        self._presenter()
        self._retry_waiting()
        messages = self.source.read(self.config.read_timeout_ms)
        read_control = getattr(self.source, "read_control", None)
        if read_control is not None:  # a replay carries its presenter messages
            for msg in read_control():
                self._apply(msg)
        if messages:
            self._stream(messages)
        self._finalise()
        self.delivery.pump()

    # -- presenter channel -------------------------------------------------------------------

    def _presenter(self) -> None:
        received: list[tuple[bytes, list[bytes], protocol.Flip | protocol.FixationBreak]] = []
        while len(received) < 10_000:
            try:
                identity, *frames = self.flips.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            self.counters.presenter_messages += 1
            try:
                msg = protocol.decode(frames)
            except protocol.DecodeError as exc:
                self.counters.presenter_rejected[exc.reason] += 1
                log.warning("bad message from the presenter (%s): %s", exc.reason, exc.message)
                continue
            if not isinstance(msg, protocol.Flip | protocol.FixationBreak):
                if not isinstance(msg, protocol.Heartbeat):
                    self.counters.presenter_rejected["unexpected_message"] += 1
                continue
            received.append((identity, frames, msg))
            if self.recorder is not None:
                self.recorder.write(frames)
        if not received:
            return
        fresh = self.spool.put_inbox_many([(protocol.ack_key(m), f) for _, f, m in received])
        acks: dict[bytes, tuple[list[str], list[str]]] = {}
        for (identity, _, msg), new in zip(received, fresh, strict=True):
            key = protocol.ack_key(msg)
            if new:
                self._apply(msg)
            else:
                self.counters.presenter_duplicates += 1
            ids, statuses = acks.setdefault(identity, ([], []))
            ids.append(key)
            statuses.append(protocol.ACK_STORED if new else protocol.ACK_DUPLICATE)
        for identity, (ids, statuses) in acks.items():
            for start in range(0, len(ids), ACK_CHUNK):
                self._ack_seq += 1
                ack = protocol.Ack(
                    rig=self.config.rig,
                    stream="flip-ack",
                    seq=self._ack_seq,
                    ids=ids[start : start + ACK_CHUNK],
                    statuses=statuses[start : start + ACK_CHUNK],
                )
                try:
                    self.flips.send_multipart([identity, *ack.encode()], flags=zmq.NOBLOCK)
                except zmq.Again:
                    log.warning("presenter not reading acks; it will re-send")

    def _apply(self, msg: protocol.Flip | protocol.FixationBreak) -> None:
        if isinstance(msg, protocol.FixationBreak):
            for each in self._aligners.values():
                each.add_fixation_break(msg)
            self.source.on_fixation_break(msg)
            return
        try:
            aligner = self._aligner_for(msg.session_id)
        except UnknownSession as exc:
            self.counters.presenter_rejected["unknown_session"] += 1
            log.error("flip %s names an unknown session: %s", msg.presentation_id, exc)
            self.spool.put_many([], forget_inbox=[msg.presentation_id])
            return
        self.source.on_flip(msg)
        if aligner is None:
            self._waiting.append(msg)
            self.counters.waiting_for_layout = len(self._waiting)
        elif not aligner.add_flip(msg):  # finalised already: a late re-send
            self.spool.put_many([], forget_inbox=[msg.presentation_id])

    def _aligner_for(self, session_id: int) -> Aligner | None:
        aligner = self._aligners.get(session_id)
        if aligner is not None:
            return aligner
        failed_at = self._layout_failed_at.get(session_id)
        if failed_at is not None and time.monotonic() - failed_at < self.config.layout_retry_s:
            return None
        try:
            layout = self.layouts(session_id)
        except UnknownSession:
            raise
        except Exception as exc:
            self._layout_failed_at[session_id] = time.monotonic()
            log.error("cannot get the site layout of session %d (will retry): %s", session_id, exc)
            return None
        self._layout_failed_at.pop(session_id, None)
        config = replace(
            self.config.align,
            n_sites=layout.n_sites,
            window_start_ms=layout.window_start_ms,
            window_end_ms=layout.window_end_ms,
            channel_to_site=layout.channel_to_site,
            rig=self.config.rig,
        )
        aligner = Aligner(config, first_seq=self._record_seq)
        for msg in self._recent:  # prime it with the stream just before its first flip
            self._feed(aligner, msg)
        self._aligners[session_id] = aligner
        log.info(
            "session %d: %d sites, window [%g, %g) ms",
            session_id,
            layout.n_sites,
            layout.window_start_ms,
            layout.window_end_ms,
        )
        return aligner

    def _retry_waiting(self) -> None:
        if not self._waiting:
            return
        waiting, self._waiting = self._waiting, []
        for flip in waiting:
            try:
                aligner = self._aligner_for(flip.session_id)
            except UnknownSession:
                self.counters.presenter_rejected["unknown_session"] += 1
                self.spool.put_many([], forget_inbox=[flip.presentation_id])
                continue
            if aligner is None:
                self._waiting.append(flip)
            elif not aligner.add_flip(flip):
                self.spool.put_many([], forget_inbox=[flip.presentation_id])
        self.counters.waiting_for_layout = len(self._waiting)

    # -- acquisition stream ------------------------------------------------------------------

    @staticmethod
    def _feed(aligner: Aligner, msg: StreamMessage) -> None:
        if isinstance(msg, protocol.Spikes):
            aligner.add_spikes(msg)
        else:
            aligner.add_events(msg)

    def _stream(self, messages: list[StreamMessage]) -> None:
        self.counters.stream_messages += len(messages)
        for msg in messages:
            if self.recorder is not None:
                self.recorder.write(msg.encode())
            for aligner in self._aligners.values():
                self._feed(aligner, msg)
            self._recent.append(msg)
        keep = round(self.config.replay_window_s * self.source.sample_rate_hz)
        newest = messages[-1].last_sample
        while self._recent and self._recent[0].last_sample < newest - keep:
            self._recent.popleft()

    def _finalise(self) -> None:
        if not self._aligners:
            return
        position = self.source.stream_position()
        items: list[tuple[str, list[bytes]]] = []
        for aligner in self._aligners.values():
            for record in aligner.finalize_ready(position):
                record = replace(record, seq=self._record_seq)
                self._record_seq += 1
                items.append((record.presentation_id, record.encode()))
                self.counters.finalised += 1
                if record.valid:
                    self.counters.valid += 1
                else:
                    self.counters.invalid[str(record.invalid_reason)] += 1
        if items:
            self.spool.put_many(items, forget_inbox=[pid for pid, _ in items])
        now = time.time()
        if now - self._fixb_swept_at > 60.0:  # fixation breaks are kept a while, then dropped
            self._fixb_swept_at = now
            self.spool.forget_inbox_before(
                now - self.config.forget_fixation_breaks_after_s, "fixb:"
            )

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        gaps = sum(a.counters.gaps for a in self._aligners.values())
        stats = self.delivery.stats
        lat = sorted(stats.latencies_s)
        return {
            "rig": self.config.rig,
            "finalised": self.counters.finalised,
            "valid": self.counters.valid,
            "invalid": dict(self.counters.invalid),
            "pending_flips": sum(a.pending for a in self._aligners.values()),
            "waiting_for_layout": len(self._waiting),
            "spool_depth": self.spool.depth(),
            "in_flight": self.delivery.in_flight,
            "connected": self.delivery.connected,
            "stored": stats.stored,
            "duplicate": stats.duplicate,
            "rejected": dict(stats.rejected),
            "last_ack_at": stats.last_ack_at,
            "stream_gaps": gaps,
            "stream_position": self.source.stream_position(),
            "presenter_rejected": dict(self.counters.presenter_rejected),
            "auth_failures": stats.auth_failures,
            "latency_p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
        }


def status_line(st: dict[str, Any]) -> str:
    """One line for the terminal."""
    invalid = ", ".join(f"{k} {v}" for k, v in sorted(st["invalid"].items())) or "none"
    if st["last_ack_at"] is None:
        ack = "never"
    else:
        ack = f"{time.time() - st['last_ack_at']:.1f} s ago"
    link = "up" if st["connected"] else "DOWN"
    extra = f" | REJECTED {st['rejected']}" if st["rejected"] else ""
    return (
        f"finalised {st['finalised']} (invalid: {invalid}) | spool {st['spool_depth']} | "
        f"server {link}, last ack {ack} | gaps {st['stream_gaps']}{extra}"
    )


class StatusPrinter:
    """A single refreshing line on a terminal; a log line every ``every_s`` otherwise."""

    def __init__(self, every_s: float = 10.0) -> None:
        self._tty = sys.stderr.isatty()
        self._every_s = every_s
        self._last = 0.0

    def __call__(self, st: dict[str, Any]) -> None:
        line = status_line(st)
        if self._tty:
            sys.stderr.write("\r\x1b[2K" + line)
            sys.stderr.flush()
        elif time.monotonic() - self._last >= self._every_s:
            self._last = time.monotonic()
            log.info("%s", line)

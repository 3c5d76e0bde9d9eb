"""Loss-free delivery of spooled presentation records to the server's ingest.

A DEALER socket (CurveZMQ client when keys are given) sends records from the spool, oldest
first, keeping at most ``window`` in flight. Every ``Ack`` from the server removes the records it
names from the spool (``stored`` / ``duplicate``) or moves them to the spool's rejected table
(``rejected:<reason>``). Nothing leaves the spool without an ack. Unacknowledged records are sent
again after ``resend_after_s`` without progress, and at once after every (re)connection, so a
server that was killed or restarted receives everything; the server's de-duplication by
presentation id makes the extra copies harmless.

``Delivery`` does no I/O of its own between calls: the daemon's loop polls ``socket`` and calls
``pump()``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from rig import protocol
from rig.spool import Spool

log = logging.getLogger("popcontrol.rig.delivery")


@dataclass(frozen=True)
class DeliveryConfig:
    server: str  # e.g. tcp://lab-server:5601
    server_public_key: str | None = None  # Z85; None = plain TCP (server must be insecure)
    rig_public_key: str | None = None
    rig_secret_key: str | None = None
    window: int = 2000  # records in flight without an ack
    send_batch: int = 500  # records read from the spool per pump
    resend_after_s: float = 5.0  # re-send unacked records after this long without an ack
    latency_samples: int = 10_000  # recent window-end -> ack latencies kept for the status
    auth_retry_s: float = 10.0  # after the server refused our key, try again this much later

    def __post_init__(self) -> None:
        keys = (self.server_public_key, self.rig_public_key, self.rig_secret_key)
        if any(keys) and not all(keys):
            raise ValueError(
                "CurveZMQ needs all three keys: the server's public key and this rig's key pair "
                "(make the pair with `popcontrol rig-keygen`)"
            )
        for key in keys:
            if key is not None and len(key) != 40:
                raise ValueError(f"a CURVE key is 40 Z85 characters, got {len(key)}: {key[:8]}…")
        if self.window < 1 or self.send_batch < 1 or self.resend_after_s <= 0:
            raise ValueError("window, send_batch and resend_after_s must be positive")


@dataclass
class DeliveryStats:
    sent: int = 0
    resent_rounds: int = 0
    stored: int = 0
    duplicate: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    connects: int = 0
    auth_failures: int = 0
    last_ack_at: float | None = None  # time.time()
    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    bad_acks: int = 0


class Delivery:
    def __init__(self, ctx: zmq.Context[Any], spool: Spool, config: DeliveryConfig) -> None:
        self.config = config
        self.spool = spool
        self.stats = DeliveryStats(latencies_s=deque(maxlen=config.latency_samples))
        self._ctx = ctx
        self.socket, self.monitor = self._open()
        self.connected = False
        self._inflight: dict[str, float] = {}  # presentation id -> finalised_at (time.time())
        self._cursor = 0  # highest spool seq sent in this round
        self._last_progress = time.monotonic()
        self._reopen_at: float | None = None

    def _open(self) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
        config = self.config
        s: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a live connection; else send -> Again
        s.setsockopt(zmq.SNDHWM, max(config.window * 2, 1000))
        s.setsockopt(zmq.RCVHWM, 100_000)
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        s.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        if config.server_public_key:
            s.curve_serverkey = config.server_public_key.encode("ascii")
            s.curve_publickey = str(config.rig_public_key).encode("ascii")
            s.curve_secretkey = str(config.rig_secret_key).encode("ascii")
        monitor: zmq.Socket[bytes] = s.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        )
        s.connect(config.server)
        return s, monitor

    def _reopen(self) -> None:
        """A refused handshake is not retried by ZeroMQ: start over with a fresh socket."""
        self.socket.disable_monitor()
        self.monitor.close(0)
        self.socket.close(0)
        self.socket, self.monitor = self._open()
        self._reopen_at = None
        self._restart_round()

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close(0)
        self.socket.close(0)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def pump(self) -> None:
        """Handle connection events and acks that arrived, then send what the window allows."""
        self._events()
        self._acks()
        now = time.monotonic()
        if self._reopen_at is not None and now >= self._reopen_at:
            self._reopen()
        if self._inflight and now - self._last_progress > self.config.resend_after_s:
            log.info(
                "no ack for %.1f s: re-sending %d records",
                now - self._last_progress,
                len(self._inflight),
            )
            self._restart_round()
        if self.connected:
            self._send()

    def _restart_round(self) -> None:
        self._inflight.clear()
        self._cursor = 0
        self._last_progress = time.monotonic()
        self.stats.resent_rounds += 1

    def _events(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self.monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
                self.stats.connects += 1
                log.info("connected to %s", self.config.server)
                self._restart_round()  # what was in flight on the old connection may be lost
            elif kind == zmq.EVENT_DISCONNECTED:
                self.connected = False
                log.warning(
                    "disconnected from %s; will re-send after reconnecting", self.config.server
                )
            else:
                self.connected = False
                self.stats.auth_failures += 1
                if self._reopen_at is None:
                    self._reopen_at = time.monotonic() + self.config.auth_retry_s
                log.error(
                    "the server %s refused the connection (CURVE handshake failed: is this rig's "
                    "public key registered with PATCH /api/v1/rigs/{name}, and is the server key "
                    "right?)",
                    self.config.server,
                )

    def _acks(self) -> None:
        now_wall = time.time()
        while True:
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = protocol.decode(frames)
            except protocol.DecodeError as exc:
                self.stats.bad_acks += 1
                log.warning("undecodable reply from the server (%s): %s", exc.reason, exc)
                continue
            if not isinstance(msg, protocol.Ack):
                self.stats.bad_acks += 1
                continue
            done: list[str] = []
            rejected: dict[str, str] = {}
            for pid, status in zip(msg.ids, msg.statuses, strict=True):
                done.append(pid)
                finalised_at = self._inflight.pop(pid, None)
                if status == "stored":
                    self.stats.stored += 1
                    if finalised_at is not None:
                        self.stats.latencies_s.append(now_wall - finalised_at)
                elif status == "duplicate":
                    self.stats.duplicate += 1
                else:
                    reason = status.removeprefix("rejected:")
                    rejected[pid] = reason
                    self.stats.rejected[reason] += 1
                    log.error("server rejected presentation %s: %s", pid, reason)
            if done:
                self.spool.ack(done, rejected=rejected)
                self.stats.last_ack_at = now_wall
                self._last_progress = time.monotonic()

    def _send(self) -> None:
        room = self.config.window - len(self._inflight)
        while room > 0:
            items = self.spool.pending(min(room, self.config.send_batch), after_seq=self._cursor)
            if not items:
                return
            for item in items:
                if item.presentation_id in self._inflight:
                    self._cursor = item.seq
                    continue
                try:
                    self.socket.send_multipart(item.frames, flags=zmq.NOBLOCK)
                except zmq.Again:
                    return  # no live connection or the pipe is full: try again next pump
                if not self._inflight:
                    self._last_progress = time.monotonic()
                self._inflight[item.presentation_id] = item.finalised_at
                self._cursor = item.seq
                self.stats.sent += 1
                room -= 1

"""Network I/O off the frame loop: the flip channel to the rig daemon and the REST client.

``FlipChannel`` owns a ZeroMQ DEALER on a background thread. The frame loop only puts messages
on a queue. Every message stays pending until the daemon acknowledges its key; pending messages
are re-sent in their original order after a timeout or a reconnect, and nothing newer goes out
while an older one waits, so the daemon sees first arrivals in order. The daemon de-duplicates
by key, so a re-send is harmless.

``ServerClient`` wraps the few REST calls the presenter makes (httpx); ``ProgressReporter``
posts block progress from a background thread, newest counts first.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import zmq

log = logging.getLogger("popcontrol.present.net")

AckDecoder = Callable[[list[bytes]], list[str]]  # frames -> acknowledged keys


@dataclass
class _Pending:
    frames: list[bytes]
    queued_at_s: float
    sent_at_s: float | None = None
    sends: int = 0


@dataclass(frozen=True)
class ChannelStats:
    queued: int
    acked: int
    sends: int
    resends: int
    pending: int
    oldest_pending_age_s: float
    connected: bool


class FlipChannel:
    """DEALER -> daemon ROUTER with acks, ordered re-sends and reconnect handling."""

    def __init__(
        self,
        endpoint: str,
        decode_ack: AckDecoder,
        *,
        resend_after_s: float = 1.0,
        poll_ms: int = 10,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._decode_ack = decode_ack
        self._resend_after_s = resend_after_s
        self._poll_ms = poll_ms
        self._ctx = context or zmq.Context.instance()
        self._inbox: queue.SimpleQueue[tuple[str, list[bytes], float]] = queue.SimpleQueue()
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected = False
        self._queued = self._acked = self._sends = self._resends = 0
        self._oldest_s = 0.0
        self._n_pending = 0

    # -- frame-loop side (never blocks) ------------------------------------------------

    def send(self, key: str, frames: list[bytes]) -> None:
        """Queue one message; ``key`` is what the daemon's ack names (a presentation id)."""
        with self._lock:
            self._queued += 1
            self._n_pending += 1
        self._inbox.put((key, frames, time.monotonic()))

    def stats(self) -> ChannelStats:
        with self._lock:
            return ChannelStats(
                queued=self._queued,
                acked=self._acked,
                sends=self._sends,
                resends=self._resends,
                pending=self._n_pending,
                oldest_pending_age_s=(time.monotonic() - self._oldest_s)
                if self._n_pending
                else 0.0,
                connected=self._connected,
            )

    def healthy(self, stall_after_s: float) -> bool:
        """False when an unacked message is older than ``stall_after_s`` (daemon unreachable)."""
        s = self.stats()
        return s.pending == 0 or s.oldest_pending_age_s < stall_after_s

    def wait_drained(self, timeout_s: float) -> bool:
        """Block (outside the frame loop) until every message is acked; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.stats().pending == 0:
                return True
            time.sleep(0.005)
        return self.stats().pending == 0

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> FlipChannel:
        self._thread = threading.Thread(target=self._run, name="flip-channel", daemon=True)
        self._thread.start()
        return self

    def close(self, drain_timeout_s: float = 0.0) -> None:
        if drain_timeout_s > 0:
            self.wait_drained(drain_timeout_s)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def __enter__(self) -> FlipChannel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- background thread ---------------------------------------------------------------

    def _run(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no silent queueing towards an absent daemon
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(self._poll_ms))
                if monitor in events:
                    self._on_monitor(monitor)
                if sock in events:
                    self._on_acks(sock)
                self._take_inbox()
                self._send_due(sock)
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    def _on_monitor(self, monitor: zmq.Socket[Any]) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                self._set_connected(True)
            elif event == zmq.EVENT_DISCONNECTED:
                self._set_connected(False)
                # Whatever sat in the dead connection's pipe may be lost: send it all again.
                for item in self._pending.values():
                    item.sent_at_s = None
                log.warning("flip channel: daemon at %s disconnected; holding flips", self.endpoint)

    def _set_connected(self, value: bool) -> None:
        with self._lock:
            self._connected = value

    def _on_acks(self, sock: zmq.Socket[Any]) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                keys = self._decode_ack(frames)
            except Exception as exc:  # a bad message is logged and dropped
                log.warning("flip channel: dropped a malformed reply from the daemon: %s", exc)
                continue
            done = 0
            for key in keys:
                if self._pending.pop(key, None) is not None:
                    done += 1
            if done:
                self._update_counts(acked=done)

    def _take_inbox(self) -> None:
        while True:
            try:
                key, frames, queued_at = self._inbox.get_nowait()
            except queue.Empty:
                break
            if key in self._pending:
                raise RuntimeError(f"flip channel: key {key} queued twice")
            self._pending[key] = _Pending(frames, queued_at)
        self._update_counts()

    def _send_due(self, sock: zmq.Socket[Any]) -> None:
        now = time.monotonic()
        for item in self._pending.values():
            due = item.sent_at_s is None or now - item.sent_at_s >= self._resend_after_s
            if not due:
                continue
            try:
                sock.send_multipart(item.frames, zmq.NOBLOCK)
            except zmq.Again:
                break  # no daemon connected: keep order, try again next round
            if item.sends:
                with self._lock:
                    self._resends += 1
            item.sends += 1
            item.sent_at_s = now
            with self._lock:
                self._sends += 1

    def _update_counts(self, acked: int = 0) -> None:
        oldest = next(iter(self._pending.values())).queued_at_s if self._pending else 0.0
        with self._lock:
            self._acked += acked
            self._oldest_s = oldest
            self._n_pending = len(self._pending) + self._inbox.qsize()


# --------------------------------------------------------------------------- REST


class ServerError(RuntimeError):
    """The server answered with an error, or could not be reached; the message says which."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code  # None: the server was not reached


class ServerClient:
    """The presenter's REST calls (bearer rig token)."""

    def __init__(self, server_url: str, token: str, rig: str, timeout_s: float = 10.0) -> None:
        self.server_url = server_url.rstrip("/")
        self.rig = rig
        self._http = httpx.Client(
            base_url=self.server_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
        )

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach the server at {self.server_url}: {exc}") from exc
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ServerError(
                f"{method} {path} -> {response.status_code}: {detail}", response.status_code
            )
        return response

    def next_block(self) -> dict[str, Any] | None:
        """The rig's next block (``NextBlockOut`` JSON), or None when nothing is due (204)."""
        response = self._request("GET", f"/api/v1/rigs/{self.rig}/next-block")
        if response.status_code == 204:
            return None
        body: dict[str, Any] = response.json()
        return body

    def block(self, block_id: int) -> dict[str, Any]:
        body: dict[str, Any] = self._request("GET", f"/api/v1/blocks/{block_id}").json()
        return body

    def post_progress(self, block_id: int, state: str, shown_counts: Mapping[str, int]) -> None:
        self._request(
            "POST",
            f"/api/v1/blocks/{block_id}/progress",
            json={"state": state, "shown_counts": dict(shown_counts)},
        )

    def image_bytes(self, url_path: str) -> bytes:
        return self._request("GET", url_path).content


class ImageCache:
    """Stimulus PNGs on disk, keyed by sha256; every download is verified against its id."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, stimulus_id: str) -> Path:
        return self.root / stimulus_id[:2] / f"{stimulus_id}.png"

    def get(self, client: ServerClient, stimulus_id: str, url_path: str) -> bytes:
        path = self.path(stimulus_id)
        if path.exists():
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() == stimulus_id:
                return data
            log.warning("image cache: %s is corrupt; downloading it again", path)
        data = client.image_bytes(url_path)
        digest = hashlib.sha256(data).hexdigest()
        if digest != stimulus_id:
            raise ServerError(
                f"image {url_path} has sha256 {digest}, not its id {stimulus_id}; "
                "the server's blob store may be damaged"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return data


class ProgressReporter:
    """Posts block progress on a background thread; only the newest counts matter (they grow)."""

    def __init__(self, client: ServerClient, retry_after_s: float = 0.5) -> None:
        self._client = client
        self._retry_after_s = retry_after_s
        self._latest: tuple[int, str, dict[str, int]] | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._failing_since: float | None = None
        self._last_error = ""
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()

    def report(self, block_id: int, state: str, shown_counts: Mapping[str, int]) -> None:
        with self._cond:
            self._latest = (block_id, state, dict(shown_counts))
            self._cond.notify()

    def healthy(self, stall_after_s: float) -> bool:
        with self._cond:
            return (
                self._failing_since is None
                or time.monotonic() - self._failing_since < stall_after_s
            )

    @property
    def last_error(self) -> str:
        with self._cond:
            return self._last_error

    def flush(self, timeout_s: float) -> bool:
        """Wait until the newest report has been accepted by the server; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._latest is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        self.flush(timeout_s)
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._latest is None and not self._stop:
                    self._cond.wait()
                if self._latest is None:
                    return
                job = self._latest
            try:
                self._client.post_progress(*job)
            except ServerError as exc:
                if exc.status_code is not None and exc.status_code < 500:
                    log.error("progress for block %d refused: %s", job[0], exc)
                    with self._cond:
                        self._last_error = str(exc)
                        if self._latest is job:
                            self._latest = None
                        self._cond.notify_all()
                    continue
                with self._cond:
                    if self._failing_since is None:
                        self._failing_since = time.monotonic()
                        log.warning("progress: %s; retrying", exc)
                    self._last_error = str(exc)
                    if self._stop:
                        return
                    self._cond.wait(self._retry_after_s)
                continue
            with self._cond:
                self._failing_since = None
                if self._latest is job:
                    self._latest = None
                self._cond.notify_all()

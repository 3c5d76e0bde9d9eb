"""The rig ingest: a ZeroMQ ROUTER that stores presentation records and acknowledges each one.

Rig daemons connect with a DEALER socket (CurveZMQ client) and send ``PresentationRecord``
messages (``rig.protocol``). For every record the ingest answers with an ``Ack`` carrying one
status per presentation id:

- ``stored``: committed now;
- ``duplicate``: a presentation with that id is already in the database (a re-send);
- ``rejected:<reason>``: the record can never be stored (unknown session, wrong vector length,
  a malformed frame whose id could still be read, ...).

A record is acknowledged only after the transaction that stores it has committed, so a server
killed at any moment loses nothing: the daemon still has the record in its spool and re-sends it,
and the id makes the re-send a ``duplicate``. Frames that cannot be decoded are counted under
their reason and dropped; they never stop the loop. When the database itself fails (connection
lost), nothing is acknowledged and the daemons re-send later.

Security: with a server key pair configured (``curve_secret_key`` / ``curve_public_key``) the
socket is a CurveZMQ server, and a ZAP handler admits only public keys registered on rigs
(``rig.curve_public_key``); unknown keys are reloaded from the database on demand, so a rig
registered through the API works without restarting the server. Without a key pair the ingest
refuses to start unless ``ingest_insecure`` is true (plain TCP: for a loopback development set-up
only).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgpack
import zmq
from sqlalchemy import func, insert, select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from rig import protocol
from server.config import Settings
from server.db.models import (
    Array,
    Block,
    Presentation,
    RecordingSession,
    Rig,
    SessionState,
    Site,
    Stimulus,
    StimulusSetMember,
)

log = logging.getLogger("popcontrol.ingest")

ACK_CHUNK = 500  # ids per Ack; 500 UUIDs with the longest statuses stay far below 64 KiB
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


class IngestConfigError(RuntimeError):
    """The ingest cannot start with these settings; the message says what to set."""


@dataclass(frozen=True)
class IngestRecord:
    """One decoded presentation record, the fields the ``presentation`` table stores."""

    presentation_id: str
    session_id: int
    block_id: int
    stimulus_id: str
    trial_index: int
    position: int
    onset_sample: int | None
    onset_source: str
    fixation_ok: bool
    dropped_frames: int
    valid: bool
    invalid_reason: str | None
    window_start_ms: float
    window_end_ms: float
    n_sites: int
    spike_counts: bytes  # uint16 LE, n_sites values, in the session's site order
    raster: bytes | None = None
    raster_meta: dict[str, Any] | None = None


def check_fields(rec: IngestRecord) -> str | None:
    """Reason code if a field cannot be stored as is (database column limits), else None."""
    if len(rec.presentation_id) != 36:
        return "bad_presentation_id"
    if len(rec.stimulus_id) > 64:
        return "unknown_stimulus"
    if not (0 <= rec.session_id <= INT32_MAX and 0 <= rec.block_id <= INT32_MAX):
        return "bad_field"
    if not (0 <= rec.trial_index <= INT32_MAX and 0 <= rec.position <= INT32_MAX):
        return "bad_field"
    if not 0 <= rec.dropped_frames <= INT32_MAX:
        return "bad_field"
    if rec.onset_sample is not None and not -INT64_MAX <= rec.onset_sample <= INT64_MAX:
        return "bad_field"
    if len(rec.onset_source) > 20:
        return "bad_field"
    if rec.invalid_reason is not None and len(rec.invalid_reason) > 50:
        return "bad_field"
    if not (math.isfinite(rec.window_start_ms) and math.isfinite(rec.window_end_ms)):
        return "nan_field"
    if len(rec.spike_counts) != 2 * rec.n_sites:
        return "wrong_site_count"
    return None


@dataclass
class _Cache:
    """Short-lived lookups that make validation a handful of queries per batch."""

    ttl_s: float
    n_sites: dict[int, tuple[float, int]] = field(default_factory=dict)  # subject -> (t, n)

    def sites_for_subjects(self, db: Session, subject_ids: set[int]) -> dict[int, int]:
        now = time.monotonic()
        fresh = {
            s: v[1] for s, v in self.n_sites.items() if s in subject_ids and now - v[0] < self.ttl_s
        }
        missing = subject_ids - fresh.keys()
        if missing:
            rows = db.execute(
                select(Array.subject_id, func.count(Site.id))
                .join(Site, Site.array_id == Array.id)
                .where(Array.subject_id.in_(missing))
                .group_by(Array.subject_id)
            ).all()
            counted = {int(s): int(n) for s, n in rows}
            for s in missing:
                fresh[s] = counted.get(s, 0)
                self.n_sites[s] = (now, fresh[s])
        return fresh


class RecordStore:
    """Validates and commits batches of records; idempotent by presentation id.

    ``commit(batch)`` returns one status per record, in order. It raises only when the database
    is unreachable (``OperationalError``): then nothing of the batch was stored and nothing may
    be acknowledged.
    """

    def __init__(self, factory: sessionmaker[Session], *, cache_ttl_s: float = 5.0) -> None:
        self._factory = factory
        self._cache = _Cache(ttl_s=cache_ttl_s)

    def commit(self, batch: Sequence[tuple[IngestRecord, int | None]]) -> list[str]:
        """Store ``(record, rig_id)`` pairs; ``rig_id`` is the authenticated sender, or None."""
        statuses: list[str | None] = [None] * len(batch)
        with self._factory() as db:
            self._validate(db, batch, statuses)
            todo = [i for i, s in enumerate(statuses) if s is None]
            rows = [_row(batch[i][0], batch[i][1]) for i in todo]
            if rows:
                try:
                    db.execute(insert(Presentation), rows)
                    db.commit()
                    for i in todo:
                        statuses[i] = "stored"
                except OperationalError:
                    db.rollback()
                    raise
                except DBAPIError:
                    # A concurrent writer stored one of them, or one row breaks a column limit
                    # the checks missed: settle each record on its own.
                    db.rollback()
                    for i in todo:
                        statuses[i] = self._commit_one(db, batch[i][0], batch[i][1])
        return [s or "rejected:internal" for s in statuses]

    def _commit_one(self, db: Session, rec: IngestRecord, rig_id: int | None) -> str:
        try:
            db.execute(insert(Presentation), [_row(rec, rig_id)])
            db.commit()
            return "stored"
        except OperationalError:
            db.rollback()
            raise
        except IntegrityError:
            db.rollback()
            if db.get(Presentation, rec.presentation_id) is not None:
                return "duplicate"
            log.warning("presentation %s violates a constraint", rec.presentation_id)
            return "rejected:constraint"
        except DBAPIError as exc:
            db.rollback()
            log.warning("presentation %s cannot be stored: %s", rec.presentation_id, exc.orig)
            return "rejected:bad_field"

    def _validate(
        self,
        db: Session,
        batch: Sequence[tuple[IngestRecord, int | None]],
        statuses: list[str | None],
    ) -> None:
        for i, (rec, _) in enumerate(batch):
            reason = check_fields(rec)
            if reason is not None:
                statuses[i] = f"rejected:{reason}"
        live = [i for i, s in enumerate(statuses) if s is None]
        if not live:
            return
        ids = {batch[i][0].presentation_id for i in live}
        existing = set(db.scalars(select(Presentation.id).where(Presentation.id.in_(ids))))
        session_ids = {batch[i][0].session_id for i in live}
        sessions = {
            s.id: (s.state, s.rig_id, s.subject_id)
            for s in db.execute(
                select(
                    RecordingSession.id,
                    RecordingSession.state,
                    RecordingSession.rig_id,
                    RecordingSession.subject_id,
                ).where(RecordingSession.id.in_(session_ids))
            )
        }
        block_ids = {batch[i][0].block_id for i in live}
        blocks = {
            b.id: (b.session_id, b.stimulus_set_id)
            for b in db.execute(
                select(Block.id, Block.session_id, Block.stimulus_set_id).where(
                    Block.id.in_(block_ids)
                )
            )
        }
        stimulus_ids = {batch[i][0].stimulus_id for i in live}
        known_stimuli = set(db.scalars(select(Stimulus.id).where(Stimulus.id.in_(stimulus_ids))))
        set_ids = {v[1] for v in blocks.values()}
        members = {
            (int(set_id), str(sid))
            for set_id, sid in db.execute(
                select(StimulusSetMember.stimulus_set_id, StimulusSetMember.stimulus_id).where(
                    StimulusSetMember.stimulus_set_id.in_(set_ids),
                    StimulusSetMember.stimulus_id.in_(stimulus_ids),
                )
            )
        }
        n_sites = self._cache.sites_for_subjects(db, {v[2] for v in sessions.values()})
        seen: set[str] = set()
        for i in live:
            rec, rig_id = batch[i]
            statuses[i] = _verdict(
                rec, rig_id, existing, seen, sessions, blocks, known_stimuli, members, n_sites
            )
            seen.add(rec.presentation_id)
        db.rollback()


def _verdict(
    rec: IngestRecord,
    rig_id: int | None,
    existing: set[str],
    seen: set[str],
    sessions: dict[int, tuple[str, int, int]],
    blocks: dict[int, tuple[int, int]],
    known_stimuli: set[str],
    members: set[tuple[int, str]],
    n_sites: dict[int, int],
) -> str | None:
    """None if the record may be inserted, else its final status."""
    if rec.presentation_id in existing or rec.presentation_id in seen:
        return "duplicate"
    session = sessions.get(rec.session_id)
    if session is None:
        return "rejected:unknown_session"
    state, session_rig, subject_id = session
    if rig_id is not None and session_rig != rig_id:
        return "rejected:wrong_rig"
    if state != SessionState.running.value:
        return "rejected:session_not_running"
    block = blocks.get(rec.block_id)
    if block is None:
        return "rejected:unknown_block"
    if block[0] != rec.session_id:
        return "rejected:block_not_in_session"
    if rec.stimulus_id not in known_stimuli:
        return "rejected:unknown_stimulus"
    if (block[1], rec.stimulus_id) not in members:
        return "rejected:stimulus_not_in_block"
    if rec.n_sites != n_sites.get(subject_id, 0):
        return "rejected:wrong_site_count"
    return None


def _row(rec: IngestRecord, rig_id: int | None) -> dict[str, Any]:
    return {
        "id": rec.presentation_id,
        "session_id": rec.session_id,
        "block_id": rec.block_id,
        "stimulus_id": rec.stimulus_id,
        "rig_id": rig_id,
        "trial_index": rec.trial_index,
        "position": rec.position,
        "onset_sample": rec.onset_sample,
        "onset_source": rec.onset_source,
        "fixation_ok": rec.fixation_ok,
        "dropped_frames": rec.dropped_frames,
        "valid": rec.valid,
        "invalid_reason": rec.invalid_reason,
        "window_start_ms": rec.window_start_ms,
        "window_end_ms": rec.window_end_ms,
        "spike_counts": rec.spike_counts,
        "raster": rec.raster,
        "raster_meta": rec.raster_meta,
        "received_at": datetime.now(UTC).replace(tzinfo=None),
    }


class RigKeys:
    """The ZAP credentials provider: admits CURVE public keys registered on rigs.

    Keys are cached; an unknown key triggers a reload (one small query; a CURVE handshake costs
    the server more than that, so it is not rate-limited by default), and the cache is refreshed
    anyway after ``max_age_s`` so a removed key stops working for new connections.
    """

    def __init__(
        self, factory: sessionmaker[Session], *, min_reload_s: float = 0.0, max_age_s: float = 10.0
    ) -> None:
        self._factory = factory
        self._min_reload_s = min_reload_s
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._keys: dict[str, int] = {}
        self._loaded_at = -math.inf
        self.denied = 0

    def reload(self) -> None:
        with self._factory() as db:
            rows = db.execute(
                select(Rig.curve_public_key, Rig.id).where(Rig.curve_public_key.is_not(None))
            ).all()
        with self._lock:
            self._keys = {str(k): int(i) for k, i in rows}
            self._loaded_at = time.monotonic()

    def rig_id(self, z85_key: str) -> int | None:
        with self._lock:
            return self._keys.get(z85_key)

    def callback(self, domain: str, key: bytes | str) -> bool:
        z85 = key.decode("ascii") if isinstance(key, bytes) else key
        age = time.monotonic() - self._loaded_at
        known = self.rig_id(z85) is not None
        if age > self._max_age_s or (not known and age >= self._min_reload_s):
            try:
                self.reload()
            except Exception:
                log.exception("cannot reload rig keys from the database")
            known = self.rig_id(z85) is not None
        if not known:
            self.denied += 1
            log.warning("ingest: refused a connection with unregistered CURVE key %s", z85)
        return known


class IngestServer:
    """Runs the ingest loop in a background thread: ``start()``, ``status()``, ``stop()``."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        *,
        insecure: bool | None = None,
        max_batch: int = 1000,
    ) -> None:
        self.settings = settings
        self.bind = settings.ingest_bind
        self.insecure = (
            bool(getattr(settings, "ingest_insecure", False)) if insecure is None else insecure
        )
        self.max_batch = max_batch
        self._factory = factory
        self._store = RecordStore(factory)
        self._keys = RigKeys(factory)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._last_commit: float | None = None
        self.secure = bool(settings.curve_secret_key and settings.curve_public_key)
        self.endpoint: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def check_config(self) -> None:
        if self.secure:
            for name in ("curve_secret_key", "curve_public_key"):
                value = getattr(self.settings, name)
                if len(value) != 40:
                    raise IngestConfigError(
                        f"{name} must be a 40-character Z85 CURVE key, got {len(value)} "
                        "characters; make a pair with `popcontrol rig-keygen --server`"
                    )
            return
        if self.settings.curve_secret_key or self.settings.curve_public_key:
            raise IngestConfigError(
                "only one of POPCONTROL_CURVE_SECRET_KEY / POPCONTROL_CURVE_PUBLIC_KEY is set; "
                "set both (make a pair with `popcontrol rig-keygen --server`)"
            )
        if not self.insecure:
            raise IngestConfigError(
                "the rig ingest needs the server's CURVE key pair: run `popcontrol rig-keygen "
                "--server`, set POPCONTROL_CURVE_PUBLIC_KEY and POPCONTROL_CURVE_SECRET_KEY, "
                "and register each rig's public key (PATCH /api/v1/rigs/{name}); or run "
                "`popcontrol serve --no-ingest`; or, for a loopback-only development set-up, "
                "set POPCONTROL_INGEST_INSECURE=true"
            )

    def start(self, timeout_s: float = 10.0) -> None:
        """Bind and start the loop; raises IngestConfigError / zmq errors if it cannot."""
        self.check_config()
        if not self.secure:
            log.warning("ingest: running WITHOUT CurveZMQ on %s (ingest_insecure)", self.bind)
        self._stop.clear()
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="popcontrol-ingest", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"the ingest did not start within {timeout_s} s")
        if self._error is not None:
            raise RuntimeError(f"the ingest could not start on {self.bind}: {self._error}")

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "running": self._thread is not None and self._thread.is_alive(),
                "bind": self.bind,
                "endpoint": self.endpoint,
                "curve": self.secure,
                "received": self._counts["received"],
                "stored": self._counts["stored"],
                "duplicate": self._counts["duplicate"],
                "rejected": dict(self._rejected),
                "auth_denied": self._keys.denied,
                "db_errors": self._counts["db_errors"],
                "last_commit_at": (
                    None
                    if self._last_commit is None
                    else datetime.fromtimestamp(self._last_commit, UTC).isoformat()
                ),
                "error": self._error,
            }

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        ctx = zmq.Context()
        auth: Any = None
        sock: zmq.Socket[bytes] | None = None
        try:
            sock = ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.MAXMSGSIZE, 64 * 1024 * 1024)
            if self.secure:
                from zmq.auth.thread import ThreadAuthenticator

                self._keys.reload()
                auth = ThreadAuthenticator(ctx, log=logging.getLogger("popcontrol.ingest.zap"))
                auth.start()
                auth.configure_curve_callback("*", credentials_provider=self._keys)
                sock.curve_server = True
                sock.curve_secretkey = str(self.settings.curve_secret_key).encode("ascii")
                sock.curve_publickey = str(self.settings.curve_public_key).encode("ascii")
            sock.bind(self.bind)
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except Exception as exc:
            self._error = f"{type(exc).__name__}: {exc}"
            self._ready.set()
            if sock is not None:
                sock.close(0)
            if auth is not None:
                auth.stop()
            ctx.term()
            return
        self._ready.set()
        log.info("ingest listening on %s (curve=%s)", self.endpoint, self.secure)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        seq: Counter[bytes] = Counter()
        try:
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                messages = self._drain(sock)
                try:
                    replies = self._handle(messages)
                except OperationalError as exc:
                    with self._lock:
                        self._counts["db_errors"] += 1
                    log.error("ingest: database unavailable, nothing acknowledged: %s", exc.orig)
                    self._stop.wait(0.5)
                    continue
                except Exception:
                    with self._lock:
                        self._counts["db_errors"] += 1
                    log.exception("ingest: unexpected error; batch not acknowledged")
                    continue
                for identity, ids, statuses in replies:
                    for frames in encode_ack(ids, statuses, seq[identity]):
                        seq[identity] += 1
                        try:
                            sock.send_multipart([identity, *frames], flags=zmq.NOBLOCK)
                        except zmq.Again:
                            log.warning("ingest: ack to a slow daemon dropped (it re-sends)")
        finally:
            sock.close(0)
            if auth is not None:
                auth.stop()
            ctx.term()
            log.info("ingest stopped")

    def _drain(self, sock: zmq.Socket[bytes]) -> list[tuple[bytes, list[bytes], int | None]]:
        """Everything waiting, up to max_batch: (identity, frames, authenticated rig id)."""
        out: list[tuple[bytes, list[bytes], int | None]] = []
        while len(out) < self.max_batch:
            try:
                parts = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            rig_id = None
            if self.secure:
                user = parts[-1].get("User-Id")
                rig_id = self._keys.rig_id(str(user)) if user else None
                if rig_id is None:  # authenticated a moment ago but no longer registered
                    with self._lock:
                        self._rejected["unregistered_key"] += 1
                    continue
            out.append((parts[0].bytes, [p.bytes for p in parts[1:]], rig_id))
        return out

    def _handle(
        self, messages: Iterable[tuple[bytes, list[bytes], int | None]]
    ) -> list[tuple[bytes, list[str], list[str]]]:
        batch: list[tuple[IngestRecord, int | None]] = []
        owners: list[bytes] = []
        early: dict[bytes, list[tuple[str, str]]] = {}
        received = 0
        rejected: Counter[str] = Counter()
        for identity, frames, rig_id in messages:
            received += 1
            try:
                rec = record_from_frames(frames)
            except FrameRejected as exc:
                rejected[exc.reason] += 1
                if exc.presentation_id is not None:
                    early.setdefault(identity, []).append(
                        (exc.presentation_id, f"rejected:{exc.reason}")
                    )
                continue
            batch.append((rec, rig_id))
            owners.append(identity)
        statuses = self._store.commit(batch) if batch else []
        per_peer: dict[bytes, tuple[list[str], list[str]]] = {}
        for identity, items in early.items():
            ids, sts = per_peer.setdefault(identity, ([], []))
            for pid, st in items:
                ids.append(pid)
                sts.append(st)
        counts: Counter[str] = Counter()
        for (rec, _), identity, status in zip(batch, owners, statuses, strict=True):
            ids, sts = per_peer.setdefault(identity, ([], []))
            ids.append(rec.presentation_id)
            sts.append(status)
            if status.startswith("rejected:"):
                rejected[status.removeprefix("rejected:")] += 1
            else:
                counts[status] += 1
        with self._lock:
            self._counts["received"] += received
            self._counts.update(counts)
            self._rejected.update(rejected)
            if counts["stored"]:
                self._last_commit = time.time()
        if rejected:
            log.info("ingest: rejected %s", dict(rejected))
        return [(identity, ids, sts) for identity, (ids, sts) in per_peer.items()]


class FrameRejected(Exception):
    """A frame that cannot become a record; ``presentation_id`` if it could still be read."""

    def __init__(self, reason: str, presentation_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.presentation_id = presentation_id


def _readable_id(frames: list[bytes]) -> str | None:
    """The presentation id of a frame that failed to decode, if its header still shows one."""
    if len(frames) < 2 or len(frames[1]) > protocol.MAX_HEADER_BYTES:
        return None
    try:
        header = msgpack.unpackb(frames[1], raw=False, strict_map_key=True)
        pid = header.get("presentation_id") if isinstance(header, dict) else None
        return pid if isinstance(pid, str) and str(uuid.UUID(pid)) == pid else None
    except Exception:
        return None


def record_from_frames(frames: list[bytes]) -> IngestRecord:
    """Strictly decode one ``pres`` message; raises FrameRejected with the reason code."""
    try:
        msg = protocol.decode(frames)
    except protocol.DecodeError as exc:
        raise FrameRejected(exc.reason, _readable_id(frames)) from None
    if not isinstance(msg, protocol.PresentationRecord):
        raise FrameRejected("unexpected_message")
    return IngestRecord(
        presentation_id=msg.presentation_id,
        session_id=msg.session_id,
        block_id=msg.block_id,
        stimulus_id=msg.stimulus_id,
        trial_index=msg.trial_index,
        position=msg.position,
        onset_sample=msg.onset_sample,
        onset_source=msg.onset_source,
        fixation_ok=msg.fixation_ok,
        dropped_frames=msg.dropped_frames,
        valid=msg.valid,
        invalid_reason=msg.invalid_reason,
        window_start_ms=msg.window_start_ms,
        window_end_ms=msg.window_end_ms,
        n_sites=msg.n_sites,
        spike_counts=msg.spike_counts.astype("<u2", copy=False).tobytes(),
        raster=None if msg.raster is None else msg.raster.tobytes(),
        raster_meta=msg.raster_meta(),
    )


def encode_ack(ids: list[str], statuses: list[str], seq: int) -> list[list[bytes]]:
    """One or more Ack messages, at most ``ACK_CHUNK`` ids each (the header stays < 64 KiB)."""
    out = []
    step = ACK_CHUNK
    for start in range(0, len(ids), step):
        out.append(
            protocol.Ack(
                rig="server",
                stream="ingest",
                seq=seq + start // step,
                ids=ids[start : start + step],
                statuses=statuses[start : start + step],
            ).encode()
        )
    return out


def ingest_command(bind: str | None = None) -> None:
    """``popcontrol ingest``: run only the ingest until interrupted, logging its counters."""
    import signal

    from server.config import get_settings
    from server.db.session import check_schema, engine_for, make_sessionmaker

    settings = get_settings()
    if bind:
        settings = settings.model_copy(update={"ingest_bind": bind})
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    engine = engine_for(settings)
    check_schema(engine)
    server = IngestServer(settings, make_sessionmaker(engine))
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"ingest listening on {server.endpoint} (curve={server.secure})", flush=True)
    try:
        while not stop.wait(10.0):
            st = server.status()
            if not st["running"]:
                raise RuntimeError(f"the ingest loop stopped: {st['error']}")
            log.info(
                "ingest: received=%d stored=%d duplicate=%d rejected=%s auth_denied=%d",
                st["received"],
                st["stored"],
                st["duplicate"],
                st["rejected"],
                st["auth_denied"],
            )
    finally:
        server.stop()
        engine.dispose()

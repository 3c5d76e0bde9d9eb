"""The native wire format between acquisition, presenter, rig daemon and server.

Every message is a ZeroMQ multipart ``[topic, header, payload?]``:

- ``topic``: a short ASCII name (``spk``, ``evt``, ``flip``, ``fixb``, ``hb``, ``pres``, ``ack``);
- ``header``: a msgpack map with ``v`` (``PROTOCOL_VERSION``), ``rig``, ``stream``, ``seq``
  (uint64, counted per rig + stream: a jump means loss) and the message's own fields;
- ``payload``: little-endian numpy record arrays (spikes, digital events) or packed vectors
  (presentation records); absent for messages without one.

One frozen dataclass per message; ``msg.encode() -> list[bytes]`` and ``decode(frames)``.
Decoding is strict: any deviation (unknown topic, other version, missing/unknown/mistyped field,
NaN, a payload of the wrong size, unsorted samples, oversize frames) raises ``DecodeError`` whose
``reason`` is a short code from ``REASONS`` that receivers count by. Constructing a message with
invalid values raises ``MessageError`` with the same codes, so nothing invalid is ever encoded.

Sample ranges are half-open: a ``Spikes`` / ``DigitalEvents`` chunk covers samples
``[first_sample, last_sample)`` of the acquisition clock; the next chunk of a gap-free stream
starts at this chunk's ``last_sample``.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeAlias

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
MAX_ACK_IDS = 10_000
MAX_STR_CHARS = 256

# (n_spikes,) records: acquisition sample, channel (0-based), sorted unit (0 = unsorted), flags.
SPIKE_DTYPE = np.dtype([("sample", "<i8"), ("chan", "<u2"), ("unit", "u1"), ("flags", "u1")])
# (n_events,) records: acquisition sample, digital line, new state (0/1), 16-bit word.
EVENT_DTYPE = np.dtype([("sample", "<i8"), ("line", "u1"), ("state", "u1"), ("word", "<u2")])

OnsetSource = Literal["photodiode", "event_word", "host_clock"]
ONSET_SOURCES: tuple[str, ...] = ("photodiode", "event_word", "host_clock")
RASTER_DTYPES: dict[str, np.dtype[Any]] = {"u1": np.dtype("u1"), "<u2": np.dtype("<u2")}

REASONS: tuple[str, ...] = (
    "bad_frames",  # not 2 or 3 frames, or a frame is not bytes
    "bad_topic",  # unknown topic
    "header_too_large",  # header frame over MAX_HEADER_BYTES
    "payload_too_large",  # payload frame over MAX_PAYLOAD_BYTES
    "bad_header",  # header is not one msgpack map with string keys
    "bad_version",  # ``v`` is not PROTOCOL_VERSION
    "missing_field",  # a required header field is absent
    "unknown_field",  # a header field this message does not have
    "bad_field",  # a field of the wrong type or out of range
    "nan_field",  # a float field that is NaN or infinite
    "bad_payload",  # payload of the wrong size / content, or missing / unexpected
)

_UINT64_MAX = 2**64 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class MessageError(ValueError):
    """A message that breaks the protocol; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, f"unknown reason code {reason!r}"
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class DecodeError(MessageError):
    """Frames that do not decode to a valid message; ``reason`` is one of ``REASONS``."""


# ---------------------------------------------------------------------------------------------
# field checks (used by the message constructors, hence by decode too)


def _int(name: str, value: object, lo: int = _INT64_MIN, hi: int = _INT64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise MessageError("bad_field", f"{name} must be an integer, got {type(value).__name__}")
    if not lo <= int(value) <= hi:
        raise MessageError("bad_field", f"{name}={value} is outside [{lo}, {hi}]")
    return int(value)


def _opt_int(name: str, value: object, lo: int = _INT64_MIN, hi: int = _INT64_MAX) -> int | None:
    return None if value is None else _int(name, value, lo, hi)


def _float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise MessageError("bad_field", f"{name} must be a number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out):
        raise MessageError("nan_field", f"{name} must be finite, got {out}")
    return out


def _opt_float(name: str, value: object) -> float | None:
    return None if value is None else _float(name, value)


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise MessageError("bad_field", f"{name} must be true or false, got {type(value).__name__}")
    return bool(value)


def _str(name: str, value: object, max_chars: int = MAX_STR_CHARS) -> str:
    if not isinstance(value, str):
        raise MessageError("bad_field", f"{name} must be a string, got {type(value).__name__}")
    if not value or len(value) > max_chars:
        raise MessageError("bad_field", f"{name} must have 1..{max_chars} characters")
    return value


def _uuid(name: str, value: object) -> str:
    text = _str(name, value, 36)
    try:
        canonical = str(uuid.UUID(text))
    except ValueError:
        raise MessageError("bad_field", f"{name}={text!r} is not a UUID") from None
    if canonical != text:
        raise MessageError(
            "bad_field", f"{name} must be a lower-case hyphenated UUID, got {text!r}"
        )
    return text


def _sha256(name: str, value: object) -> str:
    text = _str(name, value, 64)
    if not _SHA256_RE.fullmatch(text):
        raise MessageError("bad_field", f"{name} must be 64 lower-case hex digits (sha256)")
    return text


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


def _records(name: str, value: object, dtype: np.dtype[Any], first: int, last: int) -> np.ndarray:
    """A 1-D record array of ``dtype``, samples sorted and inside [first, last)."""
    if not isinstance(value, np.ndarray) or value.ndim != 1:
        raise MessageError("bad_payload", f"{name} must be a 1-D numpy record array")
    if value.dtype != dtype:
        try:
            value = value.astype(dtype)
        except (TypeError, ValueError):
            raise MessageError("bad_payload", f"{name} must have dtype {dtype.descr}") from None
    samples = value["sample"]
    if samples.size:
        if samples[0] < first or samples[-1] >= last:
            raise MessageError(
                "bad_payload",
                f"{name} samples must lie in [first_sample={first}, last_sample={last})",
            )
        if samples.size > 1 and bool(np.any(samples[1:] < samples[:-1])):
            raise MessageError("bad_payload", f"{name} must be sorted by sample")
    return value


# ---------------------------------------------------------------------------------------------
# messages


@dataclass(frozen=True, kw_only=True)
class _Base:
    """Fields every header carries."""

    TOPIC: ClassVar[bytes] = b""
    HAS_PAYLOAD: ClassVar[bool] = False

    rig: str
    stream: str
    seq: int

    def __post_init__(self) -> None:
        _set(self, "rig", _str("rig", self.rig, 128))
        _set(self, "stream", _str("stream", self.stream, 128))
        _set(self, "seq", _int("seq", self.seq, 0, _UINT64_MAX))

    def _fields(self) -> dict[str, Any]:
        """The message's own header fields (without v/rig/stream/seq)."""
        return {}

    def _payload(self) -> bytes:
        return b""

    def encode(self) -> list[bytes]:
        """``[topic, header, payload?]`` ready for ``send_multipart``."""
        header = {"v": PROTOCOL_VERSION, "rig": self.rig, "stream": self.stream, "seq": self.seq}
        header.update(self._fields())
        packed = msgpack.packb(header, use_bin_type=True)
        if len(packed) > MAX_HEADER_BYTES:
            raise MessageError(
                "header_too_large", f"header is {len(packed)} bytes > {MAX_HEADER_BYTES}"
            )
        frames = [self.TOPIC, packed]
        if self.HAS_PAYLOAD:
            payload = self._payload()
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise MessageError(
                    "payload_too_large",
                    f"payload is {len(payload)} bytes > {MAX_PAYLOAD_BYTES}: send smaller chunks",
                )
            frames.append(payload)
        return frames


@dataclass(frozen=True, kw_only=True, eq=False)
class Spikes(_Base):
    """Spike events of one chunk of the acquisition stream, samples in [first_sample, last_sample)."""

    TOPIC: ClassVar[bytes] = b"spk"
    HAS_PAYLOAD: ClassVar[bool] = True

    first_sample: int
    last_sample: int
    spikes: np.ndarray = field(default_factory=lambda: np.zeros(0, SPIKE_DTYPE))  # (n,) SPIKE_DTYPE

    def __post_init__(self) -> None:
        super().__post_init__()
        _sample_range(self)
        _set(
            self,
            "spikes",
            _records("spikes", self.spikes, SPIKE_DTYPE, self.first_sample, self.last_sample),
        )

    def _fields(self) -> dict[str, Any]:
        return {"first_sample": self.first_sample, "last_sample": self.last_sample}

    def _payload(self) -> bytes:
        return self.spikes.tobytes()


@dataclass(frozen=True, kw_only=True, eq=False)
class DigitalEvents(_Base):
    """Digital line changes (event words, photodiode) of one chunk, samples in [first, last)."""

    TOPIC: ClassVar[bytes] = b"evt"
    HAS_PAYLOAD: ClassVar[bool] = True

    first_sample: int
    last_sample: int
    events: np.ndarray = field(default_factory=lambda: np.zeros(0, EVENT_DTYPE))  # (n,) EVENT_DTYPE

    def __post_init__(self) -> None:
        super().__post_init__()
        _sample_range(self)
        _set(
            self,
            "events",
            _records("events", self.events, EVENT_DTYPE, self.first_sample, self.last_sample),
        )
        if self.events.size and int(self.events["state"].max()) > 1:
            raise MessageError("bad_payload", "event state must be 0 or 1")

    def _fields(self) -> dict[str, Any]:
        return {"first_sample": self.first_sample, "last_sample": self.last_sample}

    def _payload(self) -> bytes:
        return self.events.tobytes()


def _sample_range(msg: Spikes | DigitalEvents) -> None:
    first = _int("first_sample", msg.first_sample, 0)
    last = _int("last_sample", msg.last_sample, 0)
    if last < first:
        raise MessageError("bad_field", f"last_sample={last} < first_sample={first}")
    _set(msg, "first_sample", first)
    _set(msg, "last_sample", last)


@dataclass(frozen=True, kw_only=True)
class Flip(_Base):
    """Presenter -> daemon: one image drawn on screen (sent from the flip callback)."""

    TOPIC: ClassVar[bytes] = b"flip"

    presentation_id: str  # UUID made by the presenter; the record's primary key
    session_id: int
    block_id: int
    stimulus_id: str  # sha256 hex
    trial: int
    position: int  # position in the trial, 0-based
    event_word: int  # 0..65535, written to the digital output at the flip
    host_flip_time_s: float  # presenter's clock
    dropped_frames: int
    fixation_ok: bool

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "presentation_id", _uuid("presentation_id", self.presentation_id))
        _set(self, "session_id", _int("session_id", self.session_id, 0))
        _set(self, "block_id", _int("block_id", self.block_id, 0))
        _set(self, "stimulus_id", _sha256("stimulus_id", self.stimulus_id))
        _set(self, "trial", _int("trial", self.trial, 0))
        _set(self, "position", _int("position", self.position, 0))
        _set(self, "event_word", _int("event_word", self.event_word, 0, 0xFFFF))
        _set(self, "host_flip_time_s", _float("host_flip_time_s", self.host_flip_time_s))
        _set(self, "dropped_frames", _int("dropped_frames", self.dropped_frames, 0))
        _set(self, "fixation_ok", _bool("fixation_ok", self.fixation_ok))

    def _fields(self) -> dict[str, Any]:
        return {
            "presentation_id": self.presentation_id,
            "session_id": self.session_id,
            "block_id": self.block_id,
            "stimulus_id": self.stimulus_id,
            "trial": self.trial,
            "position": self.position,
            "event_word": self.event_word,
            "host_flip_time_s": self.host_flip_time_s,
            "dropped_frames": self.dropped_frames,
            "fixation_ok": self.fixation_ok,
        }


@dataclass(frozen=True, kw_only=True)
class FixationBreak(_Base):
    """Presenter -> daemon: fixation broke in this trial; images flipped in it are invalid."""

    TOPIC: ClassVar[bytes] = b"fixb"

    session_id: int
    block_id: int
    trial: int
    host_time_s: float  # presenter's clock, when the eye left the window

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "session_id", _int("session_id", self.session_id, 0))
        _set(self, "block_id", _int("block_id", self.block_id, 0))
        _set(self, "trial", _int("trial", self.trial, 0))
        _set(self, "host_time_s", _float("host_time_s", self.host_time_s))

    def _fields(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "block_id": self.block_id,
            "trial": self.trial,
            "host_time_s": self.host_time_s,
        }


@dataclass(frozen=True, kw_only=True)
class Heartbeat(_Base):
    """Liveness, in any direction; ``spool_depth`` from the daemon."""

    TOPIC: ClassVar[bytes] = b"hb"

    host_time_s: float
    spool_depth: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "host_time_s", _float("host_time_s", self.host_time_s))
        _set(self, "spool_depth", _opt_int("spool_depth", self.spool_depth, 0))

    def _fields(self) -> dict[str, Any]:
        return {"host_time_s": self.host_time_s, "spool_depth": self.spool_depth}


@dataclass(frozen=True, kw_only=True, eq=False)
class PresentationRecord(_Base):
    """Daemon -> server: one image shown once, with its spike counts (and optional raster).

    Payload: ``spike_counts`` as uint16 LE (n_sites,), then, when ``raster`` is set, the raster
    (n_sites, raster_bins) in ``raster_dtype`` ("u1" or "<u2"), C order. Sites are in the
    session's site order.
    """

    TOPIC: ClassVar[bytes] = b"pres"
    HAS_PAYLOAD: ClassVar[bool] = True

    presentation_id: str
    session_id: int
    block_id: int
    stimulus_id: str
    trial_index: int
    position: int
    onset_sample: int | None  # acquisition sample of the onset; None for host-clock onsets
    onset_source: str  # one of ONSET_SOURCES
    fixation_ok: bool
    dropped_frames: int
    valid: bool
    invalid_reason: str | None  # None iff valid
    window_start_ms: float
    window_end_ms: float
    spike_counts: np.ndarray  # (n_sites,) uint16
    raster: np.ndarray | None = None  # (n_sites, raster_bins) uint8 or uint16
    raster_bin_ms: float | None = None
    raster_start_ms: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "presentation_id", _uuid("presentation_id", self.presentation_id))
        _set(self, "session_id", _int("session_id", self.session_id, 0))
        _set(self, "block_id", _int("block_id", self.block_id, 0))
        _set(self, "stimulus_id", _sha256("stimulus_id", self.stimulus_id))
        _set(self, "trial_index", _int("trial_index", self.trial_index, 0))
        _set(self, "position", _int("position", self.position, 0))
        _set(self, "onset_sample", _opt_int("onset_sample", self.onset_sample))
        if self.onset_source not in ONSET_SOURCES:
            raise MessageError(
                "bad_field",
                f"onset_source must be one of {ONSET_SOURCES}, got {self.onset_source!r}",
            )
        _set(self, "fixation_ok", _bool("fixation_ok", self.fixation_ok))
        _set(self, "dropped_frames", _int("dropped_frames", self.dropped_frames, 0))
        _set(self, "valid", _bool("valid", self.valid))
        if self.valid:
            if self.invalid_reason is not None:
                raise MessageError("bad_field", "a valid record must have invalid_reason = None")
        else:
            _set(self, "invalid_reason", _str("invalid_reason", self.invalid_reason, 200))
        _set(self, "window_start_ms", _float("window_start_ms", self.window_start_ms))
        _set(self, "window_end_ms", _float("window_end_ms", self.window_end_ms))
        if self.window_end_ms <= self.window_start_ms:
            raise MessageError("bad_field", "window_end_ms must be greater than window_start_ms")
        counts = self.spike_counts
        if not isinstance(counts, np.ndarray) or counts.ndim != 1 or counts.size == 0:
            raise MessageError(
                "bad_payload", "spike_counts must be a non-empty 1-D array (n_sites,)"
            )
        if counts.dtype != np.dtype("<u2"):
            if counts.size and (int(counts.min()) < 0 or int(counts.max()) > 0xFFFF):
                raise MessageError("bad_payload", "spike_counts must fit in uint16")
            counts = counts.astype("<u2")
        _set(self, "spike_counts", counts)
        raster = self.raster
        if raster is None:
            if self.raster_bin_ms is not None or self.raster_start_ms is not None:
                raise MessageError("bad_field", "raster_bin_ms / raster_start_ms need a raster")
            return
        if not isinstance(raster, np.ndarray) or raster.ndim != 2 or raster.shape[0] != counts.size:
            raise MessageError("bad_payload", "raster must be a 2-D array (n_sites, raster_bins)")
        if raster.dtype.newbyteorder("<") not in (np.dtype("u1"), np.dtype("<u2")):
            raise MessageError(
                "bad_payload", f"raster dtype must be uint8 or uint16, got {raster.dtype}"
            )
        _set(self, "raster", np.ascontiguousarray(raster.astype(raster.dtype.newbyteorder("<"))))
        bin_ms = _float("raster_bin_ms", self.raster_bin_ms)
        if bin_ms <= 0:
            raise MessageError("bad_field", "raster_bin_ms must be positive")
        _set(self, "raster_bin_ms", bin_ms)
        _set(self, "raster_start_ms", _float("raster_start_ms", self.raster_start_ms))

    @property
    def n_sites(self) -> int:
        return int(self.spike_counts.size)

    @property
    def raster_bins(self) -> int | None:
        return None if self.raster is None else int(self.raster.shape[1])

    @property
    def raster_dtype(self) -> str | None:
        if self.raster is None:
            return None
        return "u1" if self.raster.dtype == np.dtype("u1") else "<u2"

    def _fields(self) -> dict[str, Any]:
        return {
            "presentation_id": self.presentation_id,
            "session_id": self.session_id,
            "block_id": self.block_id,
            "stimulus_id": self.stimulus_id,
            "trial_index": self.trial_index,
            "position": self.position,
            "onset_sample": self.onset_sample,
            "onset_source": self.onset_source,
            "fixation_ok": self.fixation_ok,
            "dropped_frames": self.dropped_frames,
            "valid": self.valid,
            "invalid_reason": self.invalid_reason,
            "window_start_ms": self.window_start_ms,
            "window_end_ms": self.window_end_ms,
            "n_sites": self.n_sites,
            "raster_bins": self.raster_bins,
            "raster_dtype": self.raster_dtype,
            "raster_bin_ms": self.raster_bin_ms,
            "raster_start_ms": self.raster_start_ms,
        }

    def _payload(self) -> bytes:
        counts = self.spike_counts.tobytes()
        return counts if self.raster is None else counts + self.raster.tobytes()

    def raster_meta(self) -> dict[str, Any] | None:
        """What the server stores next to the raster bytes (``presentation.raster_meta``)."""
        if self.raster is None:
            return None
        return {
            "bins": self.raster_bins,
            "bin_ms": self.raster_bin_ms,
            "start_ms": self.raster_start_ms,
            "dtype": self.raster_dtype,
            "n_sites": self.n_sites,
        }


ACK_STORED = "stored"
ACK_DUPLICATE = "duplicate"
ACK_REJECTED_PREFIX = "rejected:"


@dataclass(frozen=True, kw_only=True)
class Ack(_Base):
    """Acknowledges ids (presentation UUIDs; ``ack_key``s for presenter messages), one status each.

    Status: ``"stored"``, ``"duplicate"`` or ``"rejected:<reason>"``.
    """

    TOPIC: ClassVar[bytes] = b"ack"

    ids: Sequence[str]
    statuses: Sequence[str]

    def __post_init__(self) -> None:
        super().__post_init__()
        ids, statuses = self.ids, self.statuses
        if not isinstance(ids, list | tuple) or not isinstance(statuses, list | tuple):
            raise MessageError("bad_field", "ids and statuses must be lists")
        if len(ids) != len(statuses):
            raise MessageError("bad_field", f"{len(ids)} ids but {len(statuses)} statuses")
        if len(ids) > MAX_ACK_IDS:
            raise MessageError("bad_field", f"at most {MAX_ACK_IDS} ids per ack")
        ids = tuple(_str("ids[]", i, 128) for i in ids)
        statuses = tuple(_str("statuses[]", s, 256) for s in statuses)
        for status in statuses:
            if status not in (ACK_STORED, ACK_DUPLICATE) and not (
                status.startswith(ACK_REJECTED_PREFIX) and len(status) > len(ACK_REJECTED_PREFIX)
            ):
                raise MessageError(
                    "bad_field", f"status {status!r} is not stored, duplicate or rejected:<reason>"
                )
        _set(self, "ids", ids)
        _set(self, "statuses", statuses)

    def _fields(self) -> dict[str, Any]:
        return {"ids": list(self.ids), "statuses": list(self.statuses)}


Message: TypeAlias = (
    Spikes | DigitalEvents | Flip | FixationBreak | Heartbeat | PresentationRecord | Ack
)

MESSAGE_TYPES: dict[bytes, type[_Base]] = {
    cls.TOPIC: cls
    for cls in (Spikes, DigitalEvents, Flip, FixationBreak, Heartbeat, PresentationRecord, Ack)
}

_FIELDS: dict[type[_Base], frozenset[str]] = {
    Spikes: frozenset({"first_sample", "last_sample"}),
    DigitalEvents: frozenset({"first_sample", "last_sample"}),
    Flip: frozenset(
        {
            "presentation_id",
            "session_id",
            "block_id",
            "stimulus_id",
            "trial",
            "position",
            "event_word",
            "host_flip_time_s",
            "dropped_frames",
            "fixation_ok",
        }
    ),
    FixationBreak: frozenset({"session_id", "block_id", "trial", "host_time_s"}),
    Heartbeat: frozenset({"host_time_s", "spool_depth"}),
    PresentationRecord: frozenset(
        {
            "presentation_id",
            "session_id",
            "block_id",
            "stimulus_id",
            "trial_index",
            "position",
            "onset_sample",
            "onset_source",
            "fixation_ok",
            "dropped_frames",
            "valid",
            "invalid_reason",
            "window_start_ms",
            "window_end_ms",
            "n_sites",
            "raster_bins",
            "raster_dtype",
            "raster_bin_ms",
            "raster_start_ms",
        }
    ),
    Ack: frozenset({"ids", "statuses"}),
}
_OPTIONAL: dict[type[_Base], frozenset[str]] = {Heartbeat: frozenset({"spool_depth"})}


def ack_key(msg: Flip | FixationBreak | Message) -> str:
    """The id under which a presenter message is acknowledged and de-duplicated.

    A flip: its presentation UUID. A fixation break: ``fixb:<session>:<block>:<trial>`` (one per
    trial, so a re-sent one is recognised). Other messages: ``<topic>:<rig>:<stream>:<seq>``.
    """
    if isinstance(msg, Flip):
        return msg.presentation_id
    if isinstance(msg, FixationBreak):
        return f"fixb:{msg.session_id}:{msg.block_id}:{msg.trial}"
    return f"{msg.TOPIC.decode()}:{msg.rig}:{msg.stream}:{msg.seq}"


# ---------------------------------------------------------------------------------------------
# decoding


def decode(frames: Sequence[bytes]) -> Message:
    """Frames from ``recv_multipart`` -> a message; raises ``DecodeError(reason, ...)``."""
    if not isinstance(frames, list | tuple) or len(frames) not in (2, 3):
        n = len(frames) if isinstance(frames, list | tuple) else "?"
        raise DecodeError("bad_frames", f"expected [topic, header, payload?], got {n} frames")
    if not all(isinstance(f, bytes | bytearray | memoryview) for f in frames):
        raise DecodeError("bad_frames", "every frame must be bytes")
    topic = bytes(frames[0])
    cls = MESSAGE_TYPES.get(topic)
    if cls is None:
        raise DecodeError(
            "bad_topic", f"unknown topic {topic[:16]!r}; known: {sorted(MESSAGE_TYPES)}"
        )
    raw_header = frames[1]
    if len(raw_header) > MAX_HEADER_BYTES:
        raise DecodeError(
            "header_too_large", f"header is {len(raw_header)} bytes > {MAX_HEADER_BYTES}"
        )
    payload = bytes(frames[2]) if len(frames) == 3 else None
    if payload is not None and len(payload) > MAX_PAYLOAD_BYTES:
        raise DecodeError(
            "payload_too_large", f"payload is {len(payload)} bytes > {MAX_PAYLOAD_BYTES}"
        )
    if cls.HAS_PAYLOAD and payload is None:
        raise DecodeError("bad_payload", f"{cls.__name__} needs a payload frame")
    if not cls.HAS_PAYLOAD and payload is not None:
        raise DecodeError("bad_payload", f"{cls.__name__} has no payload, got {len(payload)} bytes")
    try:
        header = msgpack.unpackb(bytes(raw_header), raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many types on garbage
        raise DecodeError("bad_header", f"header is not msgpack: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise DecodeError("bad_header", f"header must be a map, got {type(header).__name__}")
    if "v" not in header:
        raise DecodeError("missing_field", "header has no protocol version 'v'")
    version = header.pop("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise DecodeError(
            "bad_version", f"protocol version {version!r}, this side speaks {PROTOCOL_VERSION}"
        )
    expected = _FIELDS[cls] | {"rig", "stream", "seq"}
    unknown = set(header) - expected
    if unknown:
        raise DecodeError("unknown_field", f"{cls.__name__} has no field(s) {sorted(unknown)[:5]}")
    missing = expected - set(header) - _OPTIONAL.get(cls, frozenset())
    if missing:
        raise DecodeError("missing_field", f"{cls.__name__} header lacks {sorted(missing)}")
    decoder = _DECODERS.get(cls)
    try:
        if decoder is not None:
            assert payload is not None
            return decoder(header, payload)
        return cls(**header)  # type: ignore[return-value]
    except DecodeError:
        raise
    except MessageError as exc:
        raise DecodeError(exc.reason, exc.message) from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise DecodeError("bad_field", str(exc)[:200]) from None


def _records_from(payload: bytes, dtype: np.dtype[Any], what: str) -> np.ndarray:
    if len(payload) % dtype.itemsize:
        raise DecodeError(
            "bad_payload",
            f"{what} payload of {len(payload)} bytes is not a multiple of {dtype.itemsize}",
        )
    return np.frombuffer(payload, dtype=dtype)


def _decode_spikes(header: dict[str, Any], payload: bytes) -> Spikes:
    return Spikes(**header, spikes=_records_from(payload, SPIKE_DTYPE, "spike"))


def _decode_events(header: dict[str, Any], payload: bytes) -> DigitalEvents:
    return DigitalEvents(**header, events=_records_from(payload, EVENT_DTYPE, "event"))


def _decode_record(header: dict[str, Any], payload: bytes) -> PresentationRecord:
    n_sites = _int("n_sites", header.pop("n_sites"), 1, MAX_PAYLOAD_BYTES // 2)
    bins = _opt_int("raster_bins", header.pop("raster_bins"), 1, MAX_PAYLOAD_BYTES)
    dtype_name = header.pop("raster_dtype")
    counts_bytes = 2 * n_sites
    if len(payload) < counts_bytes:
        raise DecodeError(
            "bad_payload",
            f"payload of {len(payload)} bytes is shorter than {n_sites} uint16 counts",
        )
    counts = np.frombuffer(payload, dtype="<u2", count=n_sites)
    raster: np.ndarray | None = None
    if bins is None:
        if dtype_name is not None:
            raise DecodeError("bad_field", "raster_dtype without raster_bins")
        if len(payload) != counts_bytes:
            raise DecodeError(
                "bad_payload",
                f"payload has {len(payload) - counts_bytes} bytes after the counts but no raster",
            )
    else:
        if not isinstance(dtype_name, str) or dtype_name not in RASTER_DTYPES:
            raise DecodeError("bad_field", f"raster_dtype must be one of {sorted(RASTER_DTYPES)}")
        dtype = RASTER_DTYPES[dtype_name]
        if len(payload) - counts_bytes != n_sites * bins * dtype.itemsize:
            raise DecodeError(
                "bad_payload",
                f"raster must be {n_sites}x{bins} {dtype_name}, got {len(payload) - counts_bytes} bytes",
            )
        raster = np.frombuffer(payload, dtype=dtype, offset=counts_bytes).reshape(n_sites, bins)
    return PresentationRecord(**header, spike_counts=counts, raster=raster)


_DECODERS: dict[type[_Base], Callable[[dict[str, Any], bytes], Message]] = {
    Spikes: _decode_spikes,
    DigitalEvents: _decode_events,
    PresentationRecord: _decode_record,
}

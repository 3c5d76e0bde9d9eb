"""Open Ephys GUI source: a client of the ZMQ Interface plugin, exactly as it is on the wire.

The plugin publishes on a PUB socket (default ``tcp://127.0.0.1:5556``) multipart messages
``[envelope, json_header, payload?]``:

- envelope ``b"DATA\\0"``: continuous data of one channel; header ``content`` has ``stream``,
  ``channel_num``, ``channel_name``, ``num_samples``, ``sample_num`` (first sample),
  ``sample_rate``; payload ``num_samples`` float32;
- envelope ``b"EVENT\\0"`` with ``type == "event"``: ``content`` has ``stream``, ``source_node``,
  ``type`` (3 = TTL), ``sample_num``; payload 10 bytes: line u8, state u8, word u64 (the state
  of all TTL lines after the change, bit i = line i);
- envelope ``b"EVENT\\0"`` with ``type == "spike"``: key ``spike`` (not ``content``) with
  ``stream``, ``source_node``, ``electrode``, ``sample_num``, ``num_channels``, ``num_samples``,
  ``sorted_id``, ``threshold``; payload the float32 waveform (ignored here).

Every header carries ``message_num`` (one counter for all types); a jump means the SUB socket
dropped messages, and the interval since the last delivered chunk is given up (a stream gap).
The plugin only lists clients that send heartbeats: JSON ``{"application", "uuid", "type":
"heartbeat"}`` on a REQ socket to the data port + 1, every 2 s (reply ``heartbeat received``).

Stream position: the plugin sends a buffer's events and spikes before the buffer's continuous
data (one DATA message per channel), so the smallest end (``sample_num + num_samples``) over the
channels' latest DATA messages is the sample up to which everything has arrived. Keep at least
one continuous channel selected in the plugin (a few are enough: every selected channel is sent).

Event words from TTL lines. The presenter writes each image's 16-bit word on a digital output
wired to TTL lines ``word_lines[0..15]`` (bit i of the word on line ``word_lines[i]``) and
returns the lines to 0 in between. Open Ephys reports one event per changed line, each with the
full line state in ``word``. Changes within ``word_settle_ms`` of the first one form one word:
the source emits ``(WORD_LINE, state=1, word=value)`` at the first change's sample once the
lines have settled (and ``state=0`` when they return to 0). With a ``strobe_line``, the word is
instead read from the line state at each rising edge of the strobe.

Photodiode: a TTL line (``photodiode_ttl_line``), or a continuous channel
(``photodiode_channel``) thresholded with hysteresis, becomes (``PHOTODIODE_LINE``, state).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import zmq

from rig.protocol import EVENT_DTYPE, SPIKE_DTYPE, FixationBreak, Flip
from rig.sources.base import DEFAULT_SAMPLE_RATE_HZ, PHOTODIODE_LINE, WORD_LINE, Chunk, ChunkCutter

log = logging.getLogger(__name__)

TTL_EVENT_TYPE = 3
TTL_PAYLOAD = np.dtype([("line", "u1"), ("state", "u1"), ("word", "<u8")])  # 10 bytes
_TRAILING_INT = re.compile(r"(\d+)\s*$")


@dataclass(frozen=True)
class OpenEphysConfig:
    endpoint: str = "tcp://127.0.0.1:5556"  # the plugin's PUB (data port)
    heartbeat_endpoint: str | None = None  # default: same host, data port + 1
    heartbeat_interval_s: float = 2.0
    heartbeat_timeout_s: float = 1.0  # no reply within this: the REQ socket is rebuilt
    application: str = "popcontrol"
    sample_rate_hz: float = DEFAULT_SAMPLE_RATE_HZ
    stream_name: str | None = None  # only this Open Ephys stream; None: every stream
    word_lines: tuple[int, ...] = tuple(range(16))  # TTL line of word bit 0, 1, ...
    strobe_line: int | None = None
    word_settle_ms: float = 1.0
    photodiode_ttl_line: int | None = 16
    photodiode_channel: int | None = None  # continuous channel_num of an analog photodiode
    photodiode_threshold: float = 0.5  # rising when above threshold + hysteresis/2
    photodiode_hysteresis: float = 0.1
    electrode_channels: dict[str, int] = field(default_factory=dict)  # electrode name -> channel
    sorted_units_only: bool = False  # drop spikes with sorted_id 0
    rig: str = "rig"

    def heartbeat_address(self) -> str:
        if self.heartbeat_endpoint is not None:
            return self.heartbeat_endpoint
        head, _, port = self.endpoint.rpartition(":")
        return f"{head}:{int(port) + 1}"


@dataclass
class OpenEphysCounters:
    messages: int = 0
    data_messages: int = 0
    ttl_events: int = 0
    spikes: int = 0
    lost_messages: int = 0  # message_num jumps
    bad_messages: int = 0  # could not be parsed
    other_streams: int = 0
    unknown_electrodes: int = 0
    late_records: int = 0
    heartbeats_sent: int = 0
    heartbeat_replies: int = 0
    rate_mismatches: int = 0


class _WordDecoder:
    """TTL line changes -> event word records (see the module docstring)."""

    def __init__(self, cfg: OpenEphysConfig) -> None:
        self.lines = np.asarray(cfg.word_lines, np.uint64)
        self.strobe = cfg.strobe_line
        self.settle = max(0, round(cfg.word_settle_ms * cfg.sample_rate_hz / 1000))
        self._pending_since: int | None = None
        self._pending_value = 0
        self._last_value = 0

    def value(self, ttl_word: int) -> int:
        bits = (np.uint64(ttl_word) >> self.lines) & np.uint64(1)
        return int(np.sum(bits << np.arange(self.lines.size, dtype=np.uint64)))

    def on_ttl(
        self, sample: int, line: int, state: int, ttl_word: int
    ) -> list[tuple[int, int, int, int]]:
        out = self.flush(sample)
        if self.strobe is not None:
            if line == self.strobe and state == 1:
                out.append((sample, WORD_LINE, 1, self.value(ttl_word)))
            return out
        if line not in self.lines:
            return out
        if self._pending_since is None:
            self._pending_since = sample
        self._pending_value = self.value(ttl_word)
        return out

    def flush(self, now_sample: int) -> list[tuple[int, int, int, int]]:
        """Emit the pending word once the lines have been still for the settle time."""
        if self._pending_since is None or now_sample < self._pending_since + self.settle:
            return []
        since, value = self._pending_since, self._pending_value
        self._pending_since = None
        if value == self._last_value:
            return []
        self._last_value = value
        return [(since, WORD_LINE, 1 if value else 0, value)]

    def holdback(self) -> int | None:
        """The earliest sample a not yet emitted word will carry."""
        return self._pending_since


class _Threshold:
    """Analog photodiode -> rising/falling edges, with hysteresis, across buffers."""

    def __init__(self, threshold: float, hysteresis: float) -> None:
        self.hi = threshold + hysteresis / 2
        self.lo = threshold - hysteresis / 2
        self.state = 0

    def edges(self, first_sample: int, x: np.ndarray) -> list[tuple[int, int, int, int]]:
        """x: (n,) float32 samples starting at first_sample."""
        # 1 above hi, 0 below lo, -1 in between (keeps the previous state)
        level = np.where(x >= self.hi, 1, np.where(x <= self.lo, 0, -1))
        known = np.flatnonzero(level >= 0)
        if not known.size:
            return []
        states = level[known]
        prev = np.concatenate([[self.state], states[:-1]])
        change = np.flatnonzero(states != prev)
        self.state = int(states[-1])
        return [(first_sample + int(known[i]), PHOTODIODE_LINE, int(states[i]), 0) for i in change]


class OpenEphysSource:
    """``Source`` reading the Open Ephys ZMQ Interface plugin."""

    def __init__(
        self, config: OpenEphysConfig | None = None, context: zmq.Context | None = None
    ) -> None:
        self.config = config or OpenEphysConfig()
        self.sample_rate_hz = self.config.sample_rate_hz
        self.counters = OpenEphysCounters()
        self._ctx = context or zmq.Context.instance()
        self._sub: zmq.Socket | None = None
        self._req: zmq.Socket | None = None
        self._uuid = str(uuid.uuid4())
        self._next_heartbeat = 0.0
        self._awaiting_reply_since: float | None = None
        self._last_message_num: int | None = None
        self._data_end: int | None = None
        self._data_ends: dict[tuple[str, int], int] = {}  # (stream, channel) -> end of its data
        self._lost = False
        self._out: list[Chunk] = []
        self._cutter = ChunkCutter(self.config.rig, "openephys")
        self._words = _WordDecoder(self.config)
        self._pd = _Threshold(self.config.photodiode_threshold, self.config.photodiode_hysteresis)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.config.endpoint)
        self._sub = sub
        self._open_req()
        log.info(
            "openephys: SUB %s, heartbeats to %s",
            self.config.endpoint,
            self.config.heartbeat_address(),
        )

    def stop(self) -> None:
        for sock in (self._sub, self._req):
            if sock is not None:
                sock.close(linger=0)
        self._sub = self._req = None

    def _open_req(self) -> None:
        if self._req is not None:
            self._req.close(linger=0)
        req = self._ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(self.config.heartbeat_address())
        self._req = req
        self._awaiting_reply_since = None
        self._next_heartbeat = 0.0

    def on_flip(self, flip: Flip) -> None:
        """Real acquisition sees the flip through its TTL lines; nothing to do."""

    def on_fixation_break(self, brk: FixationBreak) -> None:
        """Nothing to do."""

    def stream_position(self) -> int:
        return self._cutter.position or 0

    # ------------------------------------------------------------------ reading

    def read(self, timeout_ms: int) -> list[Chunk]:
        assert self._sub is not None, "call start() first"
        self._heartbeat()
        if self._sub.poll(timeout_ms):
            for _ in range(10_000):
                try:
                    frames = self._sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._handle(frames)
        out, self._out = self._out, []
        return out

    def _heartbeat(self) -> None:
        assert self._req is not None
        now = time.monotonic()
        if self._awaiting_reply_since is not None:
            if self._req.poll(0):
                self._req.recv()
                self.counters.heartbeat_replies += 1
                self._awaiting_reply_since = None
            elif now - self._awaiting_reply_since > self.config.heartbeat_timeout_s:
                self._open_req()  # a REQ without its reply cannot send again
        if self._awaiting_reply_since is None and now >= self._next_heartbeat:
            msg = {"application": self.config.application, "uuid": self._uuid, "type": "heartbeat"}
            self._req.send(json.dumps(msg).encode())
            self.counters.heartbeats_sent += 1
            self._awaiting_reply_since = now
            self._next_heartbeat = now + self.config.heartbeat_interval_s

    def _handle(self, frames: list[bytes]) -> None:
        self.counters.messages += 1
        try:
            envelope = frames[0]
            header = json.loads(frames[1].decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            num = header.get("message_num")
            if isinstance(num, int):
                if self._last_message_num is not None and num > self._last_message_num + 1:
                    self.counters.lost_messages += num - self._last_message_num - 1
                    self._lost = True
                self._last_message_num = num
            payload = frames[2] if len(frames) > 2 else b""
            if envelope == b"DATA\x00":
                self._on_data(header["content"], payload)
            elif envelope == b"EVENT\x00" and header.get("type") == "spike":
                self._on_spike(header["spike"])
            elif envelope == b"EVENT\x00":
                self._on_event(header["content"], payload)
        except (KeyError, IndexError, TypeError, ValueError, UnicodeDecodeError) as exc:
            self.counters.bad_messages += 1
            log.warning("openephys: unreadable message dropped: %s", exc)

    def _wanted(self, content: dict[str, object]) -> bool:
        name = self.config.stream_name
        if name is None or content.get("stream") == name:
            return True
        self.counters.other_streams += 1
        return False

    def _on_data(self, content: dict[str, object], payload: bytes) -> None:
        if not self._wanted(content):
            return
        first = int(content["sample_num"])  # type: ignore[call-overload]
        n = int(content["num_samples"])  # type: ignore[call-overload]
        rate = content.get("sample_rate")
        if isinstance(rate, int | float) and abs(float(rate) - self.sample_rate_hz) > 1e-6:
            self.counters.rate_mismatches += 1
        self.counters.data_messages += 1
        channel = content.get("channel_num")
        if self.config.photodiode_channel is not None and channel == self.config.photodiode_channel:
            x = np.frombuffer(payload, "<f4")
            if x.size != n:
                raise ValueError(f"DATA payload has {x.size} samples, header says {n}")
            self._cutter.add_events(np.array(self._pd.edges(first, x), EVENT_DTYPE))
        key = (str(content.get("stream")), int(channel) if isinstance(channel, int) else -1)
        self._data_ends[key] = max(self._data_ends.get(key, 0), first + n)
        # Complete up to where every channel has arrived (channels of one buffer come one by one).
        self._data_end = min(self._data_ends.values())
        self._advance()

    def _on_event(self, content: dict[str, object], payload: bytes) -> None:
        if not self._wanted(content) or content.get("type") != TTL_EVENT_TYPE:
            return
        if len(payload) < TTL_PAYLOAD.itemsize:
            raise ValueError(f"TTL payload of {len(payload)} bytes, expected 10")
        ttl = np.frombuffer(payload[: TTL_PAYLOAD.itemsize], TTL_PAYLOAD)[0]
        sample = int(content["sample_num"])  # type: ignore[call-overload]
        line, state, word = int(ttl["line"]), int(ttl["state"]), int(ttl["word"])
        self.counters.ttl_events += 1
        rows = self._words.on_ttl(sample, line, state, word)
        if line == self.config.photodiode_ttl_line:
            rows.append((sample, PHOTODIODE_LINE, 1 if state else 0, 0))
        if rows:
            self._cutter.add_events(np.array(rows, EVENT_DTYPE))

    def _on_spike(self, spike: dict[str, object]) -> None:
        if not self._wanted(spike):
            return
        electrode = spike.get("electrode")
        chan = self._channel(electrode)
        if chan is None:
            self.counters.unknown_electrodes += 1
            return
        unit = int(spike.get("sorted_id", 0) or 0)  # type: ignore[call-overload]
        if self.config.sorted_units_only and unit == 0:
            return
        rec = np.zeros(1, SPIKE_DTYPE)
        rec["sample"] = int(spike["sample_num"])  # type: ignore[call-overload]
        rec["chan"] = chan
        rec["unit"] = min(max(unit, 0), 255)
        self.counters.spikes += 1
        self._cutter.add_spikes(rec)

    def _channel(self, electrode: object) -> int | None:
        """Electrode name -> 0-based channel: the configured map, else the name's trailing number - 1."""
        if isinstance(electrode, int) and not isinstance(electrode, bool):
            return electrode if 0 <= electrode < 65536 else None
        if not isinstance(electrode, str):
            return None
        if electrode in self.config.electrode_channels:
            return self.config.electrode_channels[electrode]
        m = _TRAILING_INT.search(electrode)
        if m is None or not 1 <= int(m.group(1)) <= 65536:
            return None
        return int(m.group(1)) - 1

    def _advance(self) -> None:
        """Cut chunks up to the latest DATA end (each DATA message closes what came before it)."""
        if self._data_end is None:
            return
        end = self._data_end
        words = self._words.flush(end)
        if words:
            self._cutter.add_events(np.array(words, EVENT_DTYPE))
        hold = self._words.holdback()
        if hold is not None:
            end = min(end, hold)  # a word still settling must land in a later chunk
        if self._lost:
            # Messages were lost since the last complete buffer: what they held lies in
            # [position, end) of the next complete one; give that up (the aligner sees a gap).
            if self._cutter.position is not None and end <= self._cutter.position:
                return
            self._lost = False
            log.warning(
                "openephys: messages lost; samples [%s, %d) given up", self._cutter.position, end
            )
            self._cutter.skip_to(end)
            return
        self._out.extend(self._cutter.cut(end))
        self.counters.late_records = self._cutter.late_records

"""The presenter's message stream to the rig daemon: Flip and FixationBreak (rig.protocol).

``FlipStream`` numbers messages (``seq``), names each by the key the daemon's ack carries, and
hands the encoded frames to a sender (the ``FlipChannel``). It also keeps a plain summary of every
message, which the presenters return and the tests compare.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from rig import protocol

FLIP_STREAM = "flip"

Send = Callable[[str, list[bytes]], None]  # (ack key, frames)


@dataclass(frozen=True)
class SentMessage:
    """What was sent, without ids and times (equal for the same seed in both presenters)."""

    kind: str  # "flip" or "fixb"
    session_id: int
    block_id: int
    trial: int
    position: int  # -1 for fixation breaks
    stimulus_id: str
    event_word: int
    fixation_ok: bool


class FlipStream:
    """Builds, numbers and sends the presenter's messages for one rig."""

    def __init__(self, rig: str, send: Send, first_seq: int = 0) -> None:
        self.rig = rig
        self._send = send
        self._seq = first_seq
        self.session_id = 0
        self.block_id = 0
        self.sent: list[SentMessage] = []

    def set_block(self, session_id: int, block_id: int) -> None:
        self.session_id = session_id
        self.block_id = block_id

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def flip(
        self,
        *,
        trial: int,
        position: int,
        stimulus_id: str,
        event_word: int,
        host_flip_time_s: float,
        dropped_frames: int,
        fixation_ok: bool,
    ) -> str:
        presentation_id = str(uuid.uuid4())
        msg = protocol.Flip(
            rig=self.rig,
            stream=FLIP_STREAM,
            seq=self._next_seq(),
            presentation_id=presentation_id,
            session_id=self.session_id,
            block_id=self.block_id,
            stimulus_id=stimulus_id,
            trial=trial,
            position=position,
            event_word=event_word,
            host_flip_time_s=host_flip_time_s,
            dropped_frames=dropped_frames,
            fixation_ok=fixation_ok,
        )
        self._send(protocol.ack_key(msg), msg.encode())
        self.sent.append(
            SentMessage(
                "flip",
                self.session_id,
                self.block_id,
                trial,
                position,
                stimulus_id,
                event_word,
                fixation_ok,
            )
        )
        return presentation_id

    def fixation_break(self, *, trial: int, host_time_s: float) -> None:
        msg = protocol.FixationBreak(
            rig=self.rig,
            stream=FLIP_STREAM,
            seq=self._next_seq(),
            session_id=self.session_id,
            block_id=self.block_id,
            trial=trial,
            host_time_s=host_time_s,
        )
        self._send(protocol.ack_key(msg), msg.encode())
        self.sent.append(
            SentMessage("fixb", self.session_id, self.block_id, trial, -1, "", 0, False)
        )


def decode_ack_keys(frames: list[bytes]) -> list[str]:
    """The keys an Ack from the daemon acknowledges (the FlipChannel's decoder)."""
    msg = protocol.decode(frames)
    if not isinstance(msg, protocol.Ack):
        raise protocol.DecodeError("bad_topic", f"expected an ack, got {type(msg).__name__}")
    return list(msg.ids)

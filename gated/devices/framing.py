"""Split the byte stream of a scanner into codes, without any I/O.

The framer gets bytes with the time they arrived and returns scan events: a
``Code`` for each valid code, or a ``Rejected`` with a reason. It never raises
on input and never buffers more than ``max_length`` plus the length of the
longest terminator.

How a code ends:

- ``terminator = "any"``: CR, LF or CRLF. CR CR or a blank line give no code.
- ``"cr"``, ``"lf"``, ``"crlf"``: only that terminator. In ``crlf`` mode a lone
  CR stays in the code, which then fails as ``invalid_code``.
- ``"idle"``: ``idle_ms`` of silence after the last byte.
- ``terminators``: extra terminators (for example ``#`` on a keypad), added to
  the ones above.
- ``stx_etx = true``: a code is the bytes between STX (0x02) and ETX (0x03),
  and the terminator settings are not used. Bytes outside a frame that are not
  whitespace are rejected as ``invalid_code``. A second STX before the ETX
  rejects the open frame as ``incomplete_code``.

What is done to a code before it is checked, in this order: surrounding
whitespace is stripped; with ``strip_aim``, an AIM symbology identifier at the
start (``]``, a letter and a letter or digit, such as ``]C1``, ``]Q1``,
``]E0`` or ``]d2``) is removed; every GS1 group separator (GS, 0x1D) is
removed, so the element strings of a GS1 code are joined in order. A code is
valid when what is left is printable ASCII and matches ``pattern`` in full.

Reject reasons:

- ``invalid_code``: a control byte (other than GS), a byte above 0x7E, an empty
  code after stripping, or a mismatch with ``pattern``.
- ``incomplete_code``: a partial code with no new byte for ``idle_ms``, except
  in ``idle`` mode where silence ends the code. Whitespace alone is dropped
  silently.
- ``too_long``: more than ``max_length`` bytes before the terminator. The rest
  of that line is dropped and the line is rejected once, when it ends (at its
  terminator or after ``idle_ms`` of silence). Its preview holds at most
  ``max_length + 1`` bytes, because the rest is never stored.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from gated.config import ScannerSettings

STX = 0x02
ETX = 0x03
GROUP_SEPARATOR = 0x1D
WHITESPACE = b" \t\r\n\x0b\x0c"
PREVIEW_BYTES = 16
_LINE_TERMINATORS: dict[str, tuple[bytes, ...]] = {
    "any": (b"\r", b"\n"),
    "cr": (b"\r",),
    "lf": (b"\n",),
    "crlf": (b"\r\n",),
    "idle": (),
}
_AIM_IDENTIFIER = re.compile(rb"\][A-Za-z][A-Za-z0-9]")


class RejectReason(enum.StrEnum):
    INVALID_CODE = "invalid_code"
    INCOMPLETE_CODE = "incomplete_code"
    TOO_LONG = "too_long"


@dataclass(frozen=True, slots=True)
class Code:
    """A valid code. ``raw`` is the line as received, without its terminator."""

    text: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    """Input that is not a valid code; ``preview`` is the hex of its first 16 bytes."""

    reason: RejectReason
    length: int
    preview: str


ScanEvent = Code | Rejected


def preview_hex(data: bytes) -> str:
    """Return the hex of the first ``PREVIEW_BYTES`` bytes, space-separated."""
    return data[:PREVIEW_BYTES].hex(" ")


class Framer:
    """Turn timed chunks of scanner bytes into scan events; see the module docstring."""

    def __init__(self, settings: ScannerSettings) -> None:
        self._framed = settings.stx_etx
        self._idle_ends_code = settings.terminator == "idle" and not settings.stx_etx
        terminators = () if self._framed else _LINE_TERMINATORS[settings.terminator]
        if not self._framed:
            terminators += tuple(settings.terminator_bytes)
        # Longest first, so that a line ending in CRLF loses both bytes when
        # both CRLF and LF are terminators.
        self._terminators = tuple(sorted(set(terminators), key=len, reverse=True))
        self._tail = max((len(t) for t in self._terminators), default=1)
        self._max_length = settings.max_length
        self._pattern = re.compile(settings.pattern)
        self._strip_aim = settings.strip_aim
        self._idle_s = settings.idle_ms / 1000
        # A dropped line keeps only its first max_length + 1 bytes for the preview.
        self._too_long_preview_bytes = min(PREVIEW_BYTES, settings.max_length + 1)

        self._buffer = bytearray()
        self._length = 0
        self._dropping = False
        self._preview = b""
        self._in_frame = False
        self._last_byte_at: float | None = None

    @property
    def buffered(self) -> int:
        """Number of bytes held for the current line."""
        return len(self._buffer)

    def deadline(self) -> float | None:
        """Return the time at which ``expire`` should next be called, or None."""
        if self._last_byte_at is None:
            return None
        return self._last_byte_at + self._idle_s

    def expire(self, now: float) -> list[ScanEvent]:
        """End the pending line if no byte arrived for ``idle_ms`` before ``now``."""
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return []
        in_frame, self._in_frame = self._in_frame, False
        if self._framed and not in_frame:
            return self._end_outside()
        if self._idle_ends_code or self._dropping:
            return self._end_line(self._length)
        content = bytes(self._buffer)
        self._reset_line()
        if not content.strip(WHITESPACE):
            return []
        return [Rejected(RejectReason.INCOMPLETE_CODE, len(content), preview_hex(content))]

    def feed(self, data: bytes, now: float) -> list[ScanEvent]:
        """Add bytes received at ``now`` and return the events they complete.

        A pending line that has been idle since before ``now`` is expired
        first, so the result does not depend on how late ``expire`` was called.
        """
        events = self.expire(now)
        for byte in data:
            if self._framed:
                events.extend(self._feed_framed(byte))
            else:
                events.extend(self._feed_line(byte))
        if data:
            self._last_byte_at = now if self._length or self._in_frame else None
        return events

    def _feed_line(self, byte: int) -> list[ScanEvent]:
        self._buffer.append(byte)
        self._length += 1
        for terminator in self._terminators:
            if self._buffer.endswith(terminator):
                return self._end_line(self._length - len(terminator))
        self._bound_buffer()
        return []

    def _feed_framed(self, byte: int) -> list[ScanEvent]:
        if byte == STX:
            # An STX ends what came before it: junk outside a frame, or a
            # frame that never got its ETX.
            events = self._end_outside() if not self._in_frame else self._end_incomplete_frame()
            self._in_frame = True
            return events
        if byte == ETX and self._in_frame:
            events = self._end_line(self._length)
            self._in_frame = False
            return events
        self._buffer.append(byte)
        self._length += 1
        self._bound_buffer()
        return []

    def _bound_buffer(self) -> None:
        """Start or continue dropping a line that is longer than ``max_length``."""
        keep = self._tail - 1
        if self._dropping:
            # Keep only what could be the start of a terminator.
            del self._buffer[: len(self._buffer) - keep]
        elif len(self._buffer) > self._max_length + keep:
            # Even if the last `keep` bytes begin a terminator, the line is
            # already longer than max_length.
            self._dropping = True
            self._preview = bytes(self._buffer[: self._too_long_preview_bytes])
            del self._buffer[: len(self._buffer) - keep]

    def _end_line(self, length: int) -> list[ScanEvent]:
        """End the current line, whose content is its first ``length`` bytes."""
        dropping, preview = self._dropping, self._preview
        content = bytes(self._buffer[: max(length, 0)]) if not dropping else b""
        self._reset_line()
        if dropping or length > self._max_length:
            preview = preview or content[: self._too_long_preview_bytes]
            return [Rejected(RejectReason.TOO_LONG, length, preview_hex(preview))]
        return self._check(content)

    def _end_outside(self) -> list[ScanEvent]:
        events = self._end_line(self._length)
        return [
            Rejected(RejectReason.INVALID_CODE, len(event.raw), preview_hex(event.raw))
            if isinstance(event, Code)
            else event
            for event in events
        ]

    def _end_incomplete_frame(self) -> list[ScanEvent]:
        dropping, length, preview = self._dropping, self._length, self._preview
        content = bytes(self._buffer)
        self._reset_line()
        if dropping:
            return [Rejected(RejectReason.TOO_LONG, length, preview_hex(preview))]
        return [Rejected(RejectReason.INCOMPLETE_CODE, length, preview_hex(content))]

    def _reset_line(self) -> None:
        self._buffer.clear()
        self._length = 0
        self._dropping = False
        self._preview = b""
        self._last_byte_at = None

    def _check(self, raw: bytes) -> list[ScanEvent]:
        text = raw.strip(WHITESPACE)
        if not text:
            return []
        if self._strip_aim and _AIM_IDENTIFIER.match(text):
            text = text[3:]
        text = text.replace(bytes([GROUP_SEPARATOR]), b"")
        invalid = Rejected(RejectReason.INVALID_CODE, len(raw), preview_hex(raw))
        rejected: list[ScanEvent] = [invalid]
        if not text or any(byte < 0x20 or byte > 0x7E for byte in text):
            return rejected
        decoded = text.decode("ascii")
        if not self._pattern.fullmatch(decoded):
            return rejected
        return [Code(decoded, raw)]

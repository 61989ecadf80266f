"""Framer: tables of bytes real scanners send, and property tests against a reference model."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gated.config import ScannerSettings
from gated.devices.framing import Code, Framer, Rejected, RejectReason, ScanEvent

INVALID = RejectReason.INVALID_CODE
INCOMPLETE = RejectReason.INCOMPLETE_CODE
TOO_LONG = RejectReason.TOO_LONG


def make_settings(**overrides: Any) -> ScannerSettings:
    return ScannerSettings(port="/dev/null", **overrides)


def feed_all(framer: Framer, data: bytes, now: float = 0.0) -> list[ScanEvent]:
    return framer.feed(data, now)


def codes(events: list[ScanEvent]) -> list[str]:
    return [event.text for event in events if isinstance(event, Code)]


def reasons(events: list[ScanEvent]) -> list[RejectReason]:
    return [event.reason for event in events if isinstance(event, Rejected)]


# --- tables of real scanner output -------------------------------------------

TERMINATED_CASES = [
    # (settings, bytes, expected codes, expected reject reasons)
    pytest.param({}, b"ABCD1234\r", ["ABCD1234"], [], id="cr"),
    pytest.param({}, b"ABCD1234\n", ["ABCD1234"], [], id="lf"),
    pytest.param({}, b"ABCD1234\r\n", ["ABCD1234"], [], id="crlf-in-any-mode"),
    pytest.param({}, b"ABCD1234\r\rEFGH5678\r\r", ["ABCD1234", "EFGH5678"], [], id="cr-cr"),
    pytest.param({}, b"\r\n\r\n", [], [], id="blank-lines"),
    pytest.param({}, b"  ABCD1234 \t\r", ["ABCD1234"], [], id="surrounding-whitespace"),
    pytest.param({"terminator": "crlf"}, b"ABCD1234\r\n", ["ABCD1234"], [], id="strict-crlf"),
    pytest.param(
        {"terminator": "crlf"}, b"ABCD\r1234\r\n", [], [INVALID], id="strict-crlf-lone-cr"
    ),
    pytest.param(
        {"terminator": "cr"},
        b"ABCD1234\r\nEFGH5678\r",
        ["ABCD1234", "EFGH5678"],
        [],
        id="strict-cr-with-crlf-sender",
    ),
    pytest.param({"terminator": "lf"}, b"ABCD1234\n", ["ABCD1234"], [], id="strict-lf"),
    pytest.param({"strip_aim": True}, b"]C1ABCD1234\r", ["ABCD1234"], [], id="aim-code128"),
    pytest.param({"strip_aim": True}, b"]Q1ABCD1234\r", ["ABCD1234"], [], id="aim-qr"),
    pytest.param({"strip_aim": True}, b"]E04006381333931\r", ["4006381333931"], [], id="aim-ean13"),
    pytest.param({"strip_aim": True}, b"]d2ABCD1234\r", ["ABCD1234"], [], id="aim-datamatrix"),
    pytest.param({}, b"]C1ABCD1234\r", [], [INVALID], id="aim-without-strip"),
    pytest.param({"strip_aim": True}, b"ABCD1234\r", ["ABCD1234"], [], id="strip-aim-absent"),
    pytest.param(
        {"strip_aim": True},
        b"]C1\x1d0104012345678901\x1d10ABC12\r",
        ["010401234567890110ABC12"],
        [],
        id="gs1-with-separators",
    ),
    pytest.param(
        {"strip_aim": True},
        b"]C1010401234567890110ABC12\r",
        ["010401234567890110ABC12"],
        [],
        id="gs1-without-separators",
    ),
    pytest.param({"stx_etx": True}, b"\x02ABCD1234\x03", ["ABCD1234"], [], id="stx-etx"),
    pytest.param(
        {"stx_etx": True},
        b"\x02ABCD1234\x03\r\n\x02EFGH5678\x03\r\n",
        ["ABCD1234", "EFGH5678"],
        [],
        id="stx-etx-crlf",
    ),
    pytest.param(
        {"stx_etx": True},
        b"\x02AB\x02ABCD1234\x03",
        ["ABCD1234"],
        [INCOMPLETE],
        id="stx-restarts-frame",
    ),
    pytest.param(
        {"stx_etx": True},
        b"junk\x02ABCD1234\x03",
        ["ABCD1234"],
        [INVALID],
        id="stx-junk-outside-frame",
    ),
    pytest.param(
        {"stx_etx": True, "strip_aim": True},
        b"\x02]Q1ABCD1234\x03",
        ["ABCD1234"],
        [],
        id="stx-etx-aim",
    ),
    pytest.param({"terminators": ["#"]}, b"1234#5678#", ["1234", "5678"], [], id="keypad-hash"),
    pytest.param(
        {"terminator": "idle", "terminators": ["#"]},
        b"1234#",
        ["1234"],
        [],
        id="keypad-hash-idle-mode",
    ),
    pytest.param({}, b"\x00\xff\x18ABCD1234\r", [], [INVALID], id="junk-on-same-line"),
    pytest.param({}, b"ABCD\x07234\r", [], [INVALID], id="control-byte"),
    pytest.param({}, "ABCDé234\r".encode(), [], [INVALID], id="non-ascii"),
    pytest.param({}, b"\xff\xfe\xfd\xfc\r", [], [INVALID], id="invalid-utf8"),
    pytest.param({}, b"AB\r", [], [INVALID], id="pattern-too-short"),
    pytest.param(
        {"pattern": "[0-9]{4}"}, b"12345\r1234\r", ["1234"], [INVALID], id="pattern-full-match"
    ),
    pytest.param({"strip_aim": True}, b"]C1\r", [], [INVALID], id="aim-only"),
]


@pytest.mark.parametrize(
    ("overrides", "data", "expected_codes", "expected_reasons"), TERMINATED_CASES
)
def test_framer_table(
    overrides: dict[str, Any],
    data: bytes,
    expected_codes: list[str],
    expected_reasons: list[RejectReason],
) -> None:
    events = feed_all(Framer(make_settings(**overrides)), data)
    assert codes(events) == expected_codes
    assert reasons(events) == expected_reasons


@pytest.mark.parametrize(
    ("overrides", "data", "expected_codes", "expected_reasons"), TERMINATED_CASES
)
def test_framer_single_byte_reads(
    overrides: dict[str, Any],
    data: bytes,
    expected_codes: list[str],
    expected_reasons: list[RejectReason],
) -> None:
    framer = Framer(make_settings(**overrides))
    events: list[ScanEvent] = []
    for index in range(len(data)):
        events += framer.feed(data[index : index + 1], 0.001 * index)
    assert codes(events) == expected_codes
    assert reasons(events) == expected_reasons


def test_code_keeps_raw_bytes() -> None:
    events = feed_all(Framer(make_settings(strip_aim=True)), b" ]C1ABCD1234\r")
    assert events == [Code("ABCD1234", b" ]C1ABCD1234")]


def test_rejected_preview_is_hex_of_16_bytes() -> None:
    events = feed_all(Framer(make_settings()), b"\x00" * 3 + b"A" * 30 + b"\r")
    assert len(events) == 1
    rejected = events[0]
    assert isinstance(rejected, Rejected)
    assert rejected.reason is INVALID
    assert rejected.length == 33
    assert rejected.preview == "00 00 00" + " 41" * 13


def test_power_up_junk_then_idle() -> None:
    framer = Framer(make_settings(idle_ms=300))
    assert framer.feed(b"\x00\xff\x18", 0.0) == []
    assert framer.deadline() == pytest.approx(0.3)
    assert framer.expire(0.299) == []
    assert framer.expire(0.3) == [Rejected(INCOMPLETE, 3, "00 ff 18")]
    assert framer.deadline() is None
    assert codes(framer.feed(b"ABCD1234\r", 1.0)) == ["ABCD1234"]


def test_late_feed_expires_old_partial_first() -> None:
    framer = Framer(make_settings(idle_ms=100))
    framer.feed(b"ABCD", 0.0)
    events = framer.feed(b"EFGH1234\r", 5.0)
    assert reasons(events) == [INCOMPLETE]
    assert codes(events) == ["EFGH1234"]


def test_idle_terminator_ends_code() -> None:
    framer = Framer(make_settings(terminator="idle", idle_ms=50))
    assert framer.feed(b"ABCD", 0.0) == []
    assert framer.feed(b"1234", 0.02) == []
    assert framer.deadline() == pytest.approx(0.07)
    assert framer.expire(0.06) == []
    assert framer.expire(0.07) == [Code("ABCD1234", b"ABCD1234")]
    assert framer.deadline() is None


def test_whitespace_only_partial_is_dropped_silently() -> None:
    framer = Framer(make_settings(terminator="cr"))
    framer.feed(b"ABCD1234\r\n", 0.0)
    assert framer.expire(10.0) == []


def test_crlf_mode_code_missing_lf_is_incomplete() -> None:
    framer = Framer(make_settings(terminator="crlf"))
    assert framer.feed(b"ABCD1234\r", 0.0) == []
    assert reasons(framer.expire(10.0)) == [INCOMPLETE]


def test_unterminated_stx_frame_is_incomplete() -> None:
    framer = Framer(make_settings(stx_etx=True))
    framer.feed(b"\x02ABCD", 0.0)
    assert reasons(framer.expire(10.0)) == [INCOMPLETE]
    assert codes(framer.feed(b"\x02ABCD1234\x03", 11.0)) == ["ABCD1234"]


def test_junk_outside_frame_rejected_on_idle() -> None:
    framer = Framer(make_settings(stx_etx=True))
    framer.feed(b"\x00\xff\x18", 0.0)
    assert reasons(framer.expire(10.0)) == [INVALID]


def test_too_long_reported_once_per_line() -> None:
    framer = Framer(make_settings(max_length=8))
    events: list[ScanEvent] = []
    for byte in b"X" * 100:
        events += framer.feed(bytes([byte]), 0.0)
        assert framer.buffered <= 9
    assert events == []
    events = framer.feed(b"\rABCD1234\r", 0.0)
    assert events[0] == Rejected(TOO_LONG, 100, "58" + " 58" * 8)
    assert codes(events) == ["ABCD1234"]
    assert len(events) == 2


def test_too_long_at_exact_limit() -> None:
    framer = Framer(make_settings(max_length=8, terminator="crlf"))
    assert codes(framer.feed(b"ABCD1234\r\n", 0.0)) == ["ABCD1234"]
    assert reasons(framer.feed(b"ABCD12345\r\n", 0.0)) == [TOO_LONG]


def test_too_long_line_ended_by_idle() -> None:
    framer = Framer(make_settings(max_length=8))
    framer.feed(b"X" * 50, 0.0)
    assert framer.expire(10.0) == [Rejected(TOO_LONG, 50, "58" + " 58" * 8)]


def test_deadline_none_when_idle() -> None:
    framer = Framer(make_settings())
    assert framer.deadline() is None
    framer.feed(b"ABCD1234\r", 0.0)
    assert framer.deadline() is None


# --- properties ----------------------------------------------------------------

INTERESTING_BYTES = [
    b"A",
    b"7",
    b"-",
    b" ",
    b"\r",
    b"\n",
    b"#",
    b"]",
    b"C",
    b"1",
    b"\x1d",
    b"\x00",
    b"\xff",
    b"\x02",
    b"\x03",
    b"\t",
]
byte_streams = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from(INTERESTING_BYTES), max_size=200).map(b"".join),
)
line_settings = st.fixed_dictionaries(
    {
        "terminator": st.sampled_from(["any", "cr", "lf", "crlf", "idle"]),
        "terminators": st.lists(st.sampled_from(["#", "*", r"\x03"]), max_size=2, unique=True),
        "strip_aim": st.booleans(),
        "max_length": st.integers(min_value=1, max_value=24),
    }
)
any_settings = st.fixed_dictionaries(
    {
        "terminator": st.sampled_from(["any", "cr", "lf", "crlf", "idle"]),
        "terminators": st.lists(st.sampled_from(["#", r"\r\n", "ab"]), max_size=2, unique=True),
        "stx_etx": st.booleans(),
        "strip_aim": st.booleans(),
        "max_length": st.integers(min_value=1, max_value=24),
        "idle_ms": st.integers(min_value=10, max_value=100),
    }
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    chunks, start = [], 0
    for point in points:
        chunks.append(data[start:point])
        start = point
    chunks.append(data[start:])
    return chunks


def reference_events(data: bytes, config: ScannerSettings) -> list[ScanEvent]:
    """Model of the framer for line terminators: split the whole stream with a regex."""
    terminators = {
        "any": [b"\r", b"\n"],
        "cr": [b"\r"],
        "lf": [b"\n"],
        "crlf": [b"\r\n"],
        "idle": [],
    }[config.terminator] + config.terminator_bytes
    if not terminators:
        return []
    regex = b"|".join(re.escape(t) for t in sorted(terminators, key=len, reverse=True))
    events: list[ScanEvent] = []
    for segment in re.split(regex, data)[:-1]:
        preview = segment[:16].hex(" ")
        if len(segment) > config.max_length:
            short_preview = segment[: min(16, config.max_length + 1)].hex(" ")
            events.append(Rejected(TOO_LONG, len(segment), short_preview))
            continue
        text = segment.strip(b" \t\r\n\x0b\x0c")
        if not text:
            continue
        if config.strip_aim and re.match(rb"\][A-Za-z][A-Za-z0-9]", text):
            text = text[3:]
        text = text.replace(b"\x1d", b"")
        printable = bool(text) and all(0x20 <= byte <= 0x7E for byte in text)
        if printable and re.fullmatch(config.pattern, text.decode("ascii")):
            events.append(Code(text.decode("ascii"), segment))
        else:
            events.append(Rejected(INVALID, len(segment), preview))
    return events


@settings(max_examples=300, deadline=None)
@given(config=line_settings, data=byte_streams, cuts=st.lists(st.integers(0, 400), max_size=8))
def test_framer_matches_reference_model(
    config: dict[str, Any], data: bytes, cuts: list[int]
) -> None:
    scanner_settings = make_settings(**config)
    framer = Framer(scanner_settings)
    events: list[ScanEvent] = []
    for chunk in split(data, cuts):
        events += framer.feed(chunk, 0.0)
        assert framer.buffered <= scanner_settings.max_length + 4
    assert events == reference_events(data, scanner_settings)


@settings(max_examples=300, deadline=None)
@given(
    config=any_settings,
    data=byte_streams,
    cuts=st.lists(st.integers(0, 400), max_size=8),
    gaps=st.lists(st.floats(min_value=0, max_value=0.2), min_size=9, max_size=9),
)
def test_framer_never_raises_and_stays_bounded(
    config: dict[str, Any], data: bytes, cuts: list[int], gaps: list[float]
) -> None:
    scanner_settings = make_settings(**config)
    framer = Framer(scanner_settings)
    now = 0.0
    events: list[ScanEvent] = []
    for chunk, gap in zip(split(data, cuts), gaps, strict=False):
        now += gap
        events += framer.expire(now)
        events += framer.feed(chunk, now)
        assert framer.buffered <= scanner_settings.max_length + 4
    events += framer.expire(now + 1.0)
    assert framer.deadline() is None
    for event in events:
        if isinstance(event, Code):
            assert re.fullmatch(scanner_settings.pattern, event.text)
        else:
            assert event.length >= 0


@settings(max_examples=200, deadline=None)
@given(config=any_settings, data=byte_streams, cuts=st.lists(st.integers(0, 400), max_size=8))
def test_framer_chunking_does_not_change_events(
    config: dict[str, Any], data: bytes, cuts: list[int]
) -> None:
    scanner_settings = make_settings(**config)
    whole = Framer(scanner_settings).feed(data, 0.0)
    framer = Framer(scanner_settings)
    chunked: list[ScanEvent] = []
    for chunk in split(data, cuts):
        chunked += framer.feed(chunk, 0.0)
    assert chunked == whole

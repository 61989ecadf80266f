"""Configuration: a TOML file, overridden by ``GATED_``-prefixed environment variables.

``load_config`` returns a validated ``GatedConfig`` or raises ``ConfigError``
with one line per problem, each naming the key path, the invalid value and what
is allowed. Unknown keys are errors, because a typo in a gate's config must not
be silently ignored. Loading never opens a device or a connection.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gated.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/gated/gated.toml")
DEFAULT_BASE_URL = "https://api.coord.co/v1/access/parking"
CREDENTIAL_NAME = "access_key"
LANE_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}"
DEFAULT_CODE_PATTERN = r"[A-Za-z0-9-]{4,64}"

# LCUS boards (CH340 USB relay modules) take 4-byte frames: 0xA0, channel,
# state, checksum, where the checksum is the sum of the first three bytes
# modulo 256. The number is how many channels the board has.
LCUS_BOARDS: dict[str, int] = {"lcus-1": 1, "lcus-2": 2, "lcus-4": 4, "lcus-8": 8}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_hex_bytes(text: str) -> bytes:
    """Parse ``"A0 01 01 A2"`` (spaces, colons or nothing between bytes) into bytes."""
    cleaned = re.sub(r"[\s:]", "", text)
    if cleaned.lower().startswith("0x"):
        cleaned = cleaned[2:]
    if not cleaned or len(cleaned) % 2 or not re.fullmatch(r"[0-9A-Fa-f]+", cleaned):
        raise ValueError(f"{text!r} is not hex bytes, for example 'A0 01 01 A2'")
    return bytes.fromhex(cleaned)


def lcus_frame(channel: int, on: bool) -> bytes:
    """Return the LCUS relay command for one channel."""
    head = bytes([0xA0, channel, 1 if on else 0])
    return head + bytes([sum(head) % 256])


def decode_escapes(text: str) -> bytes:
    r"""Turn a config string with ``\r``, ``\n``, ``\t`` or ``\xNN`` escapes into bytes."""
    try:
        return text.encode("latin-1").decode("unicode_escape").encode("latin-1")
    except (UnicodeError, ValueError) as exc:
        raise ValueError(f"{text!r} has an invalid escape: {exc}") from None


# --- API ---------------------------------------------------------------------


class ApiSettings(_Section):
    base_url: str = DEFAULT_BASE_URL
    location_id: Annotated[str, Field(min_length=1)]
    access_key: SecretStr | None = None
    access_key_file: Path | None = None
    # Deadline of one ordinary request (list, start, end), in seconds.
    timeout_s: Annotated[float, Field(gt=0, le=120)] = 5.0
    # Seconds between two polls of the location's sessions.
    poll_interval_s: Annotated[float, Field(ge=0.1, le=3600)] = 5.0
    # Deadline of the lookup made for a code the cache does not know, in
    # seconds. A car waits at the barrier for this long at most.
    lookup_timeout_s: Annotated[float, Field(gt=0, le=30)] = 2.0
    # Cap of the exponential backoff between failed deliveries or polls.
    max_backoff_s: Annotated[float, Field(ge=1, le=3600)] = 30.0
    start_path: str = "/{location_id}/session/{session_id}/start"
    end_path: str = "/{location_id}/session/{session_id}/end"

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        if not re.match(r"https?://[^/\s?#]+", value) or "?" in value or "#" in value:
            raise ValueError(
                f"{value!r} is not an http(s) URL without query, for example {DEFAULT_BASE_URL!r}"
            )
        return value.rstrip("/")

    @field_validator("start_path", "end_path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/") or "{session_id}" not in value:
            raise ValueError(
                f"{value!r} must start with '/' and contain '{{session_id}}'"
                " (and may contain '{location_id}')"
            )
        try:
            value.format(location_id="x", session_id="y")
        except (KeyError, IndexError, ValueError):
            raise ValueError(
                f"{value!r} may only use the placeholders {{location_id}} and {{session_id}}"
            ) from None
        return value


class StateSettings(_Section):
    directory: Path = Path("/var/lib/gated")
    # Delivered journal events are kept this many days for inspection, then pruned.
    retention_days: Annotated[float, Field(gt=0, le=3650)] = 30.0


class RuntimeSettings(_Section):
    # The control socket for `gated status` lives here (systemd RuntimeDirectory).
    directory: Path = Path("/run/gated")


class GateSettings(_Section):
    """Decision policy shared by every lane."""

    # What a lane does once the cache is older than max_cache_age_s: "cached"
    # keeps deciding from it, "deny" refuses every code as cache_stale.
    offline_policy: Literal["cached", "deny"] = "cached"
    max_cache_age_s: Annotated[float, Field(gt=0)] = 24 * 3600.0
    # "hard" refuses anti-passback violations; "soft" opens and logs them.
    passback: Literal["hard", "soft"] = "hard"
    # The same code on the same lane within this many seconds is a duplicate
    # scan: scanners often read a phone screen two or three times.
    debounce_s: Annotated[float, Field(ge=0, le=60)] = 3.0


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # None: JSON lines when stdout is not a terminal, console lines when it is.
    json_lines: bool | None = Field(default=None, alias="json")


class MetricsSettings(_Section):
    # "host:port" for the Prometheus exporter, or unset for no exporter.
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\[?[0-9A-Za-z.:-]+\]?:\d{1,5}", value):
            raise ValueError(f"{value!r} is not host:port, for example '127.0.0.1:9464'")
        return value


# --- Devices ------------------------------------------------------------------


class ScannerSettings(_Section):
    port: Annotated[str, Field(min_length=1)]
    baudrate: Annotated[int, Field(gt=0, le=4_000_000)] = 9600
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    # How a code ends: "any" is CR, LF or CRLF; "idle" is idle_ms of silence.
    terminator: Literal["any", "cr", "lf", "crlf", "idle"] = "any"
    # Extra terminators, with escapes such as "#" or "\x03".
    terminators: list[str] = Field(default_factory=list)
    stx_etx: bool = False
    # A partial code with no new byte for this long is discarded, in ms.
    idle_ms: Annotated[int, Field(ge=10, le=60_000)] = 300
    strip_aim: bool = False
    pattern: str = DEFAULT_CODE_PATTERN
    max_length: Annotated[int, Field(ge=1, le=65_536)] = 256
    # Open the port with an exclusive lock so a second process cannot read it.
    exclusive: bool = True

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{value!r} is not a valid regular expression: {exc}") from None
        return value

    @field_validator("terminators")
    @classmethod
    def _check_terminators(cls, value: list[str]) -> list[str]:
        for item in value:
            if not decode_escapes(item):
                raise ValueError("a terminator must not be empty")
        return value

    @property
    def terminator_bytes(self) -> list[bytes]:
        return [decode_escapes(item) for item in self.terminators]


PulseMs = Annotated[int, Field(ge=50, le=10_000)]


class LogRelaySettings(_Section):
    driver: Literal["log"]
    pulse_ms: PulseMs = 500


class SerialRelaySettings(_Section):
    driver: Literal["serial"]
    port: Annotated[str, Field(min_length=1)]
    baudrate: Annotated[int, Field(gt=0, le=4_000_000)] = 9600
    board: Literal["lcus-1", "lcus-2", "lcus-4", "lcus-8"] | None = None
    channel: Annotated[int, Field(ge=1, le=8)] = 1
    on: str | None = None
    off: str | None = None
    pulse_ms: PulseMs = 500
    # Wait after opening the port before the first command, in ms; some boards
    # drop a command that arrives just after the port opens.
    settle_ms: Annotated[int, Field(ge=0, le=5000)] = 100
    # Minimum gap between two commands, in ms; some boards ignore a command
    # that follows another within about 10 ms.
    min_gap_ms: Annotated[int, Field(ge=0, le=5000)] = 20

    @model_validator(mode="after")
    def _check_commands(self) -> SerialRelaySettings:
        if self.board is None:
            if self.on is None or self.off is None:
                raise ValueError("set board (and channel), or both on and off as hex bytes")
            parse_hex_bytes(self.on)
            parse_hex_bytes(self.off)
            return self
        channels = LCUS_BOARDS[self.board]
        if self.channel > channels:
            raise ValueError(
                f"channel {self.channel} does not exist on {self.board} (1..{channels})"
            )
        for name, state in (("on", True), ("off", False)):
            given = getattr(self, name)
            if given is not None and parse_hex_bytes(given) != lcus_frame(self.channel, state):
                expected = lcus_frame(self.channel, state).hex(" ").upper()
                raise ValueError(
                    f"{name} {given!r} does not match {self.board} channel {self.channel}:"
                    f" expected {expected!r} (the last byte is the checksum); remove it"
                )
        return self

    @property
    def on_bytes(self) -> bytes:
        if self.board is not None:
            return lcus_frame(self.channel, True)
        assert self.on is not None
        return parse_hex_bytes(self.on)

    @property
    def off_bytes(self) -> bytes:
        if self.board is not None:
            return lcus_frame(self.channel, False)
        assert self.off is not None
        return parse_hex_bytes(self.off)


class TextRelaySettings(_Section):
    """Boards driven by ASCII commands, such as Numato USB relay modules."""

    driver: Literal["text"]
    port: Annotated[str, Field(min_length=1)]
    baudrate: Annotated[int, Field(gt=0, le=4_000_000)] = 19200
    on: str = r"relay on 0\r"
    off: str = r"relay off 0\r"
    pulse_ms: PulseMs = 500
    settle_ms: Annotated[int, Field(ge=0, le=5000)] = 100
    min_gap_ms: Annotated[int, Field(ge=0, le=5000)] = 20

    @field_validator("on", "off")
    @classmethod
    def _check_command(cls, value: str) -> str:
        if not decode_escapes(value):
            raise ValueError("a relay command must not be empty")
        return value

    @property
    def on_bytes(self) -> bytes:
        return decode_escapes(self.on)

    @property
    def off_bytes(self) -> bytes:
        return decode_escapes(self.off)


class GpioRelaySettings(_Section):
    driver: Literal["gpio"]
    chip: str = "/dev/gpiochip0"
    line: int | str
    active_low: bool = False
    pulse_ms: PulseMs = 500


RelaySettings = Annotated[
    LogRelaySettings | SerialRelaySettings | TextRelaySettings | GpioRelaySettings,
    Field(discriminator="driver"),
]
RELAY_DRIVERS = ("serial", "text", "gpio", "log")


class LaneSettings(_Section):
    name: Annotated[str, Field(pattern=f"^{LANE_NAME_PATTERN}$")]
    direction: Literal["entry", "exit"]
    scanner: ScannerSettings
    relay: RelaySettings
    # Overrides [gate] passback for this lane.
    passback: Literal["hard", "soft"] | None = None


# --- Root ----------------------------------------------------------------------


class GatedConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GATED_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        populate_by_name=True,
    )

    api: ApiSettings
    state: StateSettings = StateSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    gate: GateSettings = GateSettings()
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()
    lanes: Annotated[list[LaneSettings], Field(min_length=1)]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment variables override the file, which arrives as init kwargs.
        return (env_settings, init_settings)

    @field_validator("lanes")
    @classmethod
    def _check_lanes(cls, lanes: list[LaneSettings]) -> list[LaneSettings]:
        names = [lane.name for lane in lanes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"lane names must be unique: {', '.join(duplicates)} repeated")
        ports: dict[str, str] = {}
        for lane in lanes:
            used = [("scanner", lane.scanner.port)]
            if isinstance(lane.relay, SerialRelaySettings | TextRelaySettings):
                used.append(("relay", lane.relay.port))
            for role, port in used:
                owner = f"{lane.name} {role}"
                # Two lanes may drive two channels of one multi-channel relay
                # board: the drivers share the open port. A scanner port is
                # never shared.
                shared_relay = role == "relay" and ports.get(port, "").endswith(" relay")
                if port in ports and not shared_relay:
                    raise ValueError(f"port {port!r} is used by both {ports[port]} and {owner}")
                ports.setdefault(port, owner)
        return lanes


# --- Loading -------------------------------------------------------------------


def load_config(
    path: Path | str,
    *,
    environ: dict[str, str] | None = None,
    require_access_key: bool = True,
) -> GatedConfig:
    """Read, validate and complete a config file; raise ConfigError on any problem.

    ``require_access_key=False`` suits tools that never call the API (such as
    ``gated status``), so they run where only the service can read the key.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found; pass --config PATH"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot be read: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    return config_from_mapping(data, environ=environ, require_access_key=require_access_key)


def config_from_mapping(
    data: dict[str, Any],
    *,
    environ: dict[str, str] | None = None,
    require_access_key: bool = True,
) -> GatedConfig:
    """Validate an already-parsed config mapping; the environment overrides it."""
    env = dict(os.environ if environ is None else environ)
    saved = dict(os.environ)
    try:
        # pydantic-settings reads os.environ, so a given mapping is swapped in.
        if environ is not None:
            os.environ.clear()
            os.environ.update(env)
        config = GatedConfig(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_errors(exc)) from None
    finally:
        if environ is not None:
            os.environ.clear()
            os.environ.update(saved)
    try:
        return _resolve_access_key(config, env)
    except ConfigError:
        if require_access_key:
            raise
        return config


def _resolve_access_key(config: GatedConfig, env: dict[str, str]) -> GatedConfig:
    """Fill api.access_key from access_key_file or the systemd credential."""
    api = config.api
    if api.access_key is not None and api.access_key.get_secret_value():
        return config
    candidates: list[tuple[str, Path]] = []
    if api.access_key_file is not None:
        candidates.append(("api.access_key_file", api.access_key_file))
    elif env.get("CREDENTIALS_DIRECTORY"):
        credential = Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME
        candidates.append((f"systemd credential {CREDENTIAL_NAME!r}", credential))
    for label, key_path in candidates:
        try:
            key = key_path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                [f"{label}: {str(key_path)!r} cannot be read: {exc.strerror}"]
            ) from None
        if not key:
            raise ConfigError([f"{label}: {str(key_path)!r} is empty"])
        new_api = api.model_copy(update={"access_key": SecretStr(key)})
        return config.model_copy(update={"api": new_api})
    raise ConfigError(
        [
            "api.access_key: missing; set api.access_key, api.access_key_file,"
            f" GATED_API__ACCESS_KEY or a systemd credential named {CREDENTIAL_NAME!r}"
        ]
    )


def access_key(config: GatedConfig) -> str:
    """Return the resolved API access key."""
    assert config.api.access_key is not None, "load_config resolves the access key"
    return config.api.access_key.get_secret_value()


# --- Error formatting ----------------------------------------------------------


def _format_location(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    previous: int | str | None = None
    for item in loc:
        # A discriminated union adds the tag ("serial") to the location.
        if previous == "relay" and item in RELAY_DRIVERS:
            previous = item
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(f".{item}" if parts else str(item))
        previous = item
    return "".join(parts) or "(top level)"


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """Return the config model whose keys are at ``loc``, or None if unknown."""
    model: type[BaseModel] | None = GatedConfig
    items = list(loc)
    while items and model is not None:
        item = items.pop(0)
        if isinstance(item, int):
            continue
        field = model.model_fields.get(item)
        if field is None:
            return None
        model = _unwrap_model(field.annotation, items)
    return model


def _unwrap_model(annotation: Any, rest: list[int | str]) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    candidates = [
        arg for arg in get_args(annotation) if isinstance(arg, type) and issubclass(arg, BaseModel)
    ]
    if not candidates:
        for arg in get_args(annotation):
            found = _unwrap_model(arg, rest)
            if found is not None:
                return found
        return None
    if len(candidates) == 1:
        return candidates[0]
    # A discriminated union: the next location item is the tag ("serial").
    tag = rest.pop(0) if rest else None
    for candidate in candidates:
        if get_args(candidate.model_fields["driver"].annotation) == (tag,):
            return candidate
    return None


def _unknown_key_message(loc: tuple[int | str, ...]) -> str:
    model = _model_at(loc[:-1])
    if model is None:
        return "unknown key; remove it or check its spelling"
    allowed = sorted(field.alias or name for name, field in model.model_fields.items())
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key; {hint}allowed: {', '.join(allowed)}"


def _format_input(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_validation_errors(exc: ValidationError) -> list[str]:
    """Turn pydantic's errors into one line each: ``key.path: value problem``."""
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        where = _format_location(error["loc"])
        kind = error["type"]
        ctx = error.get("ctx") or {}
        value = error.get("input")
        if kind == "literal_error":
            allowed = ctx.get("expected", "").replace("'", "").replace(" or ", ", ")
            message = f"{_format_input(value)} is not one of: {allowed}"
        elif kind == "union_tag_invalid":
            allowed = ctx.get("expected_tags", "").replace("'", "")
            message = f"{_format_input(ctx.get('tag'))} is not one of: {allowed}"
        elif kind == "union_tag_not_found":
            message = f"missing required key 'driver' (one of: {', '.join(RELAY_DRIVERS)})"
        elif kind == "extra_forbidden":
            message = _unknown_key_message(error["loc"])
        elif kind == "missing":
            message = "missing required key"
        elif kind == "value_error":
            message = str(ctx.get("error", error["msg"]))
        else:
            message = (
                f"{_format_input(value)} is invalid: {error['msg'][:1].lower()}{error['msg'][1:]}"
            )
        if "secret" in where or "access_key" in where:
            message = message.replace(str(value), "[REDACTED]") if value else message
        lines.append(f"{where}: {message}")
    return lines

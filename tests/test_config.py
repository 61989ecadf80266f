from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gated.config import access_key, lcus_frame, load_config
from gated.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"

MINIMAL = """
[api]
location_id = "demo"
access_key = "k-123"

[[lanes]]
name = "entry-1"
direction = "entry"
[lanes.scanner]
port = "/dev/ttyUSB0"
[lanes.relay]
driver = "log"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gated.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ=environ or {})
    return info.value.problems


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_config_validates(path: Path) -> None:
    config = load_config(path, environ={"GATED_API__ACCESS_KEY": "example-key"})
    assert config.lanes


def test_minimal_config_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), environ={})
    assert access_key(config) == "k-123"
    assert config.api.timeout_s == 5.0
    assert config.api.lookup_timeout_s == 2.0
    assert config.gate.debounce_s == 3.0
    assert config.gate.passback == "hard"
    assert config.state.directory == Path("/var/lib/gated")


def test_direction_error_names_path_value_and_choices(tmp_path: Path) -> None:
    text = MINIMAL.replace('direction = "entry"', 'direction = "sideways"')
    assert problems(tmp_path, text) == ["lanes[0].direction: 'sideways' is not one of: entry, exit"]


def test_unknown_key_is_error(tmp_path: Path) -> None:
    text = MINIMAL.replace("[api]", "[api]\ntimeout = 3")
    (line,) = problems(tmp_path, text)
    assert line.startswith("api.timeout: unknown key; did you mean 'timeout_s'? allowed: ")
    assert "lookup_timeout_s" in line


def test_unknown_relay_key_suggests_driver_keys(tmp_path: Path) -> None:
    relay = 'driver = "serial"\nport = "/dev/ttyUSB1"\nboard = "lcus-1"\nchanel = 1'
    (line,) = problems(tmp_path, MINIMAL.replace('driver = "log"', relay))
    assert line.startswith("lanes[0].relay.chanel: unknown key; did you mean 'channel'?")


def test_unknown_section_suggests_name(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, MINIMAL + "\n[gates]\ndebounce_s = 1\n")
    assert line.startswith("gates: unknown key; did you mean 'gate'?")


def test_access_key_optional_for_local_tools(tmp_path: Path) -> None:
    text = MINIMAL.replace('access_key = "k-123"\n', "")
    config = load_config(write(tmp_path, text), environ={}, require_access_key=False)
    assert config.api.access_key is None


def test_unknown_relay_driver(tmp_path: Path) -> None:
    text = MINIMAL.replace('driver = "log"', 'driver = "warp"')
    (line,) = problems(tmp_path, text)
    assert line.startswith("lanes[0].relay: 'warp' is not one of:")
    assert "serial" in line


def test_pulse_out_of_range(tmp_path: Path) -> None:
    text = MINIMAL.replace('driver = "log"', 'driver = "log"\npulse_ms = 20')
    (line,) = problems(tmp_path, text)
    assert line.startswith("lanes[0].relay.pulse_ms: 20 is invalid")
    assert "50" in line


def test_several_problems_one_line_each(tmp_path: Path) -> None:
    text = MINIMAL.replace('direction = "entry"', 'direction = "up"\ncolour = "red"')
    lines = problems(tmp_path, text)
    assert len(lines) == 2
    assert any(line.startswith("lanes[0].direction:") for line in lines)
    assert any(line.startswith("lanes[0].colour:") for line in lines)


def test_missing_lanes(tmp_path: Path) -> None:
    text = MINIMAL.split("[[lanes]]", maxsplit=1)[0]
    assert problems(tmp_path, text) == ["lanes: missing required key"]


def test_invalid_toml(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, "[api\nlocation_id = 1")
    assert "invalid TOML" in line


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.toml")
    assert "file not found" in info.value.problems[0]


def test_lcus_preset_checksum_mismatch(tmp_path: Path) -> None:
    relay = 'driver = "serial"\nport = "/dev/ttyUSB1"\nboard = "lcus-1"\non = "A0 01 01 A3"'
    (line,) = problems(tmp_path, MINIMAL.replace('driver = "log"', relay))
    assert line.startswith("lanes[0].relay:")
    assert "A0 01 01 A2" in line


def test_lcus_frames() -> None:
    assert lcus_frame(1, True) == bytes.fromhex("A00101A2")
    assert lcus_frame(1, False) == bytes.fromhex("A00100A1")
    assert lcus_frame(2, True) == bytes.fromhex("A00201A3")


def test_raw_relay_needs_both_commands(tmp_path: Path) -> None:
    relay = 'driver = "serial"\nport = "/dev/ttyUSB1"\non = "A0 01 01 A2"'
    (line,) = problems(tmp_path, MINIMAL.replace('driver = "log"', relay))
    assert "on and off" in line


def test_bad_hex(tmp_path: Path) -> None:
    relay = 'driver = "serial"\nport = "/dev/ttyUSB1"\non = "ZZ"\noff = "00"'
    (line,) = problems(tmp_path, MINIMAL.replace('driver = "log"', relay))
    assert "'ZZ' is not hex bytes" in line


def test_same_port_twice(tmp_path: Path) -> None:
    second = MINIMAL.split("[[lanes]]")[1].replace("entry-1", "exit-1").replace('"entry"', '"exit"')
    lines = problems(tmp_path, MINIMAL + "[[lanes]]" + second)
    assert lines == [
        "lanes: port '/dev/ttyUSB0' is used by both entry-1 scanner and exit-1 scanner"
    ]


def test_env_overrides_file(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, MINIMAL),
        environ={"GATED_API__ACCESS_KEY": "from-env", "GATED_API__TIMEOUT_S": "2.5"},
    )
    assert access_key(config) == "from-env"
    assert config.api.timeout_s == 2.5
    assert config.api.location_id == "demo"


def test_access_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n", encoding="utf-8")
    text = MINIMAL.replace('access_key = "k-123"', f'access_key_file = "{key_file}"')
    assert access_key(load_config(write(tmp_path, text), environ={})) == "from-file"


def test_access_key_systemd_credential(tmp_path: Path) -> None:
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "access_key").write_text("from-credential", encoding="utf-8")
    text = MINIMAL.replace('access_key = "k-123"\n', "")
    config = load_config(write(tmp_path, text), environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert access_key(config) == "from-credential"


def test_access_key_missing(tmp_path: Path) -> None:
    text = MINIMAL.replace('access_key = "k-123"\n', "")
    (line,) = problems(tmp_path, text)
    assert line.startswith("api.access_key: missing")


def test_secret_value_not_echoed(tmp_path: Path) -> None:
    text = MINIMAL.replace('access_key = "k-123"', "access_key = 12345678")
    for line in problems(tmp_path, text):
        assert "12345678" not in line


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gated", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_cli_exit_78(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace('direction = "entry"', 'direction = "sideways"'))
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 78
    assert "lanes[0].direction: 'sideways' is not one of: entry, exit" in result.stderr


def test_run_cli_invalid_config_exit_78(tmp_path: Path) -> None:
    path = write(tmp_path, "not toml at all [")
    result = run_cli("run", "--config", str(path))
    assert result.returncode == 78
    assert "invalid TOML" in result.stderr


def test_check_config_cli_valid(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(write(tmp_path, MINIMAL)))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_demo_config_file_matches_template() -> None:
    from gated.demo import DEMO_CONFIG_TEMPLATE

    shipped = (CONFIG_DIR / "demo.toml").read_text(encoding="utf-8")
    body = "\n".join(line for line in shipped.splitlines() if not line.startswith("#"))
    template_keys = [line.split("=")[0].strip() for line in DEMO_CONFIG_TEMPLATE.splitlines()]
    shipped_keys = [line.split("=")[0].strip() for line in body.splitlines()]
    assert shipped_keys == template_keys


def test_two_lanes_share_relay_board(tmp_path: Path) -> None:
    relay = 'driver = "serial"\nport = "/dev/ttyUSB9"\nboard = "lcus-2"\nchannel = {channel}'
    first = MINIMAL.replace('driver = "log"', relay.format(channel=1))
    second = (
        MINIMAL.split("[[lanes]]")[1]
        .replace("entry-1", "exit-1")
        .replace('"entry"', '"exit"')
        .replace("/dev/ttyUSB0", "/dev/ttyUSB2")
        .replace('driver = "log"', relay.format(channel=2))
    )
    config = load_config(write(tmp_path, first + "[[lanes]]" + second), environ={})
    assert [lane.relay.port for lane in config.lanes] == ["/dev/ttyUSB9", "/dev/ttyUSB9"]  # type: ignore[union-attr]

"""The systemd unit, sysusers and udev files shipped in systemd/."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gated.config import CREDENTIAL_NAME, DEFAULT_CONFIG_PATH, RuntimeSettings, StateSettings

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT_PATH = SYSTEMD_DIR / "gated.service"
SYSUSERS_PATH = SYSTEMD_DIR / "gated.sysusers.conf"
UDEV_RULES_PATH = SYSTEMD_DIR / "99-gated-scanner.rules"

# Highest accepted `systemd-analyze security` exposure, on its 0 to 10 scale.
MAX_EXPOSURE = 2.0
# Deadline of one systemd-analyze or systemd-sysusers run, in seconds.
TOOL_TIMEOUT_S = 60

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """Parse a unit file into section -> key -> every value assigned, in order.

    A list per key, because systemd lets keys such as DeviceAllow= repeat.
    Line continuations are rejected because the shipped files do not use them.
    """
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"line {number}: continuation lines are not supported"
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"line {number}: assignment before the first section"
        key, sep, value = line.partition("=")
        assert sep, f"line {number}: not KEY=VALUE: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def service(unit: Unit) -> dict[str, list[str]]:
    return unit["Service"]


def only(values: dict[str, list[str]], key: str) -> str:
    """Return the single value of key, failing if it is missing or set twice."""
    assert key in values, f"{key}= is missing"
    assert len(values[key]) == 1, f"{key}= is set {len(values[key])} times"
    return values[key][0]


# --- Parsing the unit ---------------------------------------------------------------


def test_parser_keeps_repeated_keys() -> None:
    parsed = parse_unit("[Service]\n# comment\nDeviceAllow=a rw\nDeviceAllow=b r\nUser=x\n")

    assert parsed == {"Service": {"DeviceAllow": ["a rw", "b r"], "User": ["x"]}}


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("ExecStart", f"/opt/gated/bin/gated run --config {DEFAULT_CONFIG_PATH}"),
        ("WatchdogSec", "30"),
        ("Restart", "on-failure"),
        ("RestartSec", "2"),
        ("RestartPreventExitStatus", "78"),
        ("TimeoutStopSec", "15"),
        ("User", "gated"),
        ("Group", "gated"),
        ("UMask", "0077"),
        ("DevicePolicy", "closed"),
        ("LoadCredential", f"{CREDENTIAL_NAME}:/etc/gated/access_key"),
        ("StateDirectory", StateSettings().directory.name),
        ("RuntimeDirectory", RuntimeSettings().directory.name),
    ],
)
def test_service_key(service: dict[str, list[str]], key: str, expected: str) -> None:
    assert only(service, key) == expected


def test_directories_match_config_defaults() -> None:
    assert StateSettings().directory == Path("/var/lib") / "gated"
    assert RuntimeSettings().directory == Path("/run") / "gated"


@pytest.mark.parametrize(
    "key",
    [
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateUsers",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "RestrictNamespaces",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ],
)
def test_hardening_enabled(service: dict[str, list[str]], key: str) -> None:
    assert only(service, key) == "yes"


def test_hardening_values(service: dict[str, list[str]]) -> None:
    assert only(service, "ProtectSystem") == "strict"
    assert only(service, "ProtectProc") == "invisible"
    assert only(service, "ProcSubset") == "pid"
    assert only(service, "SystemCallArchitectures") == "native"
    assert only(service, "CapabilityBoundingSet") == ""
    assert only(service, "AmbientCapabilities") == ""
    assert service["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]


def test_devices_allowed(service: dict[str, list[str]]) -> None:
    assert service["DeviceAllow"] == ["char-ttyUSB rw", "char-ttyACM rw", "char-gpiochip rw"]
    # PrivateDevices=yes would hide the serial ports the daemon opens.
    assert service.get("PrivateDevices", ["no"]) == ["no"]


def test_network_reaches_api(service: dict[str, list[str]]) -> None:
    families = only(service, "RestrictAddressFamilies").split()

    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert "PrivateNetwork" not in service
    assert "IPAddressDeny" not in service


def test_starts_without_network_online(unit: Unit) -> None:
    # Gates work offline from the cache, so boot must not wait for the network.
    dependencies = unit["Unit"].get("Wants", []) + unit["Unit"].get("Requires", [])

    assert not any("network-online.target" in value for value in dependencies)


def test_enabled_at_boot(unit: Unit) -> None:
    assert only(unit["Install"], "WantedBy") == "multi-user.target"


# --- Users and groups ---------------------------------------------------------------


def sysusers_lines() -> list[list[str]]:
    lines = []
    for raw in SYSUSERS_PATH.read_text(encoding="utf-8").splitlines():
        if raw.strip() and not raw.lstrip().startswith("#"):
            lines.append(re.findall(r'"[^"]*"|\S+', raw))
    return lines


def test_sysusers_creates_service_user(service: dict[str, list[str]]) -> None:
    users = [line[1] for line in sysusers_lines() if line[0] == "u"]

    assert users == [only(service, "User")]


def test_supplementary_groups_exist(service: dict[str, list[str]]) -> None:
    # systemd refuses to start a unit that names a missing group. Debian ships
    # dialout; every other group must come from the sysusers file.
    created = {line[1] for line in sysusers_lines() if line[0] == "g"}
    memberships = {line[2] for line in sysusers_lines() if line[0] == "m" and line[1] == "gated"}
    groups = set(only(service, "SupplementaryGroups").split())

    assert groups == {"dialout", "gpio"}
    assert groups - {"dialout"} <= created
    assert groups <= memberships


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers missing")
def test_sysusers_applies(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\ndialout:x:20:\n")

    result = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS_PATH)],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    passwd = {
        line.split(":")[0]: line.split(":") for line in (etc / "passwd").read_text().splitlines()
    }
    groups = {
        line.split(":")[0]: line.split(":") for line in (etc / "group").read_text().splitlines()
    }
    assert passwd["gated"][5] == "/var/lib/gated"
    assert "gated" in groups["dialout"][3].split(",")
    assert "gated" in groups["gpio"][3].split(",")


# --- udev rule -------------------------------------------------------------------------


# One `KEY{attr}op"value"` pair of a udev rule, with the comma after it.
UDEV_PAIR = r'\s*([A-Za-z_]+(?:\{[^}]*\})?)\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*,?'


def udev_rules() -> list[dict[str, str]]:
    """Parse each rule into ``KEY op`` -> value, for example ``'GROUP=' -> 'dialout'``."""
    rules = []
    for raw in UDEV_RULES_PATH.read_text(encoding="utf-8").splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        pairs = re.findall(UDEV_PAIR, raw)
        rebuilt = ", ".join(f'{key}{op}"{value}"' for key, op, value in pairs)
        assert rebuilt == raw.strip().rstrip(","), f"unparsed text in udev rule: {raw!r}"
        rules.append({f"{key}{op}": value for key, op, value in pairs})
    return rules


def test_udev_rules_shape() -> None:
    rules = udev_rules()

    assert rules
    for rule in rules:
        assert rule["SUBSYSTEM=="] == "tty"
        assert {"ATTRS{idVendor}==", "ATTRS{idProduct}==", "ATTRS{serial}=="} <= rule.keys()
        assert rule["SYMLINK+="].startswith("gated/")
        assert rule["GROUP="] == "dialout"
        assert rule["ENV{ID_MM_DEVICE_IGNORE}="] == "1"


# --- systemd-analyze ---------------------------------------------------------------------


def run_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_security_exposure() -> None:
    result = run_analyze("security", "--offline=true", "--no-pager", str(UNIT_PATH))
    if "--offline" in result.stderr and result.returncode != 0:
        pytest.skip(f"systemd-analyze has no offline mode: {result.stderr.strip()}")

    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for gated\.service: (\d+\.\d)", result.stdout)
    assert match, result.stdout[-500:]
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_verify_reports_nothing(tmp_path: Path) -> None:
    # verify checks that ExecStart= exists, so the copy runs `true` instead,
    # with the same arguments.
    true_path = shutil.which("true")
    assert true_path is not None
    copy = tmp_path / "gated.service"
    copy.write_text(UNIT_PATH.read_text().replace("/opt/gated/bin/gated", true_path))

    result = run_analyze("verify", "--man=no", str(copy))

    assert result.returncode == 0, result.stderr
    # Unknown keys and invalid values are only warnings on stderr, each naming
    # the unit. Other lines are about the host's own units and are ignored.
    about_unit = [line for line in result.stderr.splitlines() if "gated.service" in line]
    assert about_unit == []

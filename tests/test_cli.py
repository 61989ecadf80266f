"""The command line as an operator runs it: exit statuses and messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gated", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_usage_error_exit_64() -> None:
    result = run_cli("frobnicate")
    assert result.returncode == 64
    assert "invalid choice" in result.stderr


def test_missing_gpio_binding_exit_69(tmp_path: Path) -> None:
    config = tmp_path / "gated.toml"
    config.write_text(
        '[api]\nlocation_id = "demo"\naccess_key = "k-123"\n'
        'base_url = "http://127.0.0.1:9/v1/access/parking"\n'
        f'[state]\ndirectory = "{tmp_path / "state"}"\n'
        f'[runtime]\ndirectory = "{tmp_path / "run"}"\n'
        "[logging]\njson = true\n"
        '[[lanes]]\nname = "entry-1"\ndirection = "entry"\n'
        '[lanes.scanner]\nport = "/dev/null"\n'
        '[lanes.relay]\ndriver = "gpio"\nline = 17\n',
        encoding="utf-8",
    )
    result = run_cli("run", "--config", str(config))

    assert result.returncode == 69
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    failure = [e for e in events if e["event"] == "daemon.device_unavailable"]
    assert len(failure) == 1
    assert "gpiod" in failure[0]["error"]
    assert [e for e in events if e["level"] == "error"] == failure
    assert not (tmp_path / "state").exists(), "no state is opened before the relays are safe"

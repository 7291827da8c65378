from __future__ import annotations

import time
from pathlib import Path

import pytest

from mailtls_tasks.commands import OUTPUT_CAP, run_command
from mailtls_tasks.errors import CommandTimeout, ConfigError


def test_runs_argv_without_shell(tmp_path: Path) -> None:
    res = run_command("/bin/echo hello *", timeout=5)
    assert res.ok and res.output_tail.strip() == "hello *"  # no glob expansion: no shell


def test_nonzero_exit_reported_with_tail() -> None:
    res = run_command("/bin/ls /nonexistent-mailtls", timeout=5)
    assert not res.ok and res.returncode != 0
    assert "nonexistent-mailtls" in res.summary()


def test_timeout_kills_whole_process_group(tmp_path: Path) -> None:
    script = tmp_path / "forker"
    marker = tmp_path / "child-alive"
    script.write_text(f"#!/bin/sh\n(sleep 2; touch {marker}) &\nsleep 30\n")
    script.chmod(0o755)
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout, match="process group was killed"):
        run_command(str(script), timeout=0.5)
    assert time.monotonic() - t0 < 5
    time.sleep(2.5)
    assert not marker.exists(), "the forked child survived the timeout"


def test_output_capped(tmp_path: Path) -> None:
    script = tmp_path / "loud"
    script.write_text("#!/bin/sh\nhead -c 100000 /dev/zero | tr '\\0' 'a'\necho END\n")
    script.chmod(0o755)
    res = run_command(str(script), timeout=5)
    assert len(res.output_tail) <= OUTPUT_CAP and res.output_tail.rstrip().endswith("END")


def test_metacharacters_refused_at_run_time_too() -> None:
    with pytest.raises(ConfigError, match="metacharacter"):
        run_command("echo hi; rm -rf /", timeout=1)

"""`make demo` runs for real and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.services import REPO, require

pytestmark = pytest.mark.e2e


def test_demo_shows_all_four_outcomes_and_cleans_up() -> None:
    for binary in ("redis-server", "postfix", "dovecot"):
        require(binary)
    p = subprocess.run([sys.executable, "-m", "demo"], capture_output=True, text=True, cwd=REPO, timeout=300)
    out = p.stdout
    assert p.returncode == 0, out[-3000:] + p.stderr[-3000:]
    outcomes = [ln.split()[1] for ln in out.splitlines() if ln.strip().startswith("outcome")]
    assert outcomes == ["deployed", "deployed", "unchanged", "rejected", "rolled_back"], out
    assert out.count("(NEW cert)") == 12  # six listeners after step 1, six after step 4
    assert "nothing left running" in out
    tmp = next(ln for ln in out.splitlines() if "temp dir" in ln).split("temp dir ")[1].rstrip(")")
    leftover = subprocess.run(["pgrep", "-f", tmp], capture_output=True, text=True).stdout.split()
    assert leftover == [], f"processes still running from {tmp}: {leftover}"

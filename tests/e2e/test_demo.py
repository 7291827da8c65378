"""`make demo` runs for real, shows what it claims, and leaves nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.support.services import REPO, require

pytestmark = pytest.mark.e2e


def _section(out: str, title: str) -> str:
    start = out.index(title)
    end = out.find("\n== ", start + 1)
    return out[start:end if end > 0 else None]


def test_demo_deploys_rolls_out_halts_audits_and_cleans_up() -> None:
    for binary in ("redis-server", "postfix", "dovecot", "unshare"):
        require(binary)
    p = subprocess.run([sys.executable, "-m", "demo"], capture_output=True, text=True, cwd=REPO, timeout=300)
    out = p.stdout
    assert p.returncode == 0, out[-3000:] + p.stderr[-3000:]
    # every command is shown as run, with its exit code
    assert "$ mailtls deploy smtp --cert fullchain.pem --key privkey.pem" in out
    assert "say which: mx1/smtp, mx2/smtp" in _section(out, "== 1.")
    assert "mx1/smtp: DEPLOYED" in _section(out, "== 2.") and "(exit 0)" in _section(out, "== 2.")
    assert "mx1/smtp: UNCHANGED" in _section(out, "== 3.")
    s4 = _section(out, "== 4.")
    assert "mx1/smtp: REJECTED" in s4 and "does not match" in s4 and "(exit 2)" in s4
    s5 = _section(out, "== 5.")
    waves = re.findall(r"^\s+(\d)\s+(mx\d/\w+)\s+(\w+)", s5, re.M)
    assert [w for w, _, _ in waves].count("1") == 1 and len(waves) == 4  # a canary, then the rest
    assert {o for _, _, o in waves} <= {"deployed", "unchanged"} and "DONE" in s5
    assert s5.count("(NEW cert)") == 4  # every listener of both hosts
    s6 = _section(out, "== 6.")
    assert "HALTED" in s6 and re.search(r"mx2/imap\s+rolled_back", s6) and "(exit 3)" in s6
    assert re.search(r"mx1 imaps .*\(THIRD cert\)", s6) and re.search(r"mx2 imaps .*\(NEW cert\)", s6)
    s7 = _section(out, "== 7.")
    assert re.search(r"mx2/smtp\s+CRITICAL\s+5\.0", s7) and "changed by hand" in s7 and "(exit 2)" in s7
    assert re.search(r"mx1/smtp\s+OK", s7)
    assert "nothing left running" in out
    tmp = next(ln for ln in out.splitlines() if "temp dir" in ln).split("temp dir ")[1].rstrip(")")
    leftover = subprocess.run(["pgrep", "-f", tmp], capture_output=True, text=True).stdout.split()
    assert leftover == [], f"processes still running from {tmp}: {leftover}"

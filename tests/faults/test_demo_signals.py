"""`make demo DEMO_ARGS=--keep` stopped as systemd, `kill` or a closed terminal stop
it -- SIGTERM to make (which passes it on), SIGHUP to the whole process group -- cleans
up as Ctrl-C does: no Redis, Postfix, Dovecot, worker or Flower left running, and no
temp dir (it holds the pipeline's and the hosts' private keys)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.services import REPO

pytestmark = pytest.mark.integration
READY = "Ctrl-C stops everything."


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, start time, cmdline + environ) of every process we can read."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            text = (d / "cmdline").read_bytes() + b"\0" + (d / "environ").read_bytes()
        except OSError:
            continue
        out[int(d.name)] = (int(fields[1]), fields[19], text.decode(errors="replace"))
    return out


def _belonging(root_pid: int, marker: str) -> dict[int, str]:
    """The demo's processes: make's descendants, and anything naming its temp dir."""
    procs = _processes()
    mine = {root_pid}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in procs.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                grew = True
    mine |= {pid for pid, (_, _, text) in procs.items() if marker in text and pid != os.getpid()}
    return {pid: procs[pid][1] for pid in mine if pid in procs}


@pytest.mark.parametrize(("sig", "to_group"), [(signal.SIGTERM, False), (signal.SIGHUP, True)],
                         ids=["SIGTERM-to-make", "SIGHUP-to-the-group"])
def test_a_kept_demo_stopped_by_a_signal_leaves_nothing_behind(tmp_path: Path, sig: signal.Signals,
                                                               to_group: bool) -> None:
    log = tmp_path / "demo.log"
    proc = subprocess.Popen(["make", "-s", "demo", "DEMO_ARGS=--keep"], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while READY not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the demo never got to its --keep pause"
            time.sleep(0.5)
        found = re.search(r"temp dir (/\S+mailtls-demo-\S+?)\)", log.read_text())
        assert found, log.read_text()[:2000]
        root = Path(found.group(1))
        before = _belonging(proc.pid, str(root))
        procs = _processes()
        kinds = " ".join(procs[p][2].split("\0\0")[0].replace("\0", " ") for p in before if p in procs)
        for daemon in ("redis-server", "dovecot", "master", "mailtls_tasks.cli worker", "flower", "make"):
            assert daemon in kinds, f"the demo's {daemon} was not found among its processes: {kinds}"
        assert root.is_dir()

        if to_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        assert proc.wait(120) != 0
        time.sleep(1)  # the last stopped processes to be reaped by init

        now = _processes()
        left = {pid: now[pid][2].split("\0")[0] for pid, start in before.items()
                if pid in now and now[pid][1] == start}
        assert left == {}, f"{sig.name} left these running: {left}"
        assert not root.exists(), f"{sig.name} left the temp dir {root} (private keys in it)"
        assert "nothing left running" in log.read_text()
    finally:
        if proc.poll() is None:  # failed before the signal: stop it the way that cleans up
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)

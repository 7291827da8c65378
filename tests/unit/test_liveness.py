"""Process tokens: what "the runner of this deploy is still alive" means."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from mailtls_tasks.core.journal import process_alive, process_token


def test_own_token_is_alive_and_a_reused_pid_is_not() -> None:
    tok = process_token()
    assert process_alive(tok)
    boot, pid, start = tok.split(":")
    assert not process_alive(f"{boot}:{pid}:{int(start) + 1}")  # same pid, another process
    assert not process_alive(f"another-boot:{pid}:{start}")     # same pid, before a reboot
    assert not process_alive(None) and not process_alive("garbage")


def test_a_killed_unreaped_child_is_dead() -> None:
    """A zombie (killed, parent not yet reaping it) still has /proc/PID/stat: not alive."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    tok = process_token(child.pid)
    assert process_alive(tok)
    os.kill(child.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while process_alive(tok) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.path.exists(f"/proc/{child.pid}/stat")  # not reaped yet: a zombie
    assert not process_alive(tok)
    child.wait()

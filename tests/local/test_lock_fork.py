"""A file lock must not outlive its holder in a forked child.

The worker's recovery sweep is a thread of Celery's main process and holds file
locks (through a whole reload and verify when it rolls a dead deploy back), while
billiard forks pool children from that same process: at start, and whenever a child
is replaced. A flock belongs to the open file description, which a child inherits;
the child would keep the file locked after the sweep let go, every step of the
deploy owning it would fail "busy", and recovery would take it for alive.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from mailtls_tasks.core.journal import Journal
from mailtls_tasks.errors import TargetBusy


def _child_that_lives_on() -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only waits to be killed
        time.sleep(60)
        os._exit(0)
    return pid


def _reap(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_a_lock_released_by_its_holder_is_free_though_a_child_forked_while_it_was_held(tmp_path: Path) -> None:
    j = Journal(str(tmp_path / "state"))
    real = str(tmp_path / "cert.pem")
    with j.lock_files([real]):
        pid = _child_that_lives_on()
    try:
        # a new open file description: conflicts with any holder; the child lets go of
        # its copy first thing, but on its own schedule
        with j.lock_files([real], timeout=5):
            pass
    finally:
        _reap(pid)


def test_a_thread_holding_locks_while_another_thread_forks(tmp_path: Path) -> None:
    """The worker's case: the sweep thread holds, the main thread forks a pool child."""
    j = Journal(str(tmp_path / "state"))
    reals = [str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")]
    held, release = threading.Event(), threading.Event()

    def sweep() -> None:
        with j.lock_files(reals):
            held.set()
            release.wait(30)

    t = threading.Thread(target=sweep)
    t.start()
    assert held.wait(10)
    pid = _child_that_lives_on()
    try:
        with pytest.raises(TargetBusy):  # still the sweep's while it holds them
            with j.lock_files(reals):
                pass
        release.set()
        t.join(10)
        with j.lock_files(reals, timeout=5):
            pass
    finally:
        release.set()
        _reap(pid)

"""Running the operator's reload/validate commands: argv only, never a shell.

Part of the shared vocabulary at the bottom of the package (with ``errors`` and
``ids``): the daemons, the core and the CLI's early start all run commands, and the
rule that a command string never carries a shell metacharacter lives with the runner
that relies on it. Nothing here knows a daemon, a target or a file it writes.

The command string comes from the host's config (already checked for shell
metacharacters at load time) and is split with ``shlex``. The child gets its own
session so that on timeout the whole process group is killed -- a reload script that
forks a helper must not outlive its timeout. Output is captured to a temporary file,
not a pipe, so a daemon the command starts (``postfix start``) cannot hold the pipe
open and hang us; only the last bytes are kept.
"""

from __future__ import annotations

import os
import select
import shlex
import signal
import subprocess
import tempfile
import time
from typing import NamedTuple

from .errors import CommandFailed, CommandTimeout, ConfigError

OUTPUT_CAP = 4096

# Rejected anywhere in a command string: the shell would give them meaning, and we
# never run a shell -- refusing them makes a mistaken config fail loudly at load time
# instead of running something the operator did not mean.
SHELL_METACHARACTERS = frozenset(";|&$`(){}<>\\\"'\n\r\x00")


_CHECKED: set[str] = set()  # a thousand targets name the same few commands


def check_command(value: str, field: str) -> str:
    """Reject shell metacharacters and unparsable strings; return the string as given."""
    if value in _CHECKED:
        return value
    bad = sorted({c for c in value if c in SHELL_METACHARACTERS})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise ValueError(f"{field}: shell metacharacter(s) {shown} are not allowed (no shell is used)")
    if value.strip() and not shlex.split(value):
        raise ValueError(f"{field}: empty command")
    _CHECKED.add(value)
    return value


class CommandResult(NamedTuple):  # not a dataclass: this module loads before the command starts
    argv: tuple[str, ...]
    returncode: int
    output_tail: str
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def summary(self) -> str:
        tail = self.output_tail.strip().splitlines()[-3:]
        shown = " | ".join(tail)
        return f"`{' '.join(self.argv)}` exited {self.returncode}" + (f": {shown}" if shown else "")


def parse_command(command: str, field: str = "command") -> list[str]:
    try:
        check_command(command, field)
        argv = shlex.split(command)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not argv:
        raise ConfigError(f"{field}: empty command")
    return argv


class Running:
    """A command started and not yet waited for: `mailtls deploy --local` starts the
    validate_command as soon as it has read the targets file, and the validate step
    collects the verdict (``wait``) or, when the deploy ends before it, kills it
    (``cancel``)."""

    def __init__(self, command: str, field: str = "command") -> None:
        self.command, self.field = command, field
        self.argv = parse_command(command, field)
        self.started = time.monotonic()
        self._out = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._out,
                                         stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        except OSError as err:
            self._out.close()
            raise CommandFailed(f"{field}: cannot run `{self.argv[0]}`: {err.strerror or err}") from None

    def age(self) -> float:
        return time.monotonic() - self.started

    @property
    def done(self) -> bool:
        """Waited for or cancelled: its verdict is no longer to be had."""
        return self._out.closed

    def wait(self, timeout: float) -> CommandResult:
        """Its result; CommandTimeout once ``timeout`` seconds have passed since it started."""
        try:
            rc = _wait(self.proc, max(0.0, timeout - self.age()))
        except subprocess.TimeoutExpired:
            self.cancel()
            raise CommandTimeout(
                f"{self.field}: `{' '.join(self.argv)}` did not finish within {timeout:g}s; "
                "its process group was killed"
            ) from None
        except BaseException:
            self.cancel()  # SIGTERM or Ctrl-C while waiting: never leave it running behind us
            raise
        with self._out:
            self._out.seek(0, os.SEEK_END)
            size = self._out.tell()
            self._out.seek(max(0, size - OUTPUT_CAP))
            tail = self._out.read().decode("utf-8", "replace")
        return CommandResult(tuple(self.argv), rc, tail, int(self.age() * 1000))

    def cancel(self) -> None:
        """Kill its process group if it still runs (a no-op once waited for)."""
        if self.proc.returncode is None:
            _kill_group(self.proc)
        self._out.close()


def run_command(command: str, *, timeout: float, field: str = "command") -> CommandResult:
    """Run ``command``; raise CommandTimeout if it outlives ``timeout`` seconds.

    A non-zero exit is returned, not raised: the caller knows whether that means
    ``rejected`` (validate) or ``rolled back`` (reload).
    """
    return Running(command, field).wait(timeout)


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Wake the moment the child exits: ``Popen.wait(timeout)`` polls with sleeps of
    up to 50 ms, which every validate and reload would pay. A pidfd (Linux 5.3+)
    becomes readable when the process exits; without one, fall back to polling."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return proc.wait(timeout=timeout)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(int(timeout * 1000) + 1):
            raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        os.close(fd)
    return proc.wait()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()

"""Running the operator's reload/validate commands: argv only, never a shell.

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
from dataclasses import dataclass

from ..errors import CommandFailed, CommandTimeout, ConfigError
from .config import check_command

OUTPUT_CAP = 4096


@dataclass(frozen=True)
class CommandResult:
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


def run_command(command: str, *, timeout: float, field: str = "command") -> CommandResult:
    """Run ``command``; raise CommandTimeout if it outlives ``timeout`` seconds.

    A non-zero exit is returned, not raised: the caller knows whether that means
    ``rejected`` (validate) or ``rolled back`` (reload).
    """
    argv = parse_command(command, field)
    start = time.monotonic()
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as err:
            raise CommandFailed(f"{field}: cannot run `{argv[0]}`: {err.strerror or err}") from None
        try:
            rc = _wait(proc, timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise CommandTimeout(
                f"{field}: `{' '.join(argv)}` did not finish within {timeout:g}s; "
                "its process group was killed"
            ) from None
        except BaseException:
            _kill_group(proc)  # SIGTERM or Ctrl-C while waiting: never leave it running behind us
            raise
        out.seek(0, os.SEEK_END)
        size = out.tell()
        out.seek(max(0, size - OUTPUT_CAP))
        tail = out.read().decode("utf-8", "replace")
    return CommandResult(tuple(argv), rc, tail, int((time.monotonic() - start) * 1000))


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

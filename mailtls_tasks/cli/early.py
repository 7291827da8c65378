"""The early start of a local deploy's ``validate_command``, before anything heavy
is imported (``mailtls_tasks.cli.main`` calls ``start_early`` first thing).

`postfix check` takes about 0.4 s and checks the daemon's configuration, which a
deploy never changes; the command line's own start (click, the config model, the
X.509 code: 0.2 s) can run beside it instead of before it. Only ``deploy ... --local``
does this, and only as a guess: the deploy uses the early run only if the validated
targets file gives the target the very same command (``deploy._config_and_early_validate``,
``core.steps.validate``); otherwise it is killed and the validate step runs the
command itself. Every exit kills an early run nobody collected.

This module imports nothing of the CLI (and nothing heavy at all) at import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..commands import Running

# Options of `mailtls deploy` that take a value (the rest are flags): enough to find
# the TARGET argument and --config without loading click. A command line this does
# not understand simply gets no early start.
_VALUED = frozenset({"--cert", "--key", "--chain", "--config", "--deploy-id", "--broker", "--pipeline", "--wait"})
_FLAGS = frozenset({"--local", "--force", "--json", "--no-wait", "-v", "--verbose"})


class Early:
    """What ``start_early`` read and started, for the deploy command to take."""

    def __init__(self, config: str | None, target: str, raw: Any, source: str, running: Any) -> None:
        self.config, self.target, self.raw, self.source, self.running = config, target, raw, source, running


_early: Early | None = None


def _peek(argv: list[str]) -> tuple[str | None, str] | None:
    """(--config, TARGET) of a `deploy --local` command line; None for anything else."""
    args = list(argv)
    while args and args[0] in ("-v", "--verbose"):
        args.pop(0)
    if not args or args[0] != "deploy" or "--local" not in args:
        return None
    config, target, i = None, None, 1
    while i < len(args):
        a = args[i]
        name, eq, value = a.partition("=")
        if name in _VALUED:
            if not eq:
                i += 1
                if i >= len(args):
                    return None
                value = args[i]
            if name == "--config":
                config = value
        elif a.startswith("-"):
            if a not in _FLAGS:
                return None
        elif target is None:
            target = a
        else:
            return None
        i += 1
    return (config, target) if target else None


_starting = False
_pending: int | None = None


def _exit_on_signal(signum: int, frame: object) -> None:
    """Until the deploy installs its own handlers (``core.local``): unwind, so the
    ``finally`` of ``main`` kills an early run instead of leaving it behind us. While the
    run is being started the signal waits until it is recorded in ``_early``: raised
    between the command's start and that assignment, the run was nobody's to kill (its
    output kept the caller's pipes open until it ended by itself)."""
    global _pending
    if _starting:
        _pending = signum
        return
    raise SystemExit(128 + signum)


def start_early(argv: list[str]) -> None:
    """Read the targets file and start the target's validate_command, if this is a
    local deploy and the file names one. Never raises: the deploy reports problems
    (a signal meanwhile unwinds it, as ``_exit_on_signal`` says)."""
    global _early, _starting
    peeked = _peek(argv)
    if peeked is None:
        return
    from ..core.configfile import read_config
    from ..errors import MailTLSError

    config, target = peeked
    import signal

    for sig in (signal.SIGTERM, signal.SIGHUP):  # from here on, a signal must not orphan the run
        signal.signal(sig, _exit_on_signal)
    try:
        raw, source = read_config(config)
    except (MailTLSError, OSError):  # the deploy reads the file again and says what is wrong
        return
    _starting = True
    try:
        _early = Early(config, target, raw, source, start_validate(raw, target))
    finally:
        _starting = False
    if _pending is not None:
        raise SystemExit(128 + _pending)


def start_validate(raw: Any, target: str) -> Running | None:
    """The validate_command the unvalidated targets file ``raw`` gives ``target``,
    started; None if it names none or it cannot start (the validate step then runs it
    and says why)."""
    from ..commands import Running
    from ..core.configfile import validate_command_of
    from ..errors import MailTLSError

    command = validate_command_of(raw, target)
    if not command:
        return None
    try:
        return Running(command, "validate_command")
    except (MailTLSError, OSError):
        return None


def take_early(config: str | None, target: str) -> tuple[Any, str, Any] | None:
    """(raw file, its path, the running command or None) if ``start_early`` read the same
    file for the same target; else None, after killing whatever it started."""
    global _early
    if _early is not None and (_early.config, _early.target) == (config, target):
        early, _early = _early, None
        return early.raw, early.source, early.running
    cancel_early()
    return None


def cancel_early() -> None:
    """Kill an early run nobody took (the command ended before its deploy ran)."""
    global _early
    early, _early = _early, None
    if early is not None and early.running is not None:
        early.running.cancel()

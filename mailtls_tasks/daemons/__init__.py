"""The mail daemons: one module each (``postfix``, ``dovecot``, ``exim``), behind ``Daemon``.

What lives here: everything that differs from one daemon to the next -- the
contract's default paths and commands, the listeners a daemon usually has and the
protocol each speaks, the file layouts it accepts, its config test and reload, and
(next) reading its own configuration. What does not: targets, the journal, the
steps, anything that writes a file. A daemon module takes plain values (paths,
commands, ports) and uses the shared command runner; it sits below the core, which
asks it instead of keeping tables keyed by mode.

A new daemon is one new module here with a ``DAEMON``, listed in ``_ALL`` below.
"""

from __future__ import annotations

from . import dovecot, exim, postfix
from .interface import ALL_LAYOUTS, CommandDaemon, Daemon, Layout, UsualListener

__all__ = ["ALL_LAYOUTS", "DAEMONS", "DEFAULT_MODE", "MODES", "CommandDaemon", "Daemon", "Layout", "UsualListener",
           "get", "port_protocols"]

_ALL: tuple[Daemon, ...] = (postfix.DAEMON, dovecot.DAEMON, exim.DAEMON)
DAEMONS: dict[str, Daemon] = {d.name: d for d in _ALL}
MODES: tuple[str, ...] = tuple(DAEMONS)
DEFAULT_MODE = "postfix"  # the contract: an unset mode means Postfix


def get(mode: str) -> Daemon:
    """The daemon of a target's ``mode``; ValueError naming the known modes otherwise."""
    try:
        return DAEMONS[mode]
    except (KeyError, TypeError):
        raise ValueError(f"mode: unknown mode {mode!r} (expected {', '.join(repr(m) for m in MODES[:-1])} or "
                         f"{MODES[-1]!r})") from None


def port_protocols() -> dict[int, str]:
    """Well-known port -> the protocol to probe it with, from every daemon's listeners
    (a target's ``protocol = "auto"`` resolves through it, whatever its mode). Two
    daemons giving one port two protocols would make "auto" a guess: refused."""
    out: dict[int, str] = {}
    for d in _ALL:
        for li in d.listeners:
            if out.setdefault(li.port, li.protocol) != li.protocol:
                raise AssertionError(f"port {li.port}: {d.name} speaks {li.protocol}, another daemon {out[li.port]}")
    return out

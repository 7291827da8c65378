"""What every daemon module provides: the one interface the core asks.

Modelled on certbot's installer contract (one plugin per server, named operations)
cut down to what a certificate deploy needs: the defaults of the connector contract,
the listeners a daemon usually has and how each speaks TLS, the file layouts it can
be given, and three operations, ``config_test``, ``reload`` and ``check_files``. The
first two run the command the host's targets file names (never one from a message)
through the shared runner; a daemon whose reload is not a command (Exim's HUP to the
pid in its pid file, ``reload_by_signal``) does it when the target names none.
``check_files`` loads staged files with the daemon's own TLS library where that is not
OpenSSL (Exim's GnuTLS). A local deploy's early start (``cli/early.py``) runs the
validate_command itself, before any daemon is asked, when the targets file names one.

Plain values in, plain values out: no config model, no journal, no files written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, Protocol

from ..commands import CommandResult, run_command
from .found import Found
from .postfix_sni import SniMap

# How a target's files are laid out: cert + key (+ chain) as separate files; key, leaf
# and chain in one file (Postfix's smtpd_tls_chain_files); two certificates, RSA and
# ECDSA, side by side (``alt``).
Layout = Literal["separate", "combined", "dual"]
ALL_LAYOUTS: frozenset[Layout] = frozenset({"separate", "combined", "dual"})


@dataclass(frozen=True)
class UsualListener:
    """A port the daemon usually listens on: how a probe speaks to it (``protocol``:
    smtp, imap and pop3 mean STARTTLS/STLS first; smtps, imaps and pop3s implicit TLS)
    and what the daemon calls that service."""

    port: int
    protocol: str
    service: str


# An MTA's usual listeners (Postfix's and Exim's alike): SMTP with STARTTLS, SMTPS
# (implicit TLS), submission with STARTTLS.
SMTP_LISTENERS = (
    UsualListener(25, "smtp", "smtp"),
    UsualListener(465, "smtps", "smtps"),
    UsualListener(587, "smtp", "submission"),
)


class Daemon(Protocol):
    """One mail daemon, as the core sees it."""

    @property
    def name(self) -> str:
        """The target's ``mode``."""
        ...

    @property
    def defaults(self) -> Mapping[str, str]:
        """cert_path, key_path, chain_path, reload_command, validate_command: the
        contract's defaults for a target of this mode."""
        ...

    @property
    def listeners(self) -> tuple[UsualListener, ...]:
        ...

    @property
    def layouts(self) -> frozenset[Layout]:
        ...

    @property
    def default_instance(self) -> str:
        """What a target's empty ``instance`` means: the system's own config dir or file."""
        ...

    def config_test(self, command: str, *, timeout: float) -> CommandResult:
        """Run the target's validate_command: does the daemon accept its configuration?"""
        ...

    def reload(self, command: str, *, timeout: float, pid_file: str = "") -> CommandResult:
        """Run the target's reload_command: make the daemon read its files again (an
        empty command: the daemon's own way, when ``reload_by_signal``)."""
        ...

    def check_files(self, pairs: list[tuple[str, str]], *, timeout: float) -> str | None:
        """Each staged (certificate file, key file) as the daemon's own TLS library
        loads it: None when it does, else why not. OpenSSL daemons: None (validate's
        handshake is already OpenSSL's)."""
        ...

    def reload_ready(self, command: str, pid_file: str) -> str | None:
        """Before a deploy commits: can its reload reach the daemon? None, or why not
        (Exim's SIGHUP: the pid file names a running Exim daemon). A command: None."""
        ...

    @property
    def reload_by_signal(self) -> bool:
        """An empty reload_command means a signal to the pid in the target's pid_file."""
        ...

    @property
    def sni_files(self) -> bool:
        """The daemon picks a certificate by SNI among files a target can manage (a
        Postfix table, Dovecot's local_name blocks); Exim's expansion is not that."""
        ...

    @property
    def chain_file(self) -> bool:
        """The daemon can read the chain from a file of its own (chain_path)."""
        ...

    @property
    def key_group(self) -> str | None:
        """The group the daemon reads its key as after giving up root (Debian's Exim:
        Debian-exim): a key file written anew is 0640 with it, where the host has it."""
        ...

    def discover(self, instance: str | None = None) -> list[Found]:
        """What the instance's own configuration says it serves (None: the system's)."""
        ...

    @property
    def sni_map(self) -> Callable[[str], SniMap] | None:
        """How the daemon picks a certificate by SNI, when a compiled table decides it
        (Postfix's ``tls_server_sni_maps``): the parser of a target's ``sni.map``. None:
        it reads each name's files by path (Dovecot's ``local_name`` blocks)."""
        ...


@dataclass(frozen=True)
class CommandDaemon:
    """A daemon whose config test and reload are the commands the targets file names
    (Postfix and Dovecot both): the shared implementation of ``Daemon``."""

    name: str
    defaults: Mapping[str, str]
    listeners: tuple[UsualListener, ...]
    reader: Callable[[str | None], list[Found]]  # the module's ``discover``
    default_instance: str  # the system's own instance: its config directory or file
    layouts: frozenset[Layout] = field(default=ALL_LAYOUTS)
    sni_map: Callable[[str], SniMap] | None = None
    chain_file: bool = True
    sni_files: bool = True  # a name's certificate can be files a target manages
    key_group: str | None = None
    reload_by_signal: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    def config_test(self, command: str, *, timeout: float) -> CommandResult:
        return run_command(command, timeout=timeout, field="validate_command")

    def reload(self, command: str, *, timeout: float, pid_file: str = "") -> CommandResult:
        return run_command(command, timeout=timeout, field="reload_command")

    def check_files(self, pairs: list[tuple[str, str]], *, timeout: float) -> str | None:
        return None

    def reload_ready(self, command: str, pid_file: str) -> str | None:
        return None

    def discover(self, instance: str | None = None) -> list[Found]:
        return self.reader(instance)

"""What reading a daemon's own configuration finds: the TLS files an instance serves,
on which listeners, and what it could not tell.

Plain values only. ``discover`` in each daemon module fills them in from the daemon's
own tools (``postconf``, ``doveconf``); ``core.discover`` turns them into a targets file
to review and checks a targets file against them. Nothing here reads a private key:
a file is opened only to see which PEM blocks it holds and, for a certificate, the
algorithm of its key (a dual RSA + ECDSA set needs to know which is which).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

from ..errors import ConfigError

COMMAND_TIMEOUT = 30.0


@dataclass(frozen=True)
class FileSlot:
    """One certificate's files: ``combined`` (key and chain in one file) or ``cert`` +
    ``key`` (and ``chain``, where the daemon reads it from a file of its own)."""

    cert: str = ""
    key: str = ""
    chain: str = ""
    combined: str = ""
    key_type: str = "any"  # rsa or ecdsa, from the certificate on disk; any when unknown

    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.combined, self.cert, self.key, self.chain) if p)


@dataclass(frozen=True)
class FileSet:
    """The files of one TLS identity: one slot, or two for RSA + ECDSA side by side."""

    slots: tuple[FileSlot, ...]

    def paths(self) -> tuple[str, ...]:
        return tuple(p for s in self.slots for p in s.paths())

    def unproposable(self) -> str | None:
        """Why no target can take these files as they are; None when one can. Two
        certificates must be one RSA and one ECDSA, as their files tell."""
        if len(self.slots) == 2 and {s.key_type for s in self.slots} != {"rsa", "ecdsa"}:
            kinds = ", ".join(s.key_type for s in self.slots)
            return f"two certificates, but not one RSA and one ECDSA as far as their files tell ({kinds})"
        return None


@dataclass(frozen=True)
class FoundListener:
    """A listener that speaks TLS: where a probe connects and how it speaks to it."""

    host: str
    port: int
    protocol: str  # smtp / imap / pop3 (STARTTLS first) or smtps / imaps / pop3s (implicit)
    service: str  # the daemon's own name for it (master.cf service, inet_listener name)

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class Served:
    """One file set and every listener that serves it."""

    files: FileSet
    listeners: list[FoundListener] = field(default_factory=list)
    source: str = ""  # where the daemon's config names these files


@dataclass
class SniServed:
    """One file set a daemon serves for some SNI names only: a Postfix table's entries
    that name the same files, or a Dovecot ``local_name`` block."""

    files: FileSet
    names: list[str]  # as a target's names: the table key ``.example.net`` is ``*.example.net``
    table: str = ""  # Postfix: the tls_server_sni_maps table (``lmdb:/etc/postfix/sni``); Dovecot: ""
    source: str = ""


@dataclass
class Found:
    """One daemon instance, as its own configuration describes it."""

    mode: str
    instance: str  # its config directory (Postfix) or file (Dovecot)
    default_instance: bool
    version: str
    served: list[Served] = field(default_factory=list)
    sni: list[str] = field(default_factory=list)  # per-address blocks, and SNI tables it could not read
    sni_served: list[SniServed] = field(default_factory=list)  # what it serves by SNI name
    notes: list[str] = field(default_factory=list)  # what it could not tell, said plainly
    reload_command: str = ""
    validate_command: str = ""
    pid_file: str = ""  # Exim: where the daemon's pid is, for a reload by HUP
    # its files are picked per connection by what the config cannot tell statically (Exim's
    # expanded tls_certificate): what, said plainly; nothing is proposed, nothing judged unread
    undecided: str = ""
    # files the daemon reads only for some connections (a local_name, local or remote
    # block, a protocol of its own...): read, so never "not read"; not proposed as targets
    conditional: list[str] = field(default_factory=list)
    error: str = ""  # this instance could not be read (a broken postmulti instance)


def run_tool(argv: list[str], what: str, timeout: float = COMMAND_TIMEOUT) -> str:
    """A configuration tool's standard output. Its output may hold secrets (``doveconf
    -P`` prints passwords): it is parsed by the caller and never logged; an error says
    which tool failed and the first line it printed on standard error only."""
    try:
        # errors="replace": a setting in another charset (a Latin-1 greeting or password)
        # must not stop the reading of the TLS settings
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                             timeout=timeout, check=False)
    except FileNotFoundError:
        raise ConfigError(f"{what}: `{argv[0]}` is not installed here") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{what}: `{' '.join(argv)}` did not answer within {timeout:g}s") from None
    except OSError as err:
        raise ConfigError(f"{what}: cannot run `{argv[0]}`: {err.strerror or err}") from None
    if res.returncode != 0:
        first = (res.stderr.strip().splitlines() or ["no message"])[0][:300]
        raise ConfigError(f"{what}: `{' '.join(argv)}` exited {res.returncode}: {first}")
    return res.stdout


def pem_kinds(path: str) -> tuple[int, int]:
    """(private keys, certificates) in ``path``, counted by their PEM markers, nothing
    parsed; (-1, -1) when it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read(1024 * 1024)
    except OSError:
        return -1, -1
    return len(re.findall(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", data)), data.count(b"-----BEGIN CERTIFICATE-----")


def cert_key_type(path: str) -> str:
    """rsa or ecdsa: the algorithm of the first certificate's key in ``path``; any when
    the file is missing or holds none."""
    try:
        with open(path, "rb") as f:
            data = f.read(1024 * 1024)
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        start = data.index(b"-----BEGIN CERTIFICATE-----")
        public = x509.load_pem_x509_certificate(data[start:]).public_key()
    except (OSError, ValueError):
        return "any"
    if isinstance(public, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(public, ec.EllipticCurvePublicKey):
        return "ecdsa"
    return "any"


def loopback_for(address: str) -> str:
    """Where a probe on this host reaches a listener bound to ``address``: a wildcard
    (``*``, ``0.0.0.0``, ``::``, empty, ``all``) is reached on the loopback."""
    a = address.strip().strip("[]")
    if a in ("", "*", "0.0.0.0", "all", "loopback-only"):  # noqa: S104 -- names a wildcard, binds nothing
        return "127.0.0.1"
    if a in ("::", "::0"):
        return "::1"
    return a

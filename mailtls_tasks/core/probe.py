"""TLS probes per mail protocol: which certificate does the daemon serve *now*?

Bytes on disk are not proof: Postfix's smtpd and Dovecot's config process read the
files when they start. Only a fresh handshake tells. We do not validate the chain
here -- we compare the leaf's SHA-256 with the one we deployed, which is stricter.

A server that stops offering STARTTLS (what Postfix does when its key does not load)
is a failure, never a pass: a plaintext-only MTA is exactly the outage we prevent.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass

from cryptography import x509

from ..errors import VerifyFailed
from .config import VerifySettings
from .material import fingerprint_der

PORT_PROTOCOLS = {25: "smtp", 587: "smtp", 465: "smtps", 143: "imap", 993: "imaps", 110: "pop3", 995: "pop3s"}
IMPLICIT = {"smtps", "imaps", "pop3s", "tls"}


class ProbeError(Exception):
    """The endpoint could not be probed (refused, no STARTTLS, handshake failed)."""


@dataclass(frozen=True)
class Served:
    fingerprint: str
    protocol: str
    tls_version: str | None
    not_after: str | None = None


def resolve_protocol(protocol: str, port: int) -> str:
    if protocol != "auto":
        return protocol
    return PORT_PROTOCOLS.get(port, "tls")


class _Lines:
    """Line reader over a plain socket that never reads past what it was asked for
    in a way that could hide bytes injected before the TLS handshake."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def readline(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ProbeError("connection closed by server")
            self.buf += chunk
            if len(self.buf) > 65536:
                raise ProbeError("server sent an over-long line")
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r")

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r\n")

    def assert_drained(self) -> None:
        if self.buf:
            raise ProbeError("server sent data after the STARTTLS reply (possible injection)")


def _smtp(r: _Lines) -> None:
    def reply() -> list[bytes]:
        lines = []
        while True:
            line = r.readline()
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return lines

    greet = reply()
    if not greet[0].startswith(b"220"):
        raise ProbeError(f"SMTP greeting was not 220: {greet[0][:80]!r}")
    r.send("EHLO mailtls-probe.invalid")
    ehlo = reply()
    if not ehlo[0].startswith(b"250"):
        raise ProbeError(f"EHLO refused: {ehlo[0][:80]!r}")
    if not any(line[4:].upper().startswith(b"STARTTLS") for line in ehlo):
        raise ProbeError("SMTP server does not offer STARTTLS")
    r.send("STARTTLS")
    ans = reply()
    if not ans[0].startswith(b"220"):
        raise ProbeError(f"STARTTLS refused: {ans[0][:80]!r}")


def _imap(r: _Lines) -> None:
    greet = r.readline()
    if not greet.startswith(b"* OK"):
        raise ProbeError(f"IMAP greeting was not OK: {greet[:80]!r}")
    r.send("a1 CAPABILITY")
    caps = b""
    while True:
        line = r.readline()
        if line.startswith(b"a1 "):
            if not line.startswith(b"a1 OK"):
                raise ProbeError(f"CAPABILITY failed: {line[:80]!r}")
            break
        caps += line + b" "
    if b"STARTTLS" not in caps.upper().split():
        raise ProbeError("IMAP server does not offer STARTTLS")
    r.send("a2 STARTTLS")
    while True:
        line = r.readline()
        if line.startswith(b"a2 "):
            if not line.startswith(b"a2 OK"):
                raise ProbeError(f"STARTTLS refused: {line[:80]!r}")
            return


def _pop3(r: _Lines) -> None:
    greet = r.readline()
    if not greet.startswith(b"+OK"):
        raise ProbeError(f"POP3 greeting was not +OK: {greet[:80]!r}")
    r.send("CAPA")
    first = r.readline()
    if not first.startswith(b"+OK"):
        raise ProbeError("POP3 server does not support CAPA, so STLS cannot be confirmed")
    caps = []
    while True:
        line = r.readline()
        if line == b".":
            break
        caps.append(line.strip().upper())
    if b"STLS" not in caps:
        raise ProbeError("POP3 server does not offer STLS")
    r.send("STLS")
    ans = r.readline()
    if not ans.startswith(b"+OK"):
        raise ProbeError(f"STLS refused: {ans[:80]!r}")


_DIALOGUES = {"smtp": _smtp, "imap": _imap, "pop3": _pop3}


def _client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we compare the leaf fingerprint instead
    return ctx


def _sni(host: str, server_name: str | None) -> str | None:
    if server_name:
        return server_name
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def probe(host: str, port: int, protocol: str = "auto", server_name: str | None = None,
          timeout: float = 5.0, context: ssl.SSLContext | None = None) -> Served:
    """One fresh connection: speak the protocol, handshake, return the served leaf.

    ``context``: a verifying context (the audit's), so the handshake itself fails
    unless the served chain verifies for ``server_name``; default: no verification,
    the leaf's fingerprint is what we compare."""
    proto = resolve_protocol(protocol, port)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        raise ProbeError(f"cannot connect to {host}:{port}: {err.strerror or err}") from None
    try:
        sock.settimeout(timeout)
        if proto not in IMPLICIT:
            lines = _Lines(sock)
            _DIALOGUES[proto](lines)
            lines.assert_drained()
        try:
            tls = (context or _client_context()).wrap_socket(sock, server_hostname=_sni(host, server_name))
        except (ssl.SSLError, OSError) as err:
            hint = ""
            if protocol == "auto" and port not in PORT_PROTOCOLS and "WRONG_VERSION_NUMBER" in str(err):
                hint = (" -- the server answered in plaintext; on a non-standard port set "
                        "post_deploy_verify.protocol to smtp, imap or pop3")
            raise ProbeError(f"TLS handshake with {host}:{port} ({proto}) failed: {err}{hint}") from None
        der = tls.getpeercert(binary_form=True)
        version = tls.version()
        tls.close()
        if not der:
            raise ProbeError(f"{host}:{port} presented no certificate")
        return Served(fingerprint_der(der), proto, version, _not_after(der))
    except (TimeoutError, OSError) as err:
        raise ProbeError(f"{host}:{port} ({proto}): {err}") from None
    finally:
        sock.close()


def _not_after(der: bytes) -> str | None:
    try:
        return x509.load_der_x509_certificate(der).not_valid_after_utc.isoformat()
    except ValueError:
        return None


def probe_settings(settings: VerifySettings) -> Served:
    return probe(settings.host, settings.port, settings.protocol, settings.server_name,
                 min(settings.connect_timeout, settings.timeout))


def wait_for(settings: VerifySettings, expected: str, timeout: float | None = None) -> Served:
    """Poll fresh connections until the served leaf is ``expected``; VerifyFailed otherwise."""
    budget = settings.timeout if timeout is None else timeout
    deadline = time.monotonic() + budget
    last: str = "no attempt"
    last_served: str | None = None
    attempts = 0
    while True:
        attempts += 1
        try:
            served = probe(settings.host, settings.port, settings.protocol, settings.server_name,
                           max(0.2, min(settings.connect_timeout, deadline - time.monotonic())))
            if served.fingerprint == expected:
                return served
            last_served = served.fingerprint
            last = f"serves {served.fingerprint}"
        except ProbeError as err:
            last = str(err)
        if time.monotonic() + settings.interval > deadline:
            raise VerifyFailed(
                f"{settings.endpoint} did not serve {expected[:16]}… within {budget:g}s "
                f"({attempts} attempts; last: {last})",
                served=last_served,
            )
        time.sleep(settings.interval)

"""TLS probes per mail protocol: which certificate does the daemon serve *now*?

Bytes on disk are not proof: Postfix's smtpd and Dovecot's config process read the
files when they start. Only a fresh handshake tells. A probe compares the leaf's
SHA-256 with the one we deployed (stricter than any validation), and captures the
chain the daemon sends, so a deploy can check it is the one deployed and that it
validates for the target's names (``chain_problem``). pyOpenSSL does the handshake:
the standard library of Python 3.11 cannot show the chain a server sent.

A server that stops offering STARTTLS (what Postfix does when its key does not load)
is a failure, never a pass: a plaintext-only MTA is exactly the outage we prevent.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import time
from dataclasses import dataclass

from cryptography import x509
from OpenSSL import SSL

from .. import daemons
from ..errors import VerifyFailed
from . import material
from .config import Listener

PORT_PROTOCOLS = daemons.port_protocols()  # 25, 587 smtp; 465 smtps; 143 imap; 993 imaps; 110 pop3; 995 pop3s
IMPLICIT = {"smtps", "imaps", "pop3s", "tls"}


class ProbeError(Exception):
    """The endpoint could not be probed (refused, no STARTTLS, handshake failed)."""


@dataclass(frozen=True)
class Served:
    fingerprint: str
    protocol: str
    tls_version: str | None
    not_after: str | None = None
    chain: tuple[x509.Certificate, ...] = ()  # as sent: the leaf first

    @property
    def chain_fingerprints(self) -> list[str]:
        return [material.fingerprint(c) for c in self.chain[1:]]


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
    if b"STARTTLS" not in _imap_tagged(r, b"a1", "CAPABILITY failed").upper().split():
        raise ProbeError("IMAP server does not offer STARTTLS")
    r.send("a2 STARTTLS")
    _imap_tagged(r, b"a2", "STARTTLS refused")


def _imap_tagged(r: _Lines, tag: bytes, failed: str) -> bytes:
    """Read to the tagged reply (raising ``failed`` unless it is OK); the untagged lines before it."""
    untagged = b""
    while True:
        line = r.readline()
        if line.startswith(tag + b" "):
            if not line.startswith(tag + b" OK"):
                raise ProbeError(f"{failed}: {line[:80]!r}")
            return untagged
        untagged += line + b" "


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


# TLS 1.2 ciphers that make the server pick the certificate of one algorithm: how a
# dual RSA + ECDSA daemon is checked one certificate at a time.
ALGORITHM_CIPHERS = {
    "ecdsa": "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305",
    "rsa": "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305",
}


def _sni(host: str, server_name: str | None) -> str | None:
    if server_name:
        return server_name
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def _context(algorithm: str | None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_verify(SSL.VERIFY_NONE)  # we compare fingerprints, and validate chains ourselves
    if algorithm and algorithm != "any":
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_cipher_list(ALGORITHM_CIPHERS[algorithm].encode())
    return ctx


def _handshake(conn: SSL.Connection, sock: socket.socket, deadline: float) -> None:
    while True:
        try:
            conn.do_handshake()
            return
        except SSL.WantReadError:
            ready = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))[0]
        except SSL.WantWriteError:
            ready = select.select([], [sock], [], max(0.0, deadline - time.monotonic()))[1]
        if not ready:
            raise TimeoutError("TLS handshake timed out")


def probe(host: str, port: int, protocol: str = "auto", server_name: str | None = None,
          timeout: float = 5.0, algorithm: str | None = None) -> Served:
    """One fresh connection: speak the protocol, handshake, return the served leaf and
    the chain sent with it. ``algorithm`` ('rsa' or 'ecdsa'): offer only that kind of
    certificate (TLS 1.2 ciphers), to check each of a dual-certificate daemon's."""
    proto = resolve_protocol(protocol, port)
    deadline = time.monotonic() + timeout
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
        sock.setblocking(False)
        conn = SSL.Connection(_context(algorithm), sock)
        sni = _sni(host, server_name)
        if sni:
            conn.set_tlsext_host_name(sni.encode())
        conn.set_connect_state()
        try:
            _handshake(conn, sock, deadline)
        except SSL.Error as err:
            text = str(err)
            hint = ""
            if protocol == "auto" and port not in PORT_PROTOCOLS and "wrong version number" in text.lower():
                hint = (" -- the server answered in plaintext; on a non-standard port set "
                        "post_deploy_verify.protocol to smtp, imap or pop3")
            if algorithm and "handshake failure" in text.lower():
                hint = f" -- the server has no {algorithm.upper()} certificate (or refuses TLS 1.2)"
            raise ProbeError(f"TLS handshake with {host}:{port} ({proto}) failed: {text}{hint}") from None
        chain = [c.to_cryptography() for c in conn.get_peer_cert_chain() or []]
        version = conn.get_protocol_version_name()
        if not chain:
            raise ProbeError(f"{host}:{port} presented no certificate")
        leaf = chain[0]
        return Served(material.fingerprint(leaf), proto, version, leaf.not_valid_after_utc.isoformat(),
                      tuple(chain))
    except (TimeoutError, OSError) as err:
        raise ProbeError(f"{host}:{port} ({proto}): {err}") from None
    finally:
        sock.close()


def probe_listener(li: Listener, algorithm: str | None = None) -> Served:
    return probe(li.host, li.port, li.protocol, li.server_name, min(li.connect_timeout, li.timeout), algorithm)


def wait_for(li: Listener, expected: str, timeout: float | None = None, algorithm: str | None = None) -> Served:
    """Poll fresh connections until the served leaf is ``expected``; VerifyFailed otherwise."""
    budget = li.timeout if timeout is None else timeout
    deadline = time.monotonic() + budget
    last: str = "no attempt"
    last_served: str | None = None
    attempts = 0
    kind = f" ({algorithm.upper()})" if algorithm and algorithm != "any" else ""
    while True:
        attempts += 1
        try:
            served = probe(li.host, li.port, li.protocol, li.server_name,
                           max(0.2, min(li.connect_timeout, deadline - time.monotonic())), algorithm)
            if served.fingerprint == expected:
                return served
            last_served = served.fingerprint
            last = f"serves {served.fingerprint}"
        except ProbeError as err:
            last = str(err)
        if time.monotonic() + li.interval > deadline:
            raise VerifyFailed(
                f"{li.where}{kind} did not serve {expected[:16]}… within {budget:g}s "
                f"({attempts} attempts; last: {last})",
                served=last_served,
            )
        time.sleep(li.interval)



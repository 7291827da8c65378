"""A real TLS listener for tests: plain TLS, or SMTP/IMAP/POP3 with STARTTLS.

Like a mail daemon, it reads its cert/key files when it starts and again only after
a reload (the fake reload command touches ``trigger``), so "bytes on disk" and
"what is served" can differ exactly as they do with Postfix and Dovecot.
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path


class TLSServer:
    def __init__(self, certfile: Path, keyfile: Path, protocol: str = "tls", *,
                 trigger: Path | None = None, starttls: bool = True) -> None:
        self.certfile, self.keyfile = certfile, keyfile
        self.protocol = protocol
        self.trigger = trigger
        self.starttls = starttls
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.reloads = 0
        self.ctx = self._load()
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _load(self) -> ssl.SSLContext | None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(str(self.certfile), str(self.keyfile))
        except (ssl.SSLError, OSError):
            return None  # like Postfix with a broken key: no STARTTLS offered
        return ctx

    def reload(self) -> None:
        self.ctx = self._load()
        self.reloads += 1

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.trigger is not None and self.trigger.exists():
                self.trigger.unlink()
                self.reload()
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            ctx = self.ctx
            offer = self.starttls and ctx is not None
            f = conn.makefile("rb", buffering=0)
            if self.protocol == "smtp":
                conn.sendall(b"220 test ESMTP\r\n")
                f.readline()
                conn.sendall(b"250-test\r\n" + (b"250-STARTTLS\r\n" if offer else b"") + b"250 8BITMIME\r\n")
                if not offer:
                    return
                f.readline()
                conn.sendall(b"220 go ahead\r\n")
            elif self.protocol == "imap":
                conn.sendall(b"* OK test ready\r\n")
                f.readline()
                conn.sendall(b"* CAPABILITY IMAP4rev1" + (b" STARTTLS" if offer else b"") + b"\r\na1 OK done\r\n")
                if not offer:
                    return
                f.readline()
                conn.sendall(b"a2 OK begin TLS\r\n")
            elif self.protocol == "pop3":
                conn.sendall(b"+OK test ready\r\n")
                f.readline()
                conn.sendall(b"+OK\r\nUSER\r\n" + (b"STLS\r\n" if offer else b"") + b".\r\n")
                if not offer:
                    return
                f.readline()
                conn.sendall(b"+OK begin TLS\r\n")
            if ctx is None:
                return
            tls = ctx.wrap_socket(conn, server_side=True)
            try:
                tls.recv(1)
            except (OSError, ssl.SSLError):
                pass
            tls.close()
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

"""A real Exim daemon on loopback high ports, from its own config file in a temp dir.

Exim conflicts with Postfix on Debian, so the suite that uses this runs in a Debian
root of its own with ``exim4-daemon-light`` installed by apt (``scripts/root-lane.sh
--root exim-bookworm`` / ``exim-trixie``, a throw-away copy per run): its
``/etc/exim4`` is ours there. The daemon runs as Debian's does: started by root from a
config listed in ``/etc/exim4/trusted_configs`` (a ``-C`` config keeps root only when
listed there, owned by root, not group- or world-writable), reading its key as
``Debian-exim``. Each instance has its own spool (the daemon's notifier socket is
named after it: two daemons on one spool refuse to start), log and pid file.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

from .services import free_port, require, unavailable, wait_port

TRUSTED = Path("/etc/exim4/trusted_configs")


def in_exim_root() -> bool:
    """This process runs in the Exim lane's throw-away root (where /etc/exim4 is ours)."""
    return os.environ.get("MAILTLS_LANE", "").startswith("exim-")


def need_exim_root() -> None:
    """Elsewhere the suite would write this machine's /etc/exim4: skipped outside CI,
    a failure under CI=true (``unavailable``) -- make test runs it in its roots."""
    if not in_exim_root():
        unavailable("the Exim suite runs in its own Debian root: make test-exim (part of make test)")


def exim_ids() -> tuple[int, int]:
    return pwd.getpwnam("Debian-exim").pw_uid, grp.getgrnam("Debian-exim").gr_gid


def place_key(path: Path, data: bytes) -> None:
    """A key as Debian lays it out for Exim: root:Debian-exim 0640."""
    path.write_bytes(data)
    os.chown(path, 0, exim_ids()[1])
    os.chmod(path, 0o640)


class Exim:
    """``exim4 -C CONF -bd -oP PID``: SMTP (STARTTLS) and SMTPS (TLS on connect)."""

    def __init__(self, root: Path, certs: list[Path], keys: list[Path] | None = None,
                 ports: tuple[int, int] | None = None, extra_main: str = "") -> None:
        self.bin = require("exim4")
        self.root = root
        self.dir = root / "exim"
        self.certs, self.keys = certs, keys
        self.smtp_port, self.smtps_port = ports or (free_port(), free_port())
        self.extra_main = extra_main
        self.conf = self.dir / "exim.conf"
        self.pid_file = self.dir / "exim.pid"
        self.mainlog = self.dir / "log" / "mainlog"
        self._write_config()

    def _write_config(self) -> None:
        uid, gid = exim_ids()
        for sub in ("spool", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
            os.chown(self.dir / sub, uid, gid)
        for p in [self.dir, *self.dir.parents]:  # Debian-exim must reach its spool, log and files
            if str(p) in ("/", "/tmp"):
                break
            os.chmod(p, os.stat(p).st_mode | 0o755)
        keys = f"tls_privatekey = {' : '.join(map(str, self.keys))}\n" if self.keys else ""
        self.conf.write_text(f"""\
primary_hostname = mail.example.test
keep_environment =
daemon_smtp_ports = {self.smtp_port} : {self.smtps_port}
tls_on_connect_ports = {self.smtps_port}
local_interfaces = 127.0.0.1
tls_advertise_hosts = *
tls_certificate = {' : '.join(map(str, self.certs))}
{keys}spool_directory = {self.dir / 'spool'}
log_file_path = {self.dir / 'log'}/%slog
pid_file_path = {self.pid_file}
acl_smtp_rcpt = acl_check_rcpt
{self.extra_main}
begin acl
acl_check_rcpt:
  deny
""")
        os.chown(self.conf, 0, 0)
        os.chmod(self.conf, 0o644)
        listed = TRUSTED.read_text().split() if TRUSTED.exists() else []
        if str(self.conf) not in listed:
            with TRUSTED.open("a") as f:
                f.write(f"{self.conf}\n")

    def validate_command(self) -> str:
        return f"{self.bin} -C {self.conf} -bV"

    def start(self) -> None:
        subprocess.run([self.bin, "-C", str(self.conf), "-bd", "-oP", str(self.pid_file)], check=True,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        wait_port(self.smtp_port)
        wait_port(self.smtps_port)
        deadline = time.monotonic() + 10
        while not self.pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return int(self.pid_file.read_text().strip())

    def log(self) -> str:
        return self.mainlog.read_text(errors="replace") if self.mainlog.exists() else ""

    def stop(self) -> None:
        try:
            pid = self.pid
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        wait_port(self.smtp_port, gone=True)


def exim_version() -> str:
    out = subprocess.run([require("exim4"), "-bV"], capture_output=True, text=True, check=False).stdout
    return out.split()[2] if out.startswith("Exim version") else "?"

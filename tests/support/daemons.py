"""Private Postfix and Dovecot instances on loopback high ports, from temp dirs.

Never touches /etc/postfix, /etc/dovecot or port 25: each instance has its own
config directory, queue, logs and sockets, listens on 127.0.0.1 only, and is stopped
(with every process it started) by ``stop()``. Shared by the e2e tests and the demo.
See shared/notes/real-daemons.md for why each line below is there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from .services import free_port, require, wait_port

POSTFIX_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _traversable(path: Path) -> None:
    """mkdtemp makes 0700 dirs; the postfix/dovecot users must traverse every parent."""
    for p in [path, *path.parents]:
        if str(p) in ("/", "/tmp"):
            break
        mode = p.stat().st_mode & 0o777
        if mode & 0o055 != 0o055:
            os.chmod(p, mode | 0o755)


def _run(argv: list[str], log: Path, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    # never pipes: a daemon started here would inherit them and we would wait forever
    with log.open("ab") as out:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout, check=False)


class Postfix:
    """``postfix -c DIR``: SMTP (STARTTLS) and SMTPS on two free loopback ports."""

    def __init__(self, root: Path, cert: Path, key: Path, address: str = "127.0.0.1",
                 ports: tuple[int, int] | None = None, chain_files: list[Path] | None = None,
                 submission_files: tuple[Path, Path] | None = None, extra_main: str = "") -> None:
        self.bin = require("postfix")
        self.extra_main = extra_main  # more main.cf lines (tls_server_sni_maps ...)
        self.root = root
        self.dir = root / "postfix"
        self.cert, self.key = cert, key
        self.address = address
        self.chain_files = chain_files
        self.smtp_port, self.smtps_port = ports or (free_port(), free_port())
        # a submission listener whose -o overrides name other files: the real-world "one
        # port keeps serving the old certificate"
        self.submission_files = submission_files
        self.submission_port = free_port() if submission_files else None
        self.log = root / "postfix-commands.log"
        self._write_config()

    def _write_config(self) -> None:
        d = self.dir
        for sub in ("queue", "data"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(d / "data", "postfix")
        (d / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = loopback-only
inet_protocols = ipv4
myhostname = mx.mailtls.test
mydestination =
relayhost =
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
{self._tls_files()}
smtpd_tls_security_level = may
smtpd_tls_loglevel = 1
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
{self.extra_main}
""")
        (d / "master.cf").write_text(
            f"{self.address}:{self.smtp_port} inet n - n - - smtpd\n"
            f"{self.address}:{self.smtps_port} inet n - n - - smtpd\n"
            "  -o smtpd_tls_wrappermode=yes\n  -o smtpd_tls_security_level=encrypt\n"
            + (f"{self.address}:{self.submission_port} inet n - n - - smtpd\n"
               f"  -o smtpd_tls_cert_file={self.submission_files[0]}\n"
               f"  -o smtpd_tls_key_file={self.submission_files[1]}\n" if self.submission_files else "")
            + POSTFIX_SERVICES)
        _traversable(d)

    def _tls_files(self) -> str:
        if self.chain_files:  # Postfix >= 3.4: key and chain files, one algorithm each (RSA, ECDSA)
            return "smtpd_tls_chain_files = " + ", ".join(str(f) for f in self.chain_files)
        return f"smtpd_tls_cert_file = {self.cert}\nsmtpd_tls_key_file = {self.key}"

    def command(self, verb: str) -> str:
        """The command line a targets file would use for this instance."""
        return f"{self.bin} -c {self.dir} {verb}"

    def start(self) -> None:
        res = _run([self.bin, "-c", str(self.dir), "start"], self.log)
        if res.returncode != 0:
            raise RuntimeError(f"postfix start failed:\n{self.debug()}")
        wait_port(self.smtp_port, 20, host=self.address)
        wait_port(self.smtps_port, 20, host=self.address)
        if self.submission_port:
            wait_port(self.submission_port, 20, host=self.address)

    def stop(self) -> None:
        _run([self.bin, "-c", str(self.dir), "stop"], self.log)
        _wait_gone(self.smtp_port, host=self.address)

    def debug(self) -> str:
        return _tails(self.log, self.dir / "maillog")


def dovecot_version(binary: str | None = None) -> tuple[int, ...]:
    """(2, 3, 19, 1) or (2, 4, 1): the installed Dovecot's, from ``dovecot --version``."""
    out = subprocess.run([binary or require("dovecot"), "--version"], capture_output=True, text=True,
                         check=True).stdout  # "2.3.19.1 (9b53102964)", "2.4.1-4 (7d8c0e5759)"
    m = re.match(r"\d+(?:\.\d+)*", out.strip())
    if not m:
        raise RuntimeError(f"dovecot --version said {out.strip()!r}")
    return tuple(int(n) for n in m.group(0).split("."))


class Dovecot:
    """``dovecot -c CONF``: IMAP (STARTTLS), IMAPS, POP3 (STLS), POP3S on free loopback ports.

    The config speaks the installed Dovecot's language: 2.3 (Debian 12) or 2.4 (Debian
    13), whose settings differ in name and shape (``ssl_cert = <file`` against
    ``ssl_server_cert_file = file``, named passdb/userdb blocks, ``%{user}``...)."""

    def __init__(self, root: Path, cert: Path, key: Path, address: str = "127.0.0.1",
                 ports: dict[str, int] | None = None, alt: tuple[Path, Path] | None = None,
                 local_names: dict[str, tuple[Path, Path]] | None = None) -> None:
        self.bin = require("dovecot")
        self.local_names = local_names or {}  # SNI name -> (cert, key): a local_name block each
        self.doveadm = require("doveadm")
        self.doveconf = require("doveconf")
        self.root = root
        self.dir = root / "dovecot"
        self.cert, self.key = cert, key
        self.address = address
        self.alt = alt
        self.ports = ports or {p: free_port() for p in ("imap", "imaps", "pop3", "pop3s")}
        self.log = root / "dovecot-commands.log"
        self.version = dovecot_version(self.bin)
        self._write_config()

    @property
    def conf(self) -> Path:
        return self.dir / "dovecot.conf"

    def _write_config(self) -> None:
        d = self.dir
        (d / "run").mkdir(parents=True, exist_ok=True)
        (d / "mail").mkdir(exist_ok=True)
        (d / "state").mkdir(exist_ok=True)
        self.conf.write_text((self._config_24() if self.version >= (2, 4) else self._config_23())
                             + self._local_name_blocks())
        _traversable(d)

    def _listeners(self, address_setting: str) -> str:
        p, a = self.ports, self.address
        return f"""\
service imap-login {{
  inet_listener imap {{
    {address_setting} = {a}
    port = {p['imap']}
  }}
  inet_listener imaps {{
    {address_setting} = {a}
    port = {p['imaps']}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    {address_setting} = {a}
    port = {p['pop3']}
  }}
  inet_listener pop3s {{
    {address_setting} = {a}
    port = {p['pop3s']}
    ssl = yes
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0600
  }}
  unix_listener stats-writer {{
    mode = 0600
  }}
}}
"""

    def _config_24(self) -> str:
        d, version = self.dir, ".".join(str(n) for n in self.version[:3])
        alt = (f"ssl_server_alt_cert_file = {self.alt[0]}\nssl_server_alt_key_file = {self.alt[1]}\n"
               if self.alt else "")
        return f"""\
dovecot_config_version = {version}
dovecot_storage_version = {version}
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
instance_name = mailtls-test-{self.ports['imap']}
protocols = imap pop3
listen = {self.address}
ssl = yes
ssl_server_cert_file = {self.cert}
ssl_server_key_file = {self.key}
{alt}auth_allow_cleartext = no
auth_mechanisms = plain
mail_driver = maildir
mail_path = {d}/mail/%{{user}}
passdb static {{
  password = test
}}
userdb static {{
  fields {{
    uid = nobody
    gid = nogroup
    home = {d}/mail/%{{user}}
  }}
}}
""" + self._listeners("listen")

    def _config_23(self) -> str:
        d, p = self.dir, self.ports
        return f"""\
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
instance_name = mailtls-test-{p['imap']}
protocols = imap pop3
listen = {self.address}
ssl = yes
ssl_cert = <{self.cert}
ssl_key = <{self.key}
{f"ssl_alt_cert = <{self.alt[0]}{chr(10)}ssl_alt_key = <{self.alt[1]}" if self.alt else ""}
disable_plaintext_auth = yes
auth_mechanisms = plain
mail_location = maildir:{d}/mail/%u
passdb {{
  driver = static
  args = password=test
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={d}/mail/%u
}}
""" + self._listeners("address")

    def _local_name_blocks(self) -> str:
        """A ``local_name`` block per SNI name, in the installed version's words."""
        out = []
        for name, (cert, key) in self.local_names.items():
            files = (f"  ssl_server_cert_file = {cert}\n  ssl_server_key_file = {key}\n" if self.version >= (2, 4)
                     else f"  ssl_cert = <{cert}\n  ssl_key = <{key}\n")
            out.append(f"local_name {name} {{\n{files}}}\n")
        return "".join(out)

    def reload_command(self) -> str:
        return f"{self.doveadm} -c {self.conf} reload"

    def validate_command(self) -> str:
        return f"{self.doveconf} -c {self.conf} -n"

    def start(self) -> None:
        res = _run([self.bin, "-c", str(self.conf)], self.log)
        if res.returncode != 0:
            raise RuntimeError(f"dovecot start failed:\n{self.debug()}")
        for port in self.ports.values():
            wait_port(port, 20, host=self.address)

    def stop(self) -> None:
        _run([self.doveadm, "-c", str(self.conf), "stop"], self.log)
        _wait_gone(self.ports["imap"], host=self.address)

    def debug(self) -> str:
        return _tails(self.log, self.dir / "dovecot.log")


def _tails(*logs: Path) -> str:
    """The end of each log that exists: what to show when a daemon will not start."""
    return "\n".join(f"--- {f}\n" + f.read_text(errors="replace")[-4000:] for f in logs if f.exists())


def _wait_gone(port: int, timeout: float = 15, host: str = "127.0.0.1") -> None:
    wait_port(port, timeout, gone=True, host=host)

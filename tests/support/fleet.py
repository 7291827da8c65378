"""A fleet on one machine: several mail hosts, one targets file for all of them.

Each host gets what a real machine would have to itself, without a VM: its own
directory tree, mounted (in a private mount namespace, ``unshare -m``) over the one
path the shared targets file names; its own ``/etc/hosts``, where the one name the
targets file verifies against (``mail.fleet.test``) points at its own loopback address
(127.0.0.2, .3, ...); its own Postfix and Dovecot listening there on the same ports as
every other host's; its own worker, started with ``--host NAME``. The targets file is
byte-for-byte the same for every host, as a templated fleet's would be.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from .daemons import Dovecot, Postfix
from .keys import Pipeline
from .pki import PKI, Issued
from .services import Worker, free_port, require
from .stack import Wrapper

MAIL_NAME = "mail.fleet.test"


class FleetHost:
    def __init__(self, fleet: Fleet, name: str, address: str, initial: Issued) -> None:
        self.fleet, self.name, self.address = fleet, name, address
        self.root = fleet.root / name
        certs = self.root / "certs"
        for daemon in ("postfix", "dovecot"):
            (certs / daemon).mkdir(parents=True)
            (certs / daemon / "cert.pem").write_bytes(initial.fullchain_pem)
            (certs / daemon / "key.pem").write_bytes(initial.key_pem)
            os.chmod(certs / daemon / "key.pem", 0o600)
        self.postfix = Postfix(self.root, certs / "postfix" / "cert.pem", certs / "postfix" / "key.pem",
                               address=address, ports=fleet.smtp_ports)
        self.dovecot = Dovecot(self.root, certs / "dovecot" / "cert.pem", certs / "dovecot" / "key.pem",
                               address=address, ports=fleet.dovecot_ports)
        self.bin = self.root / "bin"
        self.bin.mkdir()
        self.pf_reload = Wrapper(self.bin, "postfix-reload", self.postfix.command("reload"))
        self.pf_check = Wrapper(self.bin, "postfix-check", self.postfix.command("check"))
        self.dv_reload = Wrapper(self.bin, "doveadm-reload", self.dovecot.reload_command())
        self.dv_check = Wrapper(self.bin, "doveconf-check", self.dovecot.validate_command())
        (self.root / "hosts").write_text(f"127.0.0.1 localhost\n{address} {MAIL_NAME}\n")
        fleet.pipeline.enroll(name, self.root / "keys")
        self.worker: Worker | None = None

    def path(self, daemon: str, role: str) -> Path:
        return self.root / "certs" / daemon / f"{role}.pem"

    def start(self) -> None:
        self.postfix.start()
        self.dovecot.start()

    def start_worker(self, broker: str, extra_env: dict[str, str] | None = None) -> Worker:
        view, root = self.fleet.view, self.root
        setup = (f"mount --bind {shlex.quote(str(root))} {shlex.quote(str(view))} && "
                 f"mount --bind {shlex.quote(str(root / 'hosts'))} /etc/hosts && exec \"$@\"")
        self.worker = Worker(self.fleet.targets_file, broker, self.fleet.root / f"worker-{self.name}.log",
                             env={"MAILTLS_HOST": self.name, **(extra_env or {})},
                             wrap=[require("unshare"), "-m", "--propagation", "private", "sh", "-c", setup, "sh"])
        return self.worker

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.postfix.stop()
        self.dovecot.stop()


class Fleet:
    """Hosts ``fleet-a``, ``fleet-b`` ... on 127.0.0.2, .3 ...; one targets file."""

    def __init__(self, root: Path, pki: PKI, pipeline: Pipeline, names: list[str], *,
                 settings: dict[str, Any] | None = None, trust_anchors: Path | None = None,
                 with_www: bool = True) -> None:
        self.with_www = with_www
        self.root, self.pki, self.pipeline = root, pki, pipeline
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        self.view = root / "this-host"  # every host's tree appears here, in its own namespace
        self.view.mkdir()
        self.smtp_ports = (free_port(), free_port())
        self.dovecot_ports = {p: free_port() for p in ("imap", "imaps", "pop3", "pop3s")}
        self.initial = pki.leaf(MAIL_NAME)
        self.hosts = {n: FleetHost(self, n, f"127.0.0.{i + 2}", self.initial) for i, n in enumerate(names)}
        self.targets_file = root / "targets.toml"
        self.write_targets(settings or {}, trust_anchors)

    def write_targets(self, settings: dict[str, Any], trust_anchors: Path | None) -> None:
        v = self.view
        anchors = f'trust_anchors = "{trust_anchors}"\n' if trust_anchors else ""
        extra = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in settings.items())
        self.targets_file.write_text(f"""\
# The same file on every host of the fleet; each worker runs with --host NAME.
state_dir = "{v}/state"
audit_interval = "1h"
warn_days = 21
{extra}
[security]
host_keys = ["{v}/keys/host.key"]
trusted_signers = ["{self.pipeline.public}"]

[targets.smtp]
mode = "postfix"
cert_path = "{v}/certs/postfix/cert.pem"
key_path = "{v}/certs/postfix/key.pem"
reload_command = "{v}/bin/postfix-reload"
validate_command = "{v}/bin/postfix-check"
names = ["{MAIL_NAME}"]
labels = ["mx", "mail"]
{anchors}post_deploy_verify = {{ enabled = true, endpoint = "{MAIL_NAME}:{self.smtp_ports[0]}", protocol = "smtp", \
timeout = "4s", interval = "100ms" }}

[targets.imap]
mode = "dovecot"
cert_path = "{v}/certs/dovecot/cert.pem"
key_path = "{v}/certs/dovecot/key.pem"
reload_command = "{v}/bin/doveadm-reload"
validate_command = "{v}/bin/doveconf-check"
names = ["{MAIL_NAME}"]
labels = ["imap", "mail"]
{anchors}post_deploy_verify = {{ enabled = true, endpoint = "{MAIL_NAME}:{self.dovecot_ports['imaps']}", \
protocol = "imaps", timeout = "3s", interval = "100ms" }}
{self._www() if self.with_www else ""}""")

    def _www(self) -> str:
        v = self.view
        return f"""
[targets.www]
mode = "postfix"
cert_path = "{v}/certs/www/cert.pem"
key_path = "{v}/certs/www/key.pem"
reload_command = "/bin/true"
validate_command = ""
names = ["www.fleet.test"]
labels = ["web"]
"""

    def start(self, broker: str, extra_env: dict[str, str] | None = None) -> None:
        for h in self.hosts.values():
            h.start()
        for h in self.hosts.values():
            h.start_worker(broker, extra_env)

    def stop(self) -> None:
        for h in self.hosts.values():
            try:
                h.stop()
            except Exception:
                pass

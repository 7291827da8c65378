"""A whole mail host for e2e tests and the demo: Postfix + Dovecot + targets file.

Layout under ``root``::

    certs/shared/{cert,key}.pem      the real files
    certs/postfix/{cert,key}.pem  -> ../shared/...   (what main.cf names)
    certs/dovecot/{cert,key}.pem  -> ../shared/...   (what dovecot.conf names)
    bin/                             real-command wrappers (see below)
    targets.toml, state/

Targets ``smtp`` (postfix) and ``imap`` (dovecot) point at the symlinks, so the two
daemons share one certificate, the common real-world setup. The reload and validate
commands are small wrappers that ``exec`` the real ``postfix -c DIR reload`` etc.,
and can be told to fail once (a marker file): real daemons, controllable faults.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .daemons import Dovecot, Postfix
from .pki import Issued

WRAPPER = """#!/bin/sh
# {name}: fails once if {marker} exists, pretends once (exit 0, does nothing) if
# {skip} exists, else runs the real command.
echo "$(date +%s.%N) {name}" >> {calls}
if [ -e {marker} ]; then rm -f {marker}; echo "{name}: failing on purpose" >&2; exit 1; fi
if [ -e {skip} ]; then rm -f {skip}; echo "{name}: skipped on purpose"; exit 0; fi
exec {real}
"""


class Wrapper:
    def __init__(self, bin_dir: Path, name: str, real: str) -> None:
        self.name = name
        self.path = bin_dir / name
        self.marker = bin_dir / f"{name}.fail-once"
        self.skip = bin_dir / f"{name}.skip-once"
        self.calls_file = bin_dir / f"{name}.calls"
        self.path.write_text(WRAPPER.format(name=name, marker=self.marker, skip=self.skip, calls=self.calls_file,
                                            real=real))
        os.chmod(self.path, 0o755)

    def fail_once(self) -> None:
        self.marker.touch()

    def skip_once(self) -> None:
        """The next call succeeds without doing anything: a reload that never happened."""
        self.skip.touch()

    @property
    def calls(self) -> int:
        return len(self.calls_file.read_text().splitlines()) if self.calls_file.exists() else 0


class MailStack:
    def __init__(self, root: Path, initial: Issued, host: str = "mx-e2e", pipeline: Any = None) -> None:
        self.root = root
        self.host = host
        self.security = pipeline.enroll(host, root / "keys") if pipeline is not None else None
        certs = root / "certs"
        self.shared = certs / "shared"
        self.shared.mkdir(parents=True)
        (self.shared / "cert.pem").write_bytes(initial.fullchain_pem)
        (self.shared / "key.pem").write_bytes(initial.key_pem)
        os.chmod(self.shared / "key.pem", 0o600)
        for daemon in ("postfix", "dovecot"):
            (certs / daemon).mkdir()
            for f in ("cert.pem", "key.pem"):
                (certs / daemon / f).symlink_to(Path("..") / "shared" / f)
        self.postfix = Postfix(root, certs / "postfix" / "cert.pem", certs / "postfix" / "key.pem")
        self.dovecot = Dovecot(root, certs / "dovecot" / "cert.pem", certs / "dovecot" / "key.pem")
        self.bin = root / "bin"
        self.bin.mkdir()
        self.pf_reload = Wrapper(self.bin, "postfix-reload", self.postfix.command("reload"))
        self.pf_check = Wrapper(self.bin, "postfix-check", self.postfix.command("check"))
        self.dv_reload = Wrapper(self.bin, "doveadm-reload", self.dovecot.reload_command())
        self.dv_check = Wrapper(self.bin, "doveconf-check", self.dovecot.validate_command())
        self.state = root / "state"
        self.config_path = root / "targets.json"
        self.targets: dict[str, dict[str, Any]] = {}
        self.add("smtp", "postfix", verify_port=self.postfix.smtp_port, protocol="smtp")
        self.add("imap", "dovecot", verify_port=self.dovecot.ports["imaps"], protocol="imaps")

    def add(self, name: str, mode: str, verify_port: int, protocol: str, verify_timeout: float = 10,
            **extra: Any) -> None:
        daemon = "postfix" if mode == "postfix" else "dovecot"
        reload, check = (self.pf_reload, self.pf_check) if mode == "postfix" else (self.dv_reload, self.dv_check)
        t: dict[str, Any] = {
            "mode": mode,
            # the private instance serving it: what check-config and the worker ask
            "instance": str(self.postfix.dir if mode == "postfix" else self.dovecot.conf),
            "cert_path": str(self.root / "certs" / daemon / "cert.pem"),
            "key_path": str(self.root / "certs" / daemon / "key.pem"),
            "reload_command": str(reload.path),
            "validate_command": str(check.path),
            "command_timeout": 30,
            "post_deploy_verify": {"enabled": True, "endpoint": f"127.0.0.1:{verify_port}", "protocol": protocol,
                                   "timeout": verify_timeout, "interval": 0.1},
        }
        t.update(extra)
        self.targets[name] = t
        self.write_config()

    def write_config(self) -> None:
        cfg: dict[str, Any] = {"host": self.host, "state_dir": str(self.state), "targets": self.targets}
        if self.security:
            cfg["security"] = self.security
        self.config_path.write_text(json.dumps(cfg, indent=1))

    def endpoints(self) -> dict[str, int]:
        """protocol name -> port, for every listener of both daemons."""
        return {"smtp": self.postfix.smtp_port, "smtps": self.postfix.smtps_port,
                **{k: v for k, v in self.dovecot.ports.items()}}

    def start(self) -> None:
        self.postfix.start()
        self.dovecot.start()

    def stop(self) -> None:
        self.postfix.stop()
        self.dovecot.stop()

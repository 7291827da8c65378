"""A mail host in a temp dir: cert files, state dir, fake commands, a targets file."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from mailtls_tasks.core.config import HostConfig, load_config
from mailtls_tasks.core.local import run_local
from mailtls_tasks.core.result import DeployResult

from .commands import FakeCommand
from .pki import Issued
from .tlsserver import TLSServer


class MailHost:
    def __init__(self, root: Path, host: str = "mx1") -> None:
        self.root = root
        self.host = host
        self.certs = root / "certs"
        self.certs.mkdir(parents=True, exist_ok=True)
        self.state = root / "state"
        self.bin = root / "bin"
        self.bin.mkdir(exist_ok=True)
        self.reload = FakeCommand(self.bin, "reload")
        self.validate = FakeCommand(self.bin, "validate")
        self.trigger = root / "reload-trigger"
        self.reload.touches(self.trigger)
        self.targets: dict[str, dict[str, Any]] = {}
        self.security: dict[str, Any] | None = None
        self.settings: dict[str, Any] = {}  # top-level extras: deploy_lease, recovery_interval, ...
        self.servers: list[TLSServer] = []
        self.config_path = root / "targets.json"

    # -- config -------------------------------------------------------------
    def add_target(self, name: str = "mx", **fields: Any) -> dict[str, Any]:
        t: dict[str, Any] = {
            "cert_path": str(self.certs / f"{name}-cert.pem"),
            "key_path": str(self.certs / f"{name}-key.pem"),
            "reload_command": str(self.reload.path),
            "validate_command": str(self.validate.path),
        }
        t.update(fields)
        self.targets[name] = t
        self.write_config()
        return t

    def write_config(self) -> Path:
        cfg: dict[str, Any] = {"host": self.host, "state_dir": str(self.state), "targets": self.targets,
                               **self.settings}
        if self.security:
            cfg["security"] = self.security
        self.config_path.write_text(json.dumps(cfg, indent=1))
        return self.config_path

    def enroll(self, pipeline: Any) -> None:
        """Give this host a key pair and trust the pipeline, as `mailtls keys` instructs."""
        self.security = pipeline.enroll(self.host, self.root / "keys")
        self.write_config()

    @property
    def config(self) -> HostConfig:
        return load_config(str(self.config_path))

    def path(self, target: str, role: str) -> Path:
        return Path(self.targets[target][f"{role}_path"])

    # -- disk ---------------------------------------------------------------
    def install(self, target: str, issued: Issued, *, fullchain: bool = True) -> None:
        """Put a set on disk by hand, as an operator would before the first deploy."""
        self.path(target, "cert").write_bytes(issued.fullchain_pem if fullchain else issued.cert_pem)
        self.path(target, "key").write_bytes(issued.key_pem)
        os.chmod(self.path(target, "key"), 0o600)
        if self.targets[target].get("chain_path"):
            self.path(target, "chain").write_bytes(issued.chain_pem)

    def snapshot(self) -> dict[str, tuple[bytes, int, int]]:
        out = {}
        for p in sorted(self.certs.rglob("*")):
            if p.is_file() and not p.is_symlink():
                st = p.stat()
                out[str(p)] = (p.read_bytes(), stat.S_IMODE(st.st_mode), st.st_mtime_ns)
        return out

    def stray_temps(self) -> list[Path]:
        return [p for p in self.certs.rglob("*") if ".mailtls-" in p.name]

    # -- daemons --------------------------------------------------------------
    def server(self, target: str, protocol: str = "tls", **kw: Any) -> TLSServer:
        srv = TLSServer(self.path(target, "cert"), self.path(target, "key"), protocol,
                        trigger=self.trigger, **kw)
        self.servers.append(srv)
        return srv

    def enable_verify(self, target: str, endpoint: str, timeout: float = 2.0, **kw: Any) -> None:
        self.targets[target]["post_deploy_verify"] = {"enabled": True, "endpoint": endpoint,
                                                      "timeout": timeout, "interval": 0.05, **kw}
        self.write_config()

    # -- deploying ------------------------------------------------------------
    def deploy(self, target: str, issued: Issued, *, chain: bytes | None = None, fullchain: bool = True,
               force: bool = False, deploy_id: str | None = None) -> DeployResult:
        cert = issued.fullchain_pem if fullchain else issued.cert_pem
        return run_local(self.config, target, cert, issued.key_pem, chain, force=force, deploy_id=deploy_id,
                         lock_timeout=5)

    def cli(self, *args: str, input_files: dict[str, bytes] | None = None) -> subprocess.CompletedProcess[str]:
        for name, data in (input_files or {}).items():
            (self.root / name).write_bytes(data)
        return subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", *args], capture_output=True, text=True,
                              cwd=self.root, env={**os.environ, "MAILTLS_CONFIG": str(self.config_path)},
                              timeout=120)

    def close(self) -> None:
        for s in self.servers:
            s.close()

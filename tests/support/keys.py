"""A pipeline signing key and per-host keys, set up the way the README tells operators to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mailtls_tasks.security.keys import create_host_key, create_signing_key


class Pipeline:
    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.key_path = root / "pipeline.key"
        self.public = create_signing_key(str(self.key_path))
        self.path = root / "pipeline.toml"
        self.hosts: dict[str, str] = {}
        self.notify: list[str] = []  # [notify] urls: where a halted rollout is announced
        self._write()

    def _write(self) -> None:
        lines = [f'signing_key = "{self.key_path}"', "", "[hosts]"]
        lines += [f'"{h}" = "{pub}"' for h, pub in sorted(self.hosts.items())]
        if self.notify:
            lines += ["", "[notify]", "halted = [" + ", ".join(f'"{u}"' for u in self.notify) + "]"]
        self.path.write_text("\n".join(lines) + "\n")

    def notify_to(self, *urls: str) -> None:
        self.notify = list(urls)
        self._write()

    def enroll(self, host: str, key_dir: Path) -> dict[str, Any]:
        """Create the host's key, pin it here, and return the host's [security] table."""
        key_dir.mkdir(parents=True, exist_ok=True)
        host_key = key_dir / "host.key"
        if not host_key.exists():
            self.hosts[host] = create_host_key(str(host_key))
            self._write()
        return {"host_keys": [str(host_key)], "trusted_signers": [self.public]}

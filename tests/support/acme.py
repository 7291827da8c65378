"""A real ACME server on loopback: Debian's pebble, with its own throwaway CA.

Challenges are taken as valid (``PEBBLE_VA_ALWAYS_VALID``): the tests exercise what
certbot does with a certificate once issued -- its deploy hook -- not DNS or HTTP
reachability. pebble's HTTPS listener gets a certificate from the test PKI, which
certbot trusts through ``REQUESTS_CA_BUNDLE``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .pki import PKI, issue
from .services import _kill_group, free_port, require, wait_port


class Pebble:
    def __init__(self, root: Path, pki: PKI) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port, self.mgmt_port = free_port(), free_port()
        tls = issue("localhost", pki.inter, sans=["localhost"], ips=["127.0.0.1"])
        (root / "cert.pem").write_bytes(tls.cert_pem + pki.inter.cert_pem)
        (root / "key.pem").write_bytes(tls.key_pem)
        self.ca_bundle = root / "ca.pem"
        self.ca_bundle.write_bytes(pki.root.cert_pem)
        (root / "pebble.json").write_text(json.dumps({"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}", "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
            "certificate": str(root / "cert.pem"), "privateKey": str(root / "key.pem"),
            "httpPort": free_port(), "tlsPort": free_port(), "ocspResponderURL": "",
            "externalAccountBindingRequired": False}}))
        env = {**os.environ, "PEBBLE_VA_ALWAYS_VALID": "1", "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
        self.proc = subprocess.Popen([require("pebble"), "-config", str(root / "pebble.json")],
                                     stdin=subprocess.DEVNULL, stdout=(root / "pebble.log").open("wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=root)
        wait_port(self.port, 20)

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def stop(self) -> None:
        _kill_group(self.proc)


class Certbot:
    """Debian's certbot with its own config, work and log dirs (never /etc/letsencrypt)."""

    def __init__(self, root: Path, pebble: Pebble) -> None:
        self.root, self.pebble = root, pebble
        self.http_port = free_port()
        self.env = {**os.environ, "REQUESTS_CA_BUNDLE": str(pebble.ca_bundle)}

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        base = [require("certbot"), "--non-interactive", "--agree-tos", "--register-unsafely-without-email",
                "--server", self.pebble.directory, "--config-dir", str(self.root / "etc"), "--work-dir",
                str(self.root / "work"), "--logs-dir", str(self.root / "logs"), "--no-random-sleep-on-renew"]
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=180,
                              env={**self.env, **(env or {})})

    def live(self, name: str) -> Path:
        return self.root / "etc" / "live" / name

    def log(self) -> str:
        p = self.root / "logs" / "letsencrypt.log"
        return p.read_text(errors="replace") if p.exists() else ""

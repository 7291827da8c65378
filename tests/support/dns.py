"""A DNSSEC world on loopback: nsd serving a signed and an unsigned zone, unbound
validating with the signed zone's DS as its only trust anchor.

``dane.test`` is signed with ``ldns-signzone`` (its answers come back with the AD bit);
``plain.test`` is not (answers without AD). Records are rewritten, re-signed and
reloaded on demand; unbound keeps nothing in its cache (``cache-max-ttl: 0``), so a
test sees a change at once -- while the TTL in the answers stays what the zone says,
which is what the DANE guard's ``min_age`` is computed from.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from .services import _kill_group, free_port, require

SIGNED, UNSIGNED = "dane.test", "plain.test"


class DnsWorld:
    def __init__(self, root: Path, ttl: int = 2) -> None:
        self.root, self.ttl = root, ttl
        root.mkdir(parents=True, exist_ok=True)
        self.nsd_port, self.port = free_port(), free_port()
        self.records: dict[str, list[str]] = {SIGNED: [], UNSIGNED: []}
        self._keys()
        self._write_zones()
        (root / "nsd.conf").write_text(f"""\
server:
  ip-address: 127.0.0.1@{self.nsd_port}
  port: {self.nsd_port}
  zonesdir: "{root}"
  database: ""
  zonelistfile: "{root}/zone.list"
  xfrdfile: "{root}/xfrd.state"
  xfrdir: "{root}"
  pidfile: "{root}/nsd.pid"
  logfile: "{root}/nsd.log"
  username: ""
  chroot: ""
  verbosity: 1
remote-control:
  control-enable: no
zone:
  name: "{SIGNED}"
  zonefile: "{SIGNED}.zone.signed"
zone:
  name: "{UNSIGNED}"
  zonefile: "{UNSIGNED}.zone"
""")
        (root / "unbound.conf").write_text(f"""\
server:
  interface: 127.0.0.1@{self.port}
  port: {self.port}
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{root}"
  pidfile: "{root}/unbound.pid"
  logfile: "{root}/unbound.log"
  use-syslog: no
  verbosity: 1
  val-log-level: 2
  access-control: 127.0.0.0/8 allow
  do-not-query-localhost: no
  module-config: "validator iterator"
  trust-anchor-file: "{root}/{SIGNED}.ds"
  cache-max-ttl: 0
  cache-max-negative-ttl: 0
  prefetch: no
  harden-dnssec-stripped: yes
  local-zone: "test." nodefault
stub-zone:
  name: "{SIGNED}"
  stub-addr: 127.0.0.1@{self.nsd_port}
stub-zone:
  name: "{UNSIGNED}"
  stub-addr: 127.0.0.1@{self.nsd_port}
""")
        self.nsd = subprocess.Popen([require("nsd"), "-d", "-c", str(root / "nsd.conf")], stdin=subprocess.DEVNULL,
                                    stdout=(root / "nsd.out").open("wb"), stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.unbound = subprocess.Popen([require("unbound"), "-d", "-c", str(root / "unbound.conf")],
                                        stdin=subprocess.DEVNULL, stdout=(root / "unbound.out").open("wb"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_answering()

    @property
    def resolver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _keys(self) -> None:
        keygen = require("ldns-keygen")
        ksk = subprocess.run([keygen, "-a", "ECDSAP256SHA256", "-k", SIGNED], cwd=self.root, capture_output=True,
                             text=True, check=True).stdout.strip()
        zsk = subprocess.run([keygen, "-a", "ECDSAP256SHA256", SIGNED], cwd=self.root, capture_output=True,
                             text=True, check=True).stdout.strip()
        self.ksk, self.zsk = ksk, zsk
        (self.root / f"{SIGNED}.ds").write_text((self.root / f"{ksk}.ds").read_text())

    def _write_zones(self) -> None:
        for zone in (SIGNED, UNSIGNED):
            lines = [f"$ORIGIN {zone}.", f"$TTL {self.ttl}",
                     f"@ IN SOA ns.{zone}. admin.{zone}. {int(time.time())} 3600 600 86400 {self.ttl}",
                     f"@ IN NS ns.{zone}.", "ns IN A 127.0.0.1", *self.records[zone]]
            (self.root / f"{zone}.zone").write_text("\n".join(lines) + "\n")
        keys = [str(self.root / self.zsk), str(self.root / self.ksk)]
        subprocess.run([require("ldns-signzone"), str(self.root / f"{SIGNED}.zone"), *keys], cwd=self.root,
                       check=True, capture_output=True)

    def set_tlsa(self, zone: str, owner: str, *spkis: str) -> None:
        """``owner`` (relative to ``zone``) gets a ``3 1 1`` record per SPKI hash (none: removed)."""
        self.records[zone] = [r for r in self.records[zone] if not r.startswith(owner + " ")]
        self.records[zone] += [f"{owner} IN TLSA 3 1 1 {h}" for h in spkis]
        self._write_zones()
        os.kill(self.nsd.pid, signal.SIGHUP)  # nsd reloads changed zone files
        time.sleep(0.5)

    def _wait_answering(self, timeout: float = 20) -> None:
        import dns.message
        import dns.query

        deadline = time.monotonic() + timeout
        while True:
            try:
                resp = dns.query.udp(dns.message.make_query(f"ns.{SIGNED}", "A", want_dnssec=True), "127.0.0.1",
                                     port=self.port, timeout=1)
                if resp.answer:
                    return
            except Exception:  # not up yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("unbound/nsd not answering:\n" + (self.root / "unbound.log").read_text()[-2000:]
                                   if (self.root / "unbound.log").exists() else "")
            time.sleep(0.2)

    def stop(self) -> None:
        _kill_group(self.unbound)
        _kill_group(self.nsd)

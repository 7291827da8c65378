"""The units of workers/ under a real systemd: a Debian 13 machine booted by
systemd-nspawn, its own Postfix 3.10, Dovecot 2.4 and Redis 8 started as Debian's units,
the package installed by `make install`, the worker, recover and audit units enabled,
every sandbox setting of theirs on.

One machine for the module, in order: deploys through the worker unit to both daemons;
`systemctl stop` in the middle of a deploy; the audit timer and its service; then a
worker killed inside commit and the machine's power pulled, and the boot after it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailtls_tasks.security.keys import create_host_key, create_signing_key
from tests.support.machine import Machine, install_package, trixie_root
from tests.support.pki import PKI, Issued
from tests.support.services import REPO, require

pytestmark = pytest.mark.e2e

HOST = "mx13"
FLOWER_AUTH = "ops:flower-pw"
FLOWER_TASKS = """
import base64, json, sys, urllib.request
req = urllib.request.Request("http://127.0.0.1:5555/api/tasks",
                             headers={"Authorization": "Basic " + base64.b64encode(sys.argv[1].encode()).decode()})
print(json.dumps(json.load(urllib.request.urlopen(req, timeout=10))))
"""
CLIENT_ENV = {"MAILTLS_BROKER_URL": "redis://127.0.0.1:6379/0", "MAILTLS_PIPELINE": "/etc/mailtls/pipeline.toml"}
SLOW = "/run/mailtls-test/slow-check"  # while it exists, the smtp target's validate_command takes 6 s
SLOW_CHECK = f"""#!/bin/sh
# postfix check, slowed down on request: a step long enough to stop the worker inside it
[ -e {SLOW} ] && sleep 6
exec /usr/sbin/postfix check
"""
PROBE = ("import sys; from mailtls_tasks.core import probe; "
         "print(probe.probe('127.0.0.1', int(sys.argv[1]), sys.argv[2]).fingerprint)")

TARGETS = """\
host = "{host}"

[targets.smtp]
mode = "postfix"
cert_path = "/etc/postfix/certs/cert.pem"
key_path = "/etc/postfix/certs/key.pem"
validate_command = "/usr/local/sbin/slow-postfix-check"
command_timeout = 30
post_deploy_verify = {{ enabled = true, timeout = 20, endpoints = [
  {{ endpoint = "127.0.0.1:25", protocol = "smtp" }}, {{ endpoint = "127.0.0.1:465", protocol = "smtps" }}] }}

[targets.imap]
mode = "dovecot"
cert_path = "/etc/dovecot/certs/cert.pem"
key_path = "/etc/dovecot/certs/key.pem"
post_deploy_verify = {{ enabled = true, timeout = 20, endpoints = [
  {{ endpoint = "127.0.0.1:143", protocol = "imap" }}, {{ endpoint = "127.0.0.1:993", protocol = "imaps" }}] }}

[security]
host_keys = ["/etc/mailtls/host.key"]
trusted_signers = ["{signer}"]
"""


class Host:
    def __init__(self, work: Path, pki: PKI) -> None:
        root = trixie_root()
        install_package(root)
        self.m = Machine(root, work, HOST)
        self.pki = pki
        self.first = pki.leaf()
        self._configure()

    def write(self, inside: str, data: bytes | str, mode: int = 0o644) -> None:
        p = self.m.path(inside)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        p.chmod(mode)

    def _configure(self) -> None:
        m, first = self.m, self.first
        self.write("/etc/hostname", HOST + "\n")
        self.m.path("/var/log/journal").mkdir(parents=True, exist_ok=True)  # the journal outlives a boot
        for d in ("postfix", "dovecot"):
            self.write(f"/etc/{d}/certs/cert.pem", first.fullchain_pem)
            self.write(f"/etc/{d}/certs/key.pem", first.key_pem, 0o600)
        m.offline("postconf", "-e", "myhostname = mx13.mailtls.test", "inet_protocols = ipv4",
                  "smtpd_tls_cert_file = /etc/postfix/certs/cert.pem",
                  "smtpd_tls_key_file = /etc/postfix/certs/key.pem", "smtpd_tls_security_level = may")
        m.offline("postconf", "-M", "465/inet = 465 inet n - y - - smtpd")
        m.offline("postconf", "-P", "465/inet/smtpd_tls_wrappermode = yes")
        # Dovecot 2.4's names (Debian 13): read after Debian's 10-ssl.conf, so they win
        self.write("/etc/dovecot/conf.d/99-mailtls.conf",
                   "ssl_server_cert_file = /etc/dovecot/certs/cert.pem\n"
                   "ssl_server_key_file = /etc/dovecot/certs/key.pem\n")
        self.write("/usr/local/sbin/slow-postfix-check", SLOW_CHECK, 0o755)
        # the pipeline's key and this host's, pinned both ways as the README says
        self.m.path("/etc/mailtls").mkdir(parents=True, exist_ok=True)
        self.m.path("/etc/mailtls").chmod(0o700)
        host_pub = create_host_key(str(self.m.path("/etc/mailtls/host.key")))
        signer = create_signing_key(str(self.m.path("/etc/mailtls/pipeline.key")))
        self.write("/etc/mailtls/pipeline.toml",
                   f'signing_key = "/etc/mailtls/pipeline.key"\n[hosts]\n{HOST} = "{host_pub}"\n', 0o600)
        self.write("/etc/mailtls/targets.toml", TARGETS.format(host=HOST, signer=signer), 0o600)
        self.write("/etc/mailtls/worker.env", f"MAILTLS_BROKER_URL={CLIENT_ENV['MAILTLS_BROKER_URL']}\n", 0o600)
        self.write("/etc/mailtls/flower.env", f"MAILTLS_BROKER_URL={CLIENT_ENV['MAILTLS_BROKER_URL']}\n"
                   f"MAILTLS_FLOWER_BASIC_AUTH={FLOWER_AUTH}\n", 0o600)
        for unit in ("mailtls-worker.service", "mailtls-recover.service", "mailtls-audit.service",
                     "mailtls-audit.timer", "mailtls-flower.service"):
            self.write(f"/etc/systemd/system/{unit}", (REPO / "workers" / unit).read_bytes())
        m.offline("systemctl", "enable", "mailtls-worker.service", "mailtls-recover.service", "mailtls-audit.timer",
                  "mailtls-flower.service")
        # the root carries them for other tests; this host runs none of them
        m.offline("systemctl", "mask", "unbound.service", "nsd.service")

    # -- inside the booted machine ---------------------------------------------------
    def file(self, inside: str) -> Path:
        """A file of the running machine, seen from here (through its PID 1's root)."""
        assert self.m.leader is not None
        return Path(f"/proc/{self.m.leader}/root") / inside.lstrip("/")

    def mailtls(self, *args: str, check: bool = True) -> tuple[int, str]:
        res = self.m.run("/usr/local/bin/mailtls", *args, check=False, env=CLIENT_ENV)
        if check and res.returncode not in (0, 2, 3, 4):
            raise RuntimeError(f"mailtls {args}: {res.returncode}\n{res.stdout}{res.stderr}")
        return res.returncode, res.stdout

    def bundle(self, leaf: Issued) -> tuple[str, str]:
        cert, key = f"/root/{leaf.fingerprint[:12]}.pem", f"/root/{leaf.fingerprint[:12]}.key"
        self.file(cert).write_bytes(leaf.fullchain_pem)
        self.file(key).write_bytes(leaf.key_pem)
        os.chmod(self.file(key), 0o600)
        return cert, key

    def served(self, port: int, protocol: str) -> str:
        return self.m.run("/opt/mailtls/bin/python", "-c", PROBE, str(port), protocol).stdout.strip()

    def record(self, target: str, deploy_id: str) -> dict[str, object]:
        p = self.file(f"/var/lib/mailtls/targets/{target}/deploys/{deploy_id}/record.json")
        return json.loads(p.read_text()) if p.exists() else {}

    def wait_registered(self, timeout: float = 60) -> None:
        """"active" is the worker's process started; a deploy needs it registered (each
        test waits for it: run alone, or after a reboot, none before it did)."""
        deadline = time.monotonic() + timeout
        while f"{HOST}" not in self.mailtls("targets", "--json", check=False)[1]:
            assert time.monotonic() < deadline, self.m.journal("-u", "mailtls-worker.service")[-2000:]
            time.sleep(0.5)

    def wait_record(self, target: str, deploy_id: str, what: str, ok: object, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.record(target, deploy_id).get(what) != ok:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} of {deploy_id} never {ok!r}: {self.record(target, deploy_id)}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def mx13(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[Host]:
    for tool in ("systemd-nspawn", "unshare", "nsenter", "debootstrap"):
        require(tool)  # the bootstrap installs them: under CI=true one missing fails
    host = Host(tmp_path_factory.mktemp("mx13"), pki)
    try:
        host.m.boot()
        yield host
    finally:
        host.m.shutdown()


def test_units_start_and_a_deploy_through_the_worker_reaches_both_daemons(mx13: Host) -> None:
    m = mx13.m
    # Debian 13: postfix.service is the instance itself (12 had postfix@-.service behind a wrapper)
    for unit in ("postfix.service", "dovecot.service", "redis-server.service", "mailtls-worker.service"):
        assert m.run("systemctl", "is-active", unit, check=False).stdout.strip() == "active", \
            (unit, m.journal("-u", unit)[-2000:])
    recover = m.run("systemctl", "show", "mailtls-recover.service", "-p", "ActiveState", "-p", "Result").stdout
    assert "ActiveState=active" in recover and "Result=success" in recover, recover
    assert mx13.served(25, "smtp") == mx13.first.fingerprint
    mx13.wait_registered()

    new = mx13.pki.leaf()
    cert, key = mx13.bundle(new)
    for target in ("smtp", "imap"):
        code, out = mx13.mailtls("deploy", f"{HOST}/{target}", "--cert", cert, "--key", key, "--json")
        res = json.loads(out)
        assert code == 0 and res["outcome"] == "deployed", out
        assert res["served_fingerprint_sha256"] == new.fingerprint
    for port, proto in ((25, "smtp"), (465, "smtps"), (143, "imap"), (993, "imaps")):
        assert mx13.served(port, proto) == new.fingerprint, (port, proto)
    story = mx13.m.journal("-u", "mailtls-worker.service")
    assert f"{HOST}/smtp" in story and "mailtls.verify" in story and "succeeded" in story, story[-3000:]


def test_flower_unit_keeps_its_task_list_across_a_restart_and_a_crash(mx13: Host) -> None:
    """Flower under its unit (DynamicUser, every sandbox setting): a deploy's rows are
    in its list with the outcome, and still there after `systemctl restart` (saved at
    the clean stop) and after a SIGKILL (saved by --state_save_interval before it)."""
    m = mx13.m
    mx13.wait_registered()
    cert, key = mx13.bundle(mx13.pki.leaf())
    code, out = mx13.mailtls("deploy", f"{HOST}/smtp", "--cert", cert, "--key", key, "--json")
    assert code == 0, out
    deploy_id = json.loads(out)["deploy_id"]

    def rows(timeout: float = 60) -> dict[str, dict[str, object]]:
        deadline = time.monotonic() + timeout
        while True:
            got = m.run("/opt/mailtls/bin/python", "-c", FLOWER_TASKS, FLOWER_AUTH, check=False)
            if got.returncode == 0:
                tasks = json.loads(got.stdout)
                mine = {t["name"]: t for t in tasks.values() if deploy_id in str(t.get("args") or "")}
                if "mailtls.verify" in mine:
                    return mine
            assert time.monotonic() < deadline, got.stderr[-1500:] + m.journal("-u", "mailtls-flower.service")[-1500:]
            time.sleep(1)

    first = rows()
    assert "'outcome': 'deployed'" in str(first["mailtls.verify"]["result"])
    assert "'outcome': 'deployed'" in str(first["mailtls.deploy"]["result"])  # the root row says how it ended
    m.run("systemctl", "restart", "mailtls-flower.service")
    assert rows()["mailtls.verify"]["uuid"] == first["mailtls.verify"]["uuid"]
    time.sleep(33)  # past one --state_save_interval (30 s) since it started again
    m.run("systemctl", "kill", "-s", "KILL", "mailtls-flower.service")
    time.sleep(12)  # Restart=on-failure, RestartSec=10s
    assert rows()["mailtls.verify"]["uuid"] == first["mailtls.verify"]["uuid"]
    assert m.run("systemctl", "show", "-p", "NRestarts", "--value", "mailtls-flower.service").stdout.strip() != "0"


def test_systemctl_stop_lets_the_step_finish_and_the_deploy_goes_on_after_start(mx13: Host) -> None:
    mx13.wait_registered()
    new = mx13.pki.leaf()
    cert, key = mx13.bundle(new)
    mx13.file(SLOW).parent.mkdir(exist_ok=True)
    mx13.file(SLOW).touch()
    code, out = mx13.mailtls("deploy", f"{HOST}/smtp", "--cert", cert, "--key", key, "--no-wait")
    deploy_id = out.strip()
    assert code == 0 and deploy_id, out
    mx13.wait_record("smtp", deploy_id, "in_step", "validate")
    t0 = time.monotonic()
    mx13.m.run("systemctl", "stop", "mailtls-worker.service")  # KillMode=mixed: SIGTERM to the main process
    assert time.monotonic() - t0 > 2, "the worker did not wait for the running step"
    rec = mx13.record("smtp", deploy_id)
    assert rec["phase"] == "validated" and rec["outcome"] is None and rec["in_step"] is None, rec
    assert mx13.served(25, "smtp") != new.fingerprint  # nothing committed while the worker is down

    mx13.file(SLOW).unlink()
    mx13.m.run("systemctl", "start", "mailtls-worker.service")
    code, out = mx13.mailtls("status", deploy_id, "--wait", "60", "--json")
    assert code == 0 and json.loads(out)["outcome"] == "deployed", out
    assert mx13.served(25, "smtp") == mx13.served(465, "smtps") == new.fingerprint


def test_the_audit_timer_is_loaded_and_its_service_exits_with_the_audits_code(mx13: Host) -> None:
    timers = mx13.m.run("systemctl", "list-timers", "--all", "--no-pager").stdout
    assert "mailtls-audit.timer" in timers, timers
    direct, table = mx13.mailtls("audit", "--local", check=False)
    mx13.m.run("systemctl", "start", "mailtls-audit.service", check=False)
    status = mx13.m.run("systemctl", "show", "mailtls-audit.service", "-p", "ExecMainStatus").stdout.strip()
    assert status == f"ExecMainStatus={direct}", (status, table)
    story = mx13.m.journal("-u", "mailtls-audit.service")
    assert f"{HOST}/smtp" in story and f"{HOST}/imap" in story and "TARGET" in story, story[-2000:]


def test_a_worker_killed_inside_commit_and_a_reboot_end_it_as_the_design_says(mx13: Host) -> None:
    """strace stops the worker's pool child at the rename of the certificate (the key is
    already renamed: the pair on disk does not match), then the machine loses power. At
    boot, mailtls-recover runs before Postfix and the worker and restores the old pair."""
    m = mx13.m
    old_cert = mx13.file("/etc/postfix/certs/cert.pem").read_bytes()
    old_key = mx13.file("/etc/postfix/certs/key.pem").read_bytes()
    mx13.wait_registered()
    main_pid = m.run("systemctl", "show", "-p", "MainPID", "--value", "mailtls-worker.service").stdout.strip()
    children = m.run("pgrep", "-P", main_pid, check=False).stdout.split()
    assert children, "the worker has no pool child"
    # The certificate's staged temp, by its name (strace 6.13's -P matches a rename by
    # its source path): the rename fails with EIO and the child stops on its way back,
    # before Python sees the error.
    deploy_id = f"power-{int(time.time())}"
    temp = f"/etc/postfix/certs/.cert.pem.mailtls-{deploy_id}.tmp"
    tracer = m.run("sh", "-c", "strace -f " + " ".join(f"-p {c}" for c in children)
                   + f" -P {temp} -e trace=rename,renameat,renameat2"
                   " -e inject=rename,renameat,renameat2:error=EIO:signal=STOP -o /run/strace.log"
                   " >/dev/null 2>&1 & echo $!").stdout.strip()
    time.sleep(1)  # strace attached
    new = mx13.pki.leaf()
    cert, key = mx13.bundle(new)
    code, out = mx13.mailtls("deploy", f"{HOST}/smtp", "--cert", cert, "--key", key, "--deploy-id", deploy_id,
                             "--no-wait")
    assert code == 0 and out.strip() == deploy_id, out
    deadline = time.monotonic() + 60
    while mx13.file("/etc/postfix/certs/key.pem").read_bytes() != new.key_pem:
        assert time.monotonic() < deadline, mx13.record("smtp", deploy_id)
        time.sleep(0.05)
    time.sleep(0.5)  # the child is stopped at the certificate's rename
    assert mx13.file("/etc/postfix/certs/cert.pem").read_bytes() == old_cert  # a mismatched pair on disk
    rec = mx13.record("smtp", deploy_id)
    assert rec["phase"] == "committing" and rec["in_step"] == "commit", rec
    assert tracer

    m.power_off()
    m.boot()

    assert m.path("/etc/postfix/certs/key.pem").exists()
    cert_now, key_now = (mx13.file("/etc/postfix/certs/cert.pem").read_bytes(),
                         mx13.file("/etc/postfix/certs/key.pem").read_bytes())
    assert (cert_now, key_now) == (old_cert, old_key)
    rec = mx13.record("smtp", deploy_id)
    assert rec["outcome"] == "rolled_back" and rec["reason"] == "interrupted", rec
    recovered = m.journal("-b", "-u", "mailtls-recover.service")
    assert deploy_id in recovered and "rolled_back" in recovered, recovered
    order = m.run("systemctl", "show", "-p", "ExecMainExitTimestampMonotonic", "--value",
                  "mailtls-recover.service").stdout.strip()
    # When Postfix's unit began to start (its ExecStartPre, `postfix check`, reads the files
    # too). Not ExecMainStart: Postfix's unit is Type=forking, and that stamp is 0 when
    # systemd learns the main pid (master) instead of spawning it.
    started = m.run("systemctl", "show", "-p", "InactiveExitTimestampMonotonic", "--value",
                    "postfix.service").stdout.strip()
    assert int(started) > 0, m.run("systemctl", "status", "--no-pager", "postfix.service", check=False).stdout
    assert 0 < int(order) <= int(started), "recover ran after Postfix started"
    assert mx13.served(25, "smtp") != new.fingerprint
    code, out = mx13.mailtls("status", deploy_id, "--wait", "60", "--json")
    assert code == 3 and json.loads(out)["outcome"] == "rolled_back", out  # the ending reached Redis too
    previous = m.journal("-b", "-1", "-u", "mailtls-worker.service")
    assert deploy_id in previous or f"{HOST}/smtp" in previous, previous[-2000:]

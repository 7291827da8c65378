"""The smaller holes of the protocol, on one host with real processes and files."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mailtls_tasks.core.journal import Journal
from mailtls_tasks.core.material import key_matches_cert
from tests.support.host import MailHost
from tests.support.pki import PKI, Issued
from tests.support.services import REPO, require


def _env(host: MailHost) -> dict[str, str]:
    return {**os.environ, "MAILTLS_CONFIG": str(host.config_path), "PYTHONPATH": str(REPO)}


def _start_local(host: MailHost, leaf: Issued, deploy_id: str) -> subprocess.Popen[str]:
    (host.root / "new-cert.pem").write_bytes(leaf.fullchain_pem)
    (host.root / "new-key.pem").write_bytes(leaf.key_pem)
    return subprocess.Popen([sys.executable, "-m", "mailtls_tasks.cli", "deploy", "mx", "--local", "--deploy-id",
                             deploy_id, "--cert", "new-cert.pem", "--key", "new-key.pem", "--json"],
                            cwd=host.root, env=_env(host), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(cond, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP: the SSH session it ran in closed
def test_sigterm_during_a_local_deploy_rolls_it_back(host: MailHost, pki: PKI, sig: signal.Signals) -> None:
    old, new = pki.leaf(), pki.leaf()
    host.add_target("mx")
    host.install("mx", old)
    host.reload.hang_once(30)
    proc = _start_local(host, new, "term-1")
    _wait(lambda: host.reload.calls)
    assert host.path("mx", "key").read_bytes() == new.key_pem  # committed; the reload hangs

    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)

    assert proc.returncode == 3, out + err
    res = json.loads(out)
    assert (res["outcome"], res["reason"]) == ("rolled_back", "interrupted")
    assert (host.path("mx", "cert").read_bytes(), host.path("mx", "key").read_bytes()) == (old.fullchain_pem,
                                                                                          old.key_pem)
    assert len(host.reload.calls) == 2  # the hung one (killed with its group) and the rollback's
    assert host.reload.running() == []
    assert Journal(str(host.state)).owners() == []


def _kill_during_verify(host: MailHost, pki: PKI) -> tuple[Issued, Issued]:
    """A deploy killed while verifying: the new set is committed and reloaded, but the
    listener has not picked it up yet (its reload hook is not wired to ours)."""
    old, new = pki.leaf(), pki.leaf()
    host.add_target("mx")
    host.install("mx", old)
    srv = host.server("mx", "smtp")
    srv.trigger = host.root / "daemon-reread"
    host.enable_verify("mx", srv.endpoint, timeout=30, protocol="smtp")
    proc = _start_local(host, new, "fwd-1")
    def verifying() -> bool:
        rec = Journal(str(host.state)).load("mx", "fwd-1")
        return rec is not None and rec.in_step == "verify"

    _wait(verifying)
    proc.kill()
    proc.communicate()
    return old, new


def test_recovery_rolls_forward_when_the_new_leaf_is_served(host: MailHost, pki: PKI) -> None:
    old, new = _kill_during_verify(host, pki)
    (host.root / "daemon-reread").touch()  # the daemon picks the new files up after all
    r = host.cli("recover")
    assert r.returncode == 0 and "fwd-1 -> deployed (recovered)" in r.stdout, r.stdout + r.stderr
    assert host.path("mx", "key").read_bytes() == new.key_pem
    rec = Journal(str(host.state)).load("mx", "fwd-1")
    assert rec is not None and rec.served_fingerprint == new.fingerprint
    del old


def test_recovery_rolls_back_when_the_new_leaf_is_not_served(host: MailHost, pki: PKI) -> None:
    old, new = _kill_during_verify(host, pki)
    r = host.cli("recover")
    assert r.returncode == 0 and "fwd-1 -> rolled_back (interrupted)" in r.stdout, r.stdout + r.stderr
    assert host.path("mx", "key").read_bytes() == old.key_pem
    del new


def test_recover_exits_4_when_a_recovery_ends_failed(host: MailHost, pki: PKI) -> None:
    old, new = pki.leaf(), pki.leaf()
    host.add_target("mx")
    host.install("mx", old)
    host.reload.hang_once(30)
    proc = _start_local(host, new, "dies-1")
    _wait(lambda: host.reload.calls)
    proc.kill()
    proc.communicate()
    subprocess.run(["pkill", "-KILL", "-f", str(host.reload.path)], check=False)
    host.reload.fail()  # the daemon's reload is broken now: recovery cannot finish cleanly

    r = host.cli("recover")

    assert r.returncode == 4, r.stdout + r.stderr
    assert "dies-1 -> failed" in r.stdout and "on disk:" in r.stdout
    cert, key = host.path("mx", "cert").read_bytes(), host.path("mx", "key").read_bytes()
    assert (cert, key) == (old.fullchain_pem, old.key_pem) and key_matches_cert(key, cert)


def test_a_full_disk_on_the_first_journal_write_is_named(host: MailHost, pki: PKI) -> None:
    """ENOSPC on the very first write of the journal: exit 1 naming the file and errno,
    nothing touched (it used to read "deploy X is unknown on this host", exit 2)."""
    strace = require("strace")
    old, new = pki.leaf(), pki.leaf()
    host.add_target("mx")
    host.install("mx", old)
    before = host.snapshot()
    (host.root / "c.pem").write_bytes(new.fullchain_pem)
    (host.root / "k.pem").write_bytes(new.key_pem)
    # the first write of the deploy's journal: its intent file
    intent = host.state / "targets" / "mx" / "deploys" / "full-1" / "intent"
    p = subprocess.run([strace, "-f", "-qq", "-o", "/dev/null", "-P", str(intent), "-e", "trace=write", "-e",
                        "inject=write:error=ENOSPC", sys.executable, "-m", "mailtls_tasks.cli", "deploy", "mx",
                        "--local", "--deploy-id", "full-1", "--cert", "c.pem", "--key", "k.pem"], cwd=host.root,
                       env=_env(host), capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"journal: cannot write {intent}: [ENOSPC] No space left on device" in p.stderr, p.stderr
    assert host.snapshot() == before


@pytest.mark.integration
def test_flower_never_gets_the_broker_password_on_a_command_line(tmp_path, redis_server) -> None:  # type: ignore[no-untyped-def]
    """Broker URL and basic auth from a 0600 --env-file: neither is on any command line,
    and the auth is enforced."""
    import base64
    import urllib.error
    import urllib.request

    from tests.support.services import free_port, wait_port

    url = redis_server.url.replace("redis://", "redis://:pw-on-cmdline-NEVER@")
    env_file = tmp_path / "flower.env"
    fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, f"# flower\nMAILTLS_BROKER_URL={url}\nMAILTLS_FLOWER_BASIC_AUTH=ops:auth-NEVER-on-argv\n".encode())
    os.close(fd)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILTLS_")}
    proc = subprocess.Popen([sys.executable, "-m", "mailtls_tasks.cli", "flower", "--port", str(port),
                             "--env-file", str(env_file)],
                            env={**env, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port, timeout=30)
        pids = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert pids  # `mailtls flower` became Flower (exec): SIGTERM reaches it, nothing is left behind
        assert b"flower" in open(f"/proc/{proc.pid}/cmdline", "rb").read()
        for pid in pids:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            assert b"pw-on-cmdline-NEVER" not in cmdline, cmdline
            assert b"auth-NEVER-on-argv" not in cmdline, cmdline
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/workers", timeout=10)
        assert denied.value.code == 401
        basic = "Basic " + base64.b64encode(b"ops:auth-NEVER-on-argv").decode()
        ok = urllib.request.Request(f"http://127.0.0.1:{port}/workers", headers={"Authorization": basic})
        with urllib.request.urlopen(ok, timeout=10) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)  # as systemd stops it: the process, not its group
        proc.wait(20)
        left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert left == [], f"SIGTERM to `mailtls flower` left {left} running"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    del tmp_path


@pytest.mark.parametrize(("args", "env_mode", "why"), [
    (["--basic-auth=ops:pw"], None, "not on the command line"),
    (["--basic_auth=ops:pw"], None, "not on the command line"),
    (["--broker=redis://:pw@127.0.0.1:1/0"], None, "not on the command line"),
    (["--address", "0.0.0.0"], None, "MAILTLS_FLOWER_BASIC_AUTH"),
    (["--env-file", "{env}"], 0o644, "chmod 0600"),
])
def test_flower_refuses_secrets_on_argv_open_env_files_and_no_auth_off_loopback(
        tmp_path, args, env_mode, why) -> None:  # type: ignore[no-untyped-def]
    env_file = tmp_path / "flower.env"
    env_file.write_text("MAILTLS_FLOWER_BASIC_AUTH=ops:pw\n")
    if env_mode is not None:
        os.chmod(env_file, env_mode)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILTLS_")}
    p = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "flower", "--port", "1",
                        *(a.format(env=env_file) for a in args)],
                       env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and why in p.stderr, p.stderr

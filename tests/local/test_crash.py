"""A deploy killed at any point is recovered to a matching old set.

The deploy runs in a child process that dies for real (``os._exit`` right after the
k-th rename of the commit, or SIGKILL while the reload command runs); recovery then
runs in a fresh process, as it would after a reboot or a worker restart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from mailtls_tasks.core.journal import Journal
from mailtls_tasks.core.material import key_matches_cert
from tests.support.host import MailHost
from tests.support.pki import PKI
from tests.support.services import REPO

CHILD = r"""
import os, sys
from mailtls_tasks.core import files
from mailtls_tasks.core.config import load_config
from mailtls_tasks.core.local import run_local

crash_after = int(sys.argv[1])
real_replace = files.replace
count = 0
def dying_replace(src, dest):
    global count
    ours = ".mailtls-" in os.path.basename(src)
    if ours and crash_after == 0:
        os._exit(137)
    real_replace(src, dest)
    if ours:
        count += 1
        if count == crash_after:
            os._exit(137)
files.replace = dying_replace
cert, key = open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
run_local(load_config(), "mx", cert, key, deploy_id="crashing-1")
print("finished without crashing")
"""


def _setup(host: MailHost, pki: PKI):  # type: ignore[no-untyped-def]
    old, new = pki.leaf(), pki.leaf()
    host.add_target("mx", chain_path=str(host.certs / "mx-chain.pem"))
    host.install("mx", old)
    (host.root / "new-cert.pem").write_bytes(new.fullchain_pem)
    (host.root / "new-key.pem").write_bytes(new.key_pem)
    return old, new


def _env(host: MailHost) -> dict[str, str]:
    return {**os.environ, "MAILTLS_CONFIG": str(host.config_path), "PYTHONPATH": str(REPO)}


def _assert_old_set_live_and_recorded(host: MailHost, before: dict[str, tuple[bytes, int]]) -> None:
    assert {k: v[:2] for k, v in host.snapshot().items()} == before
    assert key_matches_cert(host.path("mx", "key").read_bytes(), host.path("mx", "cert").read_bytes())
    assert host.stray_temps() == []
    rec = Journal(str(host.state)).load("mx", "crashing-1")
    assert rec is not None and rec.outcome == "rolled_back" and rec.reason == "interrupted"


@pytest.mark.parametrize("crash_after", [0, 1, 2, 3])
def test_crash_between_renames_is_recovered(host: MailHost, pki: PKI, crash_after: int) -> None:
    """The process dies after k of the 3 renames (chain, key, cert); 0 = just before the first."""
    _setup(host, pki)
    before = {k: v[:2] for k, v in host.snapshot().items()}
    p = subprocess.run([sys.executable, "-c", CHILD, str(crash_after), str(host.root / "new-cert.pem"),
                        str(host.root / "new-key.pem")], env=_env(host), capture_output=True, text=True, timeout=60)
    assert p.returncode == 137, p.stdout + p.stderr
    if crash_after == 2:  # new key, old cert: a mismatched pair really is live now
        assert not key_matches_cert(host.path("mx", "key").read_bytes(), host.path("mx", "cert").read_bytes())
    reloads_before = len(host.reload.calls)

    r = host.cli("recover")

    assert r.returncode == 0, r.stderr
    assert "crashing-1 -> rolled_back (interrupted)" in r.stdout
    _assert_old_set_live_and_recorded(host, before)
    assert len(host.reload.calls) == reloads_before + 1  # the daemon re-reads the restored files


def test_sigkill_during_reload_recovered_by_next_local_run(host: MailHost, pki: PKI) -> None:
    old, new = _setup(host, pki)
    before = {k: v[:2] for k, v in host.snapshot().items()}
    host.reload.hang_once(30)
    proc = subprocess.Popen([sys.executable, "-m", "mailtls_tasks.cli", "deploy", "mx", "--local",
                             "--deploy-id", "crashing-1", "--cert", str(host.root / "new-cert.pem"),
                             "--key", str(host.root / "new-key.pem")],
                            env=_env(host), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not host.reload.calls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.reload.calls, "reload never started"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # new set committed, old one in the backup: the journal must undo it
    assert host.path("mx", "cert").read_bytes() == new.cert_pem

    # the next deploy on this host recovers first, then does its own work
    later = pki.leaf()
    r = host.deploy("mx", later)
    assert r.outcome == "deployed"
    rec = Journal(str(host.state)).load("mx", "crashing-1")
    assert rec is not None and rec.outcome == "rolled_back" and rec.reason == "interrupted"
    assert r.previous_fingerprint_sha256 == old.fingerprint  # recovery restored the old set first
    del before


def test_recovery_skips_a_deploy_whose_owner_is_alive(host: MailHost, pki: PKI) -> None:
    """A held target lock means a live process owns the journal entry: hands off."""
    _setup(host, pki)
    host.reload.hang_once(3)
    proc = subprocess.Popen([sys.executable, "-m", "mailtls_tasks.cli", "deploy", "mx", "--local",
                             "--deploy-id", "crashing-1", "--cert", str(host.root / "new-cert.pem"),
                             "--key", str(host.root / "new-key.pem"), "--json"],
                            env=_env(host), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not host.reload.calls and time.monotonic() < deadline:
        time.sleep(0.05)
    r = host.cli("recover")
    assert "nothing to recover" in r.stdout
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and '"deployed"' in out


def test_boot_recovery_with_the_daemon_not_yet_running_ends_rolled_back(host: MailHost, pki: PKI) -> None:
    """The boot unit runs `recover --boot` before Postfix starts: the deploy died after
    its commit, the restored files are what the daemon will start on; a reload that
    fails (nothing is running) is not an operator's problem there. Without --boot the
    same state ends `failed` (exit 4), as a reload failure must on a running host."""
    _setup(host, pki)
    before = {k: v[:2] for k, v in host.snapshot().items()}
    p = subprocess.run([sys.executable, "-c", CHILD, "3", str(host.root / "new-cert.pem"),
                        str(host.root / "new-key.pem")], env=_env(host), capture_output=True, text=True, timeout=60)
    assert p.returncode == 137, p.stdout + p.stderr
    host.reload.fail(1)  # "the postfix mail system is not running"

    r = host.cli("recover", "--boot")

    assert r.returncode == 0, r.stdout + r.stderr
    assert "crashing-1 -> rolled_back (interrupted)" in r.stdout
    _assert_old_set_live_and_recorded(host, before)
    rec = Journal(str(host.state)).load("mx", "crashing-1")
    assert rec is not None and "restored at boot" in (rec.error or "")


def test_recovery_without_boot_calls_a_failed_reload_failed(host: MailHost, pki: PKI) -> None:
    _setup(host, pki)
    p = subprocess.run([sys.executable, "-c", CHILD, "3", str(host.root / "new-cert.pem"),
                        str(host.root / "new-key.pem")], env=_env(host), capture_output=True, text=True, timeout=60)
    assert p.returncode == 137, p.stdout + p.stderr
    host.reload.fail(1)
    r = host.cli("recover")
    assert r.returncode == 4 and "crashing-1 -> failed" in r.stdout, r.stdout + r.stderr

"""Exim for real: Debian 12's 4.96 and Debian 13's 4.98, installed by apt in a root of
their own (Exim conflicts with Postfix), on loopback high ports from config files in
temp dirs, beside a real Dovecot and (for the worker's path) a real Redis and worker.

What a deploy to Exim must do: serve the new pair on STARTTLS and on connect (465),
each of a dual RSA + ECDSA pair to a client that asks for it, keep the key readable by
Debian-exim, roll a failing verify back byte for byte, share a certificate with Dovecot
(two targets, and one batch), leave a consistent pair served after a crash at any
rename; and ``discover`` reads a stock Debian configuration as ``update-exim4.conf``
writes it, with 465 opened through ``/etc/default/exim4``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailtls_tasks.core import probe
from mailtls_tasks.core.batch import Member, run_batch
from mailtls_tasks.core.config import load_config
from mailtls_tasks.core.journal import Journal
from mailtls_tasks.core.local import run_local
from mailtls_tasks.core.material import fingerprint, key_matches_cert, leaf_of_file
from mailtls_tasks.core.result import DeployResult
from mailtls_tasks.distributed.workflow import deploy
from tests.faults.harness import Case, count_calls, strace_prefix
from tests.support.daemons import Dovecot
from tests.support.exim import Exim, exim_ids, exim_version, need_exim_root, place_key
from tests.support.keys import Pipeline
from tests.support.pki import PKI, Issued
from tests.support.services import REPO, RedisServer, Worker, require

pytestmark = pytest.mark.e2e
Deploy = Callable[..., DeployResult]


def served(port: int, proto: str, algorithm: str | None = None) -> str:
    return probe.probe("127.0.0.1", port, proto, algorithm=algorithm).fingerprint


def openssl_served(port: int, *, starttls: bool, sigalgs: str) -> str:
    """What an independent client (openssl s_client) is served when it accepts only
    ``sigalgs``: an RSA client gets the RSA certificate, an ECDSA one the ECDSA one."""
    args = [require("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", "-sigalgs", sigalgs, "-showcerts"]
    if starttls:
        args += ["-starttls", "smtp"]
    out = subprocess.run(args, input="QUIT\n", capture_output=True, text=True, timeout=20).stdout
    start = out.index("-----BEGIN CERTIFICATE-----")
    end = out.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    leaf = leaf_of_file(out[start:end].encode())
    assert leaf is not None
    return fingerprint(leaf)


def snapshot(*paths: Path) -> list[tuple[bytes, int, int, int]]:
    out = []
    for p in paths:
        st = p.stat()
        out.append((p.read_bytes(), st.st_mode & 0o7777, st.st_uid, st.st_gid))
    return out


class EximHost:
    """Exim A (one certificate, shared with Dovecot), Exim B (RSA + ECDSA), targets."""

    def __init__(self, root: Path, pki: PKI, pipeline: Pipeline) -> None:
        self.root, self.pki = root, pki
        certs = root / "certs"
        shared = certs / "shared"
        shared.mkdir(parents=True)
        self.first = pki.leaf()
        (shared / "cert.pem").write_bytes(self.first.fullchain_pem)
        place_key(shared / "key.pem", self.first.key_pem)
        for d, names in (("exim", ("exim.crt", "exim.key")), ("dovecot", ("cert.pem", "key.pem"))):
            (certs / d).mkdir()
            for name, real in zip(names, ("cert.pem", "key.pem"), strict=True):
                (certs / d / name).symlink_to(Path("..") / "shared" / real)
        self.cert, self.key = certs / "exim" / "exim.crt", certs / "exim" / "exim.key"
        self.a = Exim(root / "a", [self.cert], [self.key])
        self.dovecot = Dovecot(root, certs / "dovecot" / "cert.pem", certs / "dovecot" / "key.pem")
        dual = certs / "dual"
        dual.mkdir()
        self.rsa0, self.ec0 = pki.leaf(kind="rsa"), pki.leaf()
        (dual / "rsa.crt").write_bytes(self.rsa0.fullchain_pem)
        place_key(dual / "rsa.key", self.rsa0.key_pem)
        (dual / "ec.crt").write_bytes(self.ec0.fullchain_pem)
        place_key(dual / "ec.key", self.ec0.key_pem)
        self.dual = dual
        self.b = Exim(root / "b", [dual / "rsa.crt", dual / "ec.crt"], [dual / "rsa.key", dual / "ec.key"])
        # files Exim A does not read, verified on A: the verify can never see their leaf
        self.wrong = certs / "wrong"
        self.wrong.mkdir()
        (self.wrong / "exim.crt").write_bytes(self.first.fullchain_pem)
        place_key(self.wrong / "exim.key", self.first.key_pem)
        self.host = "mx-exim"
        self.security = pipeline.enroll(self.host, root / "keys")
        self.state = root / "state"
        self.config = root / "targets.json"
        a, b = self.a, self.b
        verify_a = {"enabled": True, "timeout": 10, "interval": 0.1, "endpoints": [
            {"endpoint": f"127.0.0.1:{a.smtp_port}", "protocol": "smtp"},
            {"endpoint": f"127.0.0.1:{a.smtps_port}", "protocol": "smtps"}]}
        self.targets: dict[str, dict[str, Any]] = {
            "smtp": {"mode": "exim", "instance": str(a.conf), "cert_path": str(self.cert), "key_path": str(self.key),
                     "pid_file": str(a.pid_file), "validate_command": a.validate_command(),
                     "post_deploy_verify": verify_a},
            "imap": {"mode": "dovecot", "instance": str(self.dovecot.conf),
                     "cert_path": str(certs / "dovecot" / "cert.pem"), "key_path": str(certs / "dovecot" / "key.pem"),
                     "reload_command": self.dovecot.reload_command(),
                     "validate_command": self.dovecot.validate_command(),
                     "post_deploy_verify": {"enabled": True, "endpoint": f"127.0.0.1:{self.dovecot.ports['imaps']}",
                                            "protocol": "imaps", "timeout": 10, "interval": 0.1}},
            "dual": {"mode": "exim", "instance": str(b.conf), "cert_path": str(dual / "rsa.crt"),
                     "key_path": str(dual / "rsa.key"), "key_type": "rsa",
                     "alt": {"cert_path": str(dual / "ec.crt"), "key_path": str(dual / "ec.key"), "key_type": "ecdsa"},
                     "pid_file": str(b.pid_file), "validate_command": b.validate_command(),
                     "post_deploy_verify": {"enabled": True, "endpoint": f"127.0.0.1:{b.smtps_port}",
                                            "protocol": "smtps", "timeout": 10, "interval": 0.1}},
            "wrong": {"mode": "exim", "instance": str(a.conf), "cert_path": str(self.wrong / "exim.crt"),
                      "key_path": str(self.wrong / "exim.key"), "pid_file": str(a.pid_file),
                      "validate_command": a.validate_command(),
                      "post_deploy_verify": {"enabled": True, "endpoint": f"127.0.0.1:{a.smtps_port}",
                                             "protocol": "smtps", "timeout": 2, "interval": 0.1}},
        }
        self.write_config()
        self.a.start()
        self.b.start()
        self.dovecot.start()

    def write_config(self) -> None:
        self.config.write_text(json.dumps({"host": self.host, "state_dir": str(self.state),
                                           "security": self.security, "targets": self.targets}, indent=1))

    def cli(self, *args: str, prefix: list[str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*(prefix or []), sys.executable, "-m", "mailtls_tasks.cli", *args],
                              capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, "MAILTLS_CONFIG": str(self.config), "PYTHONPATH": str(REPO)})

    def close(self) -> None:
        self.a.stop()
        self.b.stop()
        self.dovecot.stop()


@pytest.fixture(scope="module")
def eh(tmp_path_factory: pytest.TempPathFactory, pki: PKI, pipeline: Pipeline) -> Iterator[EximHost]:
    need_exim_root()
    h = EximHost(tmp_path_factory.mktemp("exim"), pki, pipeline)
    print(f"Exim {exim_version()}")
    try:
        yield h
    finally:
        h.close()


@pytest.fixture(scope="module")
def worker(eh: EximHost, redis_server: RedisServer) -> Iterator[Worker]:
    w = Worker(eh.config, redis_server.url, eh.root / "worker.log")
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture(params=["local", "worker"])
def run(request: pytest.FixtureRequest, eh: EximHost, redis_server: RedisServer) -> Deploy:
    def via_local(target: str, leaf: Issued, **kw: Any) -> DeployResult:
        return run_local(load_config(str(eh.config)), target, leaf.fullchain_pem, leaf.key_pem, **kw)

    def via_worker(target: str, leaf: Issued, **kw: Any) -> DeployResult:
        request.getfixturevalue("worker")
        return deploy(target, leaf.fullchain_pem, leaf.key_pem, broker_url=redis_server.url, host=eh.host,
                      **kw).get(timeout=120)

    return via_local if request.param == "local" else via_worker


def test_a_deploy_is_served_on_starttls_and_on_connect_and_debian_exim_reads_the_key(
        eh: EximHost, run: Deploy) -> None:
    leaf = eh.pki.leaf()
    pid = eh.a.pid
    hups = eh.a.log().count("SIGHUP received")
    res = run("smtp", leaf)
    assert res.outcome == "deployed", res
    assert served(eh.a.smtp_port, "smtp") == served(eh.a.smtps_port, "smtps") == leaf.fingerprint
    real_key = eh.key.resolve()
    st = real_key.stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, 0, exim_ids()[1])  # root:Debian-exim 0640
    assert eh.cert.read_bytes() == leaf.fullchain_pem and eh.key.read_bytes() == leaf.key_pem
    # the reload was a HUP to the pid in the pid file: the daemon re-exec'd in place
    assert eh.a.pid == pid and eh.a.log().count("SIGHUP received") == hups + 1


def test_a_new_key_file_is_made_root_debian_exim_0640(eh: EximHost, tmp_path: Path) -> None:
    """Where no key file exists yet, the one written is what Debian's Exim can read
    (0600 root, the rule for every other daemon, would be a key it cannot load)."""
    fresh = eh.root / "certs" / "fresh"
    fresh.mkdir(exist_ok=True)
    for p in fresh.iterdir():
        p.unlink()
    eh.targets["fresh"] = {**eh.targets["wrong"], "cert_path": str(fresh / "exim.crt"),
                           "key_path": str(fresh / "exim.key"),
                           "post_deploy_verify": {"enabled": False}}
    eh.write_config()
    try:
        res = run_local(load_config(str(eh.config)), "fresh", eh.pki.leaf().fullchain_pem, eh.pki.leaf().key_pem)
        assert res.outcome == "rejected"  # the key is not the certificate's: nothing written
        assert not (fresh / "exim.key").exists()
        leaf = eh.pki.leaf()
        res = run_local(load_config(str(eh.config)), "fresh", leaf.fullchain_pem, leaf.key_pem)
        assert res.outcome == "deployed", res
        st = (fresh / "exim.key").stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, 0, exim_ids()[1])
        assert (fresh / "exim.crt").stat().st_mode & 0o7777 == 0o644
    finally:
        del eh.targets["fresh"]
        eh.write_config()


def test_dual_certificates_each_go_to_the_client_that_asks_for_it(eh: EximHost, run: Deploy) -> None:
    rsa, ec = eh.pki.leaf(kind="rsa"), eh.pki.leaf()
    res = run("dual", rsa, also=[(ec.fullchain_pem, ec.key_pem, None)])
    assert res.outcome == "deployed", res
    rsa_algs, ec_algs = "rsa_pss_rsae_sha256:rsa_pkcs1_sha256", "ecdsa_secp256r1_sha256"
    for port, starttls in ((eh.b.smtps_port, False), (eh.b.smtp_port, True)):
        assert openssl_served(port, starttls=starttls, sigalgs=rsa_algs) == rsa.fingerprint
        assert openssl_served(port, starttls=starttls, sigalgs=ec_algs) == ec.fingerprint
    assert (eh.dual / "rsa.crt").read_bytes() == rsa.fullchain_pem
    assert (eh.dual / "ec.key").read_bytes() == ec.key_pem


def test_a_failing_verify_is_rolled_back_byte_for_byte(eh: EximHost, run: Deploy) -> None:
    """A target whose files Exim A does not read, verified on A: the new leaf is never
    served there. Its files hold what A serves now, so the restored set is served."""
    files = (eh.wrong / "exim.crt", eh.wrong / "exim.key")
    files[0].write_bytes(eh.cert.read_bytes())
    place_key(files[1], eh.key.read_bytes())
    before = snapshot(*files)
    serving = served(eh.a.smtps_port, "smtps")
    res = run("wrong", eh.pki.leaf())
    assert res.outcome == "rolled_back", res
    assert "did not serve" in (res.error or ""), res
    assert snapshot(*files) == before
    assert served(eh.a.smtps_port, "smtps") == serving  # Exim A kept what it served


def test_without_gnutls_tools_a_deploy_is_refused_not_waved_through(eh: EximHost,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The staged files are loaded with GnuTLS (certtool), the library Exim uses: a host
    where that cannot be done refuses the deploy, saying what to install, and nothing
    live changes -- an unchecked pair is not passed as checked."""
    leaf = eh.pki.leaf()
    before = snapshot(eh.cert.resolve(), eh.key.resolve())
    bare = eh.root / "bare-bin"
    bare.mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(bare))
    res = run_local(load_config(str(eh.config)), "smtp", leaf.fullchain_pem, leaf.key_pem)
    assert res.outcome == "rejected", res
    assert "certtool (gnutls-bin) is not installed" in (res.error or "")
    assert snapshot(eh.cert.resolve(), eh.key.resolve()) == before


def _version() -> tuple[int, ...]:
    return tuple(int(n) for n in exim_version().split(".")[:2] if n.isdigit())


def _swap(cert: Path, key: Path, leaf: Issued) -> None:
    """The files replaced as a deploy's commit replaces them (an atomic rename each),
    with nobody telling Exim."""
    for path, data in ((key, leaf.key_pem), (cert, leaf.fullchain_pem)):
        tmp = path.with_name(f".{path.name}.swap")
        if path == key:
            place_key(tmp, data)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)


def test_without_a_reload_exim_sees_a_swapped_file_but_not_a_swapped_symlink_target(eh: EximHost) -> None:
    """What Exim serves when its files change and nobody tells it (README says what was
    found). Since 4.95 it loads static credentials once and watches the files it names:
    a file named directly and replaced is served a few seconds later, no HUP. A name
    that is a symlink (certbot's live/ files, a file shared with Dovecot) whose target
    is replaced: 4.96 never sees it, the old pair stays served until a HUP; 4.98 does.
    Hence the HUP by default, and verify either way."""
    rsa = eh.pki.leaf(kind="rsa")
    hups = eh.b.log().count("SIGHUP received")
    _swap(eh.dual / "rsa.crt", eh.dual / "rsa.key", rsa)
    start = time.monotonic()
    while served(eh.b.smtps_port, "smtps", algorithm="rsa") != rsa.fingerprint:
        assert time.monotonic() - start < 15, "Exim never served a swapped file it names directly"
        time.sleep(0.2)
    direct = time.monotonic() - start
    assert eh.b.log().count("SIGHUP received") == hups
    leaf = eh.pki.leaf()
    before = served(eh.a.smtps_port, "smtps")
    shared = eh.cert.resolve().parent
    _swap(shared / "cert.pem", shared / "key.pem", leaf)
    time.sleep(max(8.0, 2 * direct))
    after = served(eh.a.smtps_port, "smtps")
    sees = after == leaf.fingerprint
    print(f"Exim {exim_version()}: a swapped file served after {direct:.1f} s without a reload; a swapped "
          f"symlink target {'served too' if sees else 'still not served'} after {max(8.0, 2 * direct):.0f} s")
    # as measured: 4.96 (Debian 12) never sees it, 4.98 (Debian 13) does
    assert sees == (_version() >= (4, 98)), f"Exim {exim_version()} changed: symlink target seen = {sees}"
    assert after in (before, leaf.fingerprint) and before != leaf.fingerprint
    # a deploy of the bytes now in place: live and served (4.98), or live but not
    # served (4.96) -- then it reloads and verifies
    res = run_local(load_config(str(eh.config)), "smtp", leaf.fullchain_pem, leaf.key_pem)
    assert res.outcome == ("unchanged" if sees else "deployed"), res
    assert served(eh.a.smtps_port, "smtps") == served(eh.a.smtp_port, "smtp") == leaf.fingerprint


def test_exim_and_dovecot_sharing_one_certificate(eh: EximHost) -> None:
    """Two targets: the second finds the bytes in place, reloads and verifies. Then
    both as one batch."""
    leaf = eh.pki.leaf()
    cfg = load_config(str(eh.config))
    assert run_local(cfg, "smtp", leaf.fullchain_pem, leaf.key_pem).outcome == "deployed"
    second = run_local(cfg, "imap", leaf.fullchain_pem, leaf.key_pem)
    assert second.outcome == "deployed", second
    assert served(eh.dovecot.ports["imaps"], "imaps") == served(eh.a.smtps_port, "smtps") == leaf.fingerprint
    nxt = eh.pki.leaf()
    results = run_batch(cfg, [Member("smtp", nxt.fullchain_pem, nxt.key_pem),
                              Member("imap", nxt.fullchain_pem, nxt.key_pem)])
    assert [r.outcome for r in results] == ["deployed", "deployed"], results
    assert served(eh.dovecot.ports["imaps"], "imaps") == served(eh.a.smtp_port, "smtp") == nxt.fingerprint


def _listeners_of(pid: int) -> set[str]:
    from mailtls_tasks.daemons.exim import _listening

    fds = Path(f"/proc/{pid}/fd")
    return {os.readlink(fd) for fd in fds.iterdir()} & _listening()


def test_the_hup_returns_once_exim_listens_anew_and_fails_when_exim_does_not_come_back(eh: EximHost) -> None:
    """The reload is back only when the daemon has re-exec'd (new listening sockets,
    as many as before), so verify never talks to the daemon from before the HUP; and a
    re-exec that fails (a configuration broken since validate) fails the reload."""
    from mailtls_tasks.daemons import exim as exim_mode

    c = Exim(eh.root / "c", [eh.cert], [eh.key])
    c.start()
    try:
        for _ in range(5):
            before = _listeners_of(c.pid)
            res = exim_mode.hup(str(c.pid_file))
            assert res.ok, res
            after = _listeners_of(c.pid)
            assert len(before) == 2 and len(after) == 2 and not before & after
            assert served(c.smtps_port, "smtps") == served(eh.a.smtps_port, "smtps")  # no refused connection
        assert c.log().count("SIGHUP received") == 5
        c.conf.write_text(c.conf.read_text() + "\nthis is not an exim option\n")
        res = exim_mode.hup(str(c.pid_file))
        assert not res.ok and "exited after the HUP" in res.output_tail, res
    finally:
        c.stop()


def test_without_cap_sys_ptrace_the_hup_waits_a_settle_instead(eh: EximHost) -> None:
    """As under the worker's unit (no CAP_SYS_PTRACE in its bounding set): the daemon
    (Debian-exim's process) cannot be looked into, so the reload cannot see its sockets
    re-made and waits HUP_SETTLE instead; the daemon is back and serving after it."""
    script = (f"import time; from mailtls_tasks.daemons import exim; t = time.monotonic(); "
              f"r = exim.hup({str(eh.a.pid_file)!r}); print(r.returncode, round(time.monotonic() - t, 2))")
    hups = eh.a.log().count("SIGHUP received")
    out = subprocess.run([require("setpriv"), "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace", sys.executable,
                          "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    code, took = out.stdout.split()
    assert code == "0" and float(took) >= 1.0, out.stdout + out.stderr
    assert eh.a.log().count("SIGHUP received") == hups + 1
    assert served(eh.a.smtps_port, "smtps") == served(eh.a.smtp_port, "smtp")


def test_a_pid_file_that_names_no_exim_daemon_is_rejected_before_anything_changes(eh: EximHost) -> None:
    """Found out at validate, with nothing committed: not after the files are live, when
    the reload and then the rollback's reload would both fail (``failed``)."""
    before = snapshot(eh.cert.resolve(), eh.key.resolve())
    eh.targets["nopid"] = {**eh.targets["smtp"], "pid_file": str(eh.root / "none.pid")}
    eh.write_config()
    try:
        leaf = eh.pki.leaf()
        res = run_local(load_config(str(eh.config)), "nopid", leaf.fullchain_pem, leaf.key_pem)
        assert res.outcome == "rejected" and "cannot read the pid file" in (res.error or ""), res
        assert snapshot(eh.cert.resolve(), eh.key.resolve()) == before
    finally:
        del eh.targets["nopid"]
        eh.write_config()


@pytest.mark.parametrize("fault", ["rename:signal=KILL", "write:error=ENOSPC"])
def test_a_fault_at_any_point_leaves_a_pair_exim_serves(eh: EximHost, fault: str) -> None:
    """A slice of the fault matrix against the real Exim: the deploy killed at each
    rename (or a write failing ENOSPC), then ``mailtls recover`` as after a reboot:
    the live pair matches, is the old or the new set, Exim serves it, nothing owned."""
    syscall, action = fault.split(":")
    j = Journal(str(eh.state))
    shared = eh.cert.resolve().parent
    points: list[int] = [1]
    if syscall == "rename":
        counting = eh.pki.leaf()
        (eh.root / "count.pem").write_bytes(counting.fullchain_pem)
        (eh.root / "count.key").write_bytes(counting.key_pem)
        total = count_calls(["deploy", "smtp", "--local", "--cert", str(eh.root / "count.pem"), "--key",
                             str(eh.root / "count.key"), "--deploy-id", f"count-{time.time_ns()}"], "rename",
                            {**os.environ, "MAILTLS_CONFIG": str(eh.config), "PYTHONPATH": str(REPO)}, eh.root)
        assert total >= 3, total
        points = list(range(1, total + 1))
    for n in points:
        old_cert = (shared / "cert.pem").read_bytes()
        old_key = (shared / "key.pem").read_bytes()
        new = eh.pki.leaf()
        (eh.root / "new.pem").write_bytes(new.fullchain_pem)
        (eh.root / "new.key").write_bytes(new.key_pem)
        did = f"fault-{syscall}-{n}-{time.time_ns()}"
        eh.cli("deploy", "smtp", "--local", "--cert", str(eh.root / "new.pem"), "--key", str(eh.root / "new.key"),
               "--deploy-id", did, "--json",
               prefix=strace_prefix(Case("local", "deploy", syscall, action, action, n)))
        after = eh.cli("recover")
        assert after.returncode in (0, 4), after.stdout + after.stderr
        cert, key = (shared / "cert.pem").read_bytes(), (shared / "key.pem").read_bytes()
        assert key_matches_cert(key, cert), f"{fault} at {n}: a mismatched pair is live"
        live = "new" if (cert, key) == (new.fullchain_pem, new.key_pem) else "old"
        assert live == "new" or (cert, key) == (old_cert, old_key), f"{fault} at {n}: neither set is live"
        rec = j.load("smtp", did)
        if rec is not None:
            assert rec.finished, f"{fault} at {n}: unfinished ({rec.phase})"
            expected = {"deployed": "new", "rolled_back": "old", "rejected": "old"}.get(rec.outcome or "")
            assert expected in (None, live), f"{fault} at {n}: {rec.outcome} but {live} is live"
        else:
            assert live == "old"
        assert not j.owners(), f"{fault} at {n}: files still owned"
        assert not [p.name for p in shared.iterdir() if ".mailtls-" in p.name], f"{fault} at {n}: temp files left"
        on_disk = fingerprint(leaf_of_file(cert))  # type: ignore[arg-type]
        start = time.monotonic()  # the watch, or the recovery's reload, brings it within seconds
        while served(eh.a.smtps_port, "smtps") != on_disk:
            assert time.monotonic() - start < 15, f"{fault} at {n}: Exim does not serve the pair on disk"
            time.sleep(0.2)


# ---------------------------------------------------------------- a stock Debian Exim
LOCALMACROS = Path("/etc/exim4/exim4.conf.localmacros")
DEFAULTS = Path("/etc/default/exim4")


@pytest.fixture
def stock(tmp_path: Path) -> Iterator[None]:
    """The root's own /etc/exim4 as the package left it, plus what an operator adds;
    put back afterwards (the root is a throw-away copy, but the module goes on)."""
    need_exim_root()
    saved = {p: p.read_bytes() if p.exists() else None for p in (LOCALMACROS, DEFAULTS)}
    try:
        yield
    finally:
        for p, data in saved.items():
            if data is None:
                p.unlink(missing_ok=True)
            else:
                p.write_bytes(data)
        subprocess.run(["update-exim4.conf"], check=True, capture_output=True)


def _discover() -> dict[str, Any]:
    import tomllib

    out = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "discover", "--exim-config",
                          "/var/lib/exim4/config.autogenerated", "--host", "mx"], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode == 0, out.stderr
    return {"text": out.stdout, **tomllib.loads(out.stdout)}


def test_discover_reads_a_stock_debian_configuration_with_465_from_etc_default(stock: None) -> None:
    """README.Debian's way: MAIN_TLS_ENABLE and tls_on_connect_ports = 465 in the
    configuration, ``-oX 465:25 -oP /run/exim4/exim.pid`` in /etc/default/exim4, which
    ``exim -bP`` cannot see."""
    LOCALMACROS.write_text("MAIN_TLS_ENABLE = yes\ntls_on_connect_ports = 465\n")
    DEFAULTS.write_text(DEFAULTS.read_text() if DEFAULTS.exists() else "")
    with DEFAULTS.open("a") as f:
        f.write("SMTPLISTENEROPTIONS='-oX 465:25 -oP /run/exim4/exim.pid'\n")
    subprocess.run(["update-exim4.conf"], check=True, capture_output=True)
    found = _discover()
    (name, t), = found["targets"].items()
    assert name == "exim" and t["mode"] == "exim"
    assert (t["cert_path"], t["key_path"]) == ("/etc/exim4/exim.crt", "/etc/exim4/exim.key")
    assert t["pid_file"] == "/run/exim4/exim.pid" and t["validate_command"] == "exim4 -bV"
    assert "reload_command" not in t  # a HUP to the pid file
    endpoints = {(e["endpoint"], e["protocol"]) for e in t["post_deploy_verify"]["endpoints"]}
    assert endpoints == {("127.0.0.1:25", "smtp"), ("127.0.0.1:465", "smtps"), ("[::1]:25", "smtp"),
                         ("[::1]:465", "smtps")}, endpoints
    # the same without -oP: the daemon writes no pid file then, and discover says so
    DEFAULTS.write_text(DEFAULTS.read_text().replace(" -oP /run/exim4/exim.pid", ""))
    assert "-oX without -oP" in _discover()["text"]


def test_an_expanded_tls_certificate_is_said_not_guessed(stock: None, tmp_path: Path) -> None:
    LOCALMACROS.write_text("MAIN_TLS_ENABLE = yes\nMAIN_TLS_CERTIFICATE = ${if exists{/etc/exim4/${tls_in_sni}.crt}"
                           "{/etc/exim4/${tls_in_sni}.crt}{/etc/exim4/exim.crt}}\n")
    subprocess.run(["update-exim4.conf"], check=True, capture_output=True)
    found = _discover()
    assert found["targets"] == {}
    assert "is an expansion, decided per connection" in found["text"]
    cfg = tmp_path / "targets.toml"
    cfg.write_text('host = "mx"\n[targets.exim]\nmode = "exim"\ncert_path = "/etc/exim4/mx.example.crt"\n'
                   'key_path = "/etc/exim4/mx.example.key"\n')
    shutil.copy(cfg, tmp_path / "t.toml")
    out = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "check-config", "--config", str(cfg)],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         timeout=60)
    assert "cannot be read from its configuration" in out.stdout + out.stderr, out.stdout + out.stderr

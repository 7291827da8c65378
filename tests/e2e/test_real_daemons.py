"""Every deploy path against real Postfix and Dovecot, in-process and through a worker."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509

from mailtls_tasks.core import probe
from mailtls_tasks.core.local import run_local
from mailtls_tasks.core.material import fingerprint
from mailtls_tasks.core.result import DeployResult
from mailtls_tasks.distributed.workflow import deploy
from tests.support.keys import Pipeline
from tests.support.pki import PKI, Issued, make_pki
from tests.support.services import RedisServer, Worker
from tests.support.stack import MailStack

pytestmark = pytest.mark.e2e

Deploy = Callable[..., DeployResult]


class E2E:
    def __init__(self, root: Path, pki: PKI, redis_server: RedisServer, pipeline: Pipeline) -> None:
        self.pki = pki
        self.current = pki.leaf()
        self.stack = MailStack(root, self.current, pipeline=pipeline)
        self.stale_dir = root / "certs" / "stale"
        self.stale_dir.mkdir()
        # a target whose files the daemon does not read: verify can never see its new leaf
        self.stack.add("smtp-stale", "postfix", verify_port=self.stack.postfix.smtp_port, protocol="smtp",
                       verify_timeout=1.5,
                       cert_path=str(self.stale_dir / "cert.pem"), key_path=str(self.stale_dir / "key.pem"))
        self.stack.start()
        self.redis = redis_server
        self.worker = Worker(self.stack.config_path, redis_server.url, root / "worker.log")

    def close(self) -> None:
        self.worker.stop()
        self.stack.stop()


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, pki: PKI, redis_server: RedisServer,
        pipeline: Pipeline) -> Iterator[E2E]:
    env = E2E(tmp_path_factory.mktemp("e2e"), pki, redis_server, pipeline)
    try:
        yield env
    finally:
        env.close()


@pytest.fixture(params=["local", "worker"])
def run(request: pytest.FixtureRequest, e2e: E2E) -> Deploy:
    from mailtls_tasks.core.config import load_config

    def via_local(target: str, leaf: Issued, **kw: object) -> DeployResult:
        return run_local(load_config(str(e2e.stack.config_path)), target, leaf.fullchain_pem, leaf.key_pem,
                         **kw)  # type: ignore[arg-type]

    def via_worker(target: str, leaf: Issued, **kw: object) -> DeployResult:
        return deploy(target, leaf.fullchain_pem, leaf.key_pem, broker_url=e2e.redis.url, host=e2e.stack.host,
                      **kw).get(timeout=120)  # type: ignore[arg-type]

    return via_local if request.param == "local" else via_worker


def served(port: int, proto: str) -> str:
    return probe.probe("127.0.0.1", port, proto).fingerprint


def served_everywhere(stack: MailStack) -> set[str]:
    return {served(port, proto) for proto, port in stack.endpoints().items()}


def sync(e2e: E2E, run: Deploy) -> Issued:
    """Start each test from a known state: a fresh leaf deployed to both daemons."""
    leaf = e2e.pki.leaf()
    assert run("smtp", leaf).outcome == "deployed"
    assert run("imap", leaf).outcome == "deployed"
    e2e.current = leaf
    return leaf


def snapshot(d: Path) -> dict[str, tuple[bytes, int, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


def test_happy_path_new_leaf_on_every_listener(e2e: E2E, run: Deploy) -> None:
    old = sync(e2e, run)
    new = e2e.pki.leaf()
    r1 = run("smtp", new)
    assert r1.outcome == "deployed", r1.error
    assert r1.previous_fingerprint_sha256 == old.fingerprint
    assert served(e2e.stack.postfix.smtp_port, "smtp") == new.fingerprint
    # the shared files already hold the new bytes; dovecot still serves the old leaf ...
    r2 = run("imap", new)
    # ... so the second target reloads (no commit) and verifies
    assert r2.outcome == "deployed", r2.error
    assert r2.steps["commit"].status == "skipped" and r2.steps["reload"].status == "ok"
    assert served_everywhere(e2e.stack) == {new.fingerprint}
    for daemon in ("postfix", "dovecot"):  # the symlinks survived
        assert (e2e.stack.root / "certs" / daemon / "cert.pem").is_symlink()
    assert (e2e.stack.shared / "cert.pem").read_bytes() == new.fullchain_pem


def test_verify_mismatch_rolls_back_and_old_leaf_is_served(e2e: E2E, run: Deploy) -> None:
    current = sync(e2e, run)
    for f in ("cert.pem", "key.pem"):
        shutil.copy2(e2e.stack.shared / f, e2e.stale_dir / f)
    before = snapshot(e2e.stale_dir)
    r = run("smtp-stale", e2e.pki.leaf())
    assert r.outcome == "rolled_back", r.error
    assert "did not serve" in (r.error or "")
    assert r.served_fingerprint_sha256 == current.fingerprint
    assert {k: v[:2] for k, v in snapshot(e2e.stale_dir).items()} == {k: v[:2] for k, v in before.items()}
    assert served(e2e.stack.postfix.smtp_port, "smtp") == current.fingerprint


def test_reload_fails_rolls_back_old_leaf_served(e2e: E2E, run: Deploy) -> None:
    current = sync(e2e, run)
    before = snapshot(e2e.stack.shared)
    e2e.stack.pf_reload.fail_once()
    r = run("smtp", e2e.pki.leaf())
    assert r.outcome == "rolled_back", r.error
    assert "reload_command failed" in (r.error or "")
    assert {k: v[:2] for k, v in snapshot(e2e.stack.shared).items()} == {k: v[:2] for k, v in before.items()}
    assert r.served_fingerprint_sha256 == current.fingerprint
    assert served_everywhere(e2e.stack) == {current.fingerprint}


def test_validate_fails_nothing_touched_nothing_reloaded(e2e: E2E, run: Deploy) -> None:
    current = sync(e2e, run)
    before = snapshot(e2e.stack.shared)
    reloads = e2e.stack.pf_reload.calls
    e2e.stack.pf_check.fail_once()
    r = run("smtp", e2e.pki.leaf())
    assert r.outcome == "rejected" and "validate_command failed" in (r.error or "")
    assert snapshot(e2e.stack.shared) == before  # bytes, mode and mtime
    assert e2e.stack.pf_reload.calls == reloads
    assert served(e2e.stack.postfix.smtp_port, "smtp") == current.fingerprint


def test_redeploy_is_unchanged_without_reload(e2e: E2E, run: Deploy) -> None:
    current = sync(e2e, run)
    reloads = e2e.stack.pf_reload.calls, e2e.stack.dv_reload.calls
    for target in ("smtp", "imap"):
        r = run(target, current)
        assert r.outcome == "unchanged", r.error
        assert r.served_fingerprint_sha256 == current.fingerprint
    assert (e2e.stack.pf_reload.calls, e2e.stack.dv_reload.calls) == reloads


def _served_chain(port: int, starttls: str | None) -> list[x509.Certificate]:
    argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-showcerts"]
    if starttls:
        argv += ["-starttls", starttls]
    out = subprocess.run(argv, input=b"", capture_output=True, timeout=20).stdout
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", out, re.DOTALL)
    return [x509.load_pem_x509_certificate(b) for b in blocks]


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_served_chain_is_leaf_plus_intermediate(e2e: E2E, run: Deploy, kind: str) -> None:
    sync(e2e, run)
    pki = make_pki(kind)
    leaf = pki.leaf()
    assert run("smtp", leaf).outcome == "deployed"
    assert run("imap", leaf).outcome == "deployed"
    want = [leaf.fingerprint, fingerprint(pki.inter.cert)]
    assert [fingerprint(c) for c in _served_chain(e2e.stack.postfix.smtp_port, "smtp")] == want
    assert [fingerprint(c) for c in _served_chain(e2e.stack.dovecot.ports["imaps"], None)] == want
    assert [fingerprint(c) for c in _served_chain(e2e.stack.dovecot.ports["pop3"], "pop3")] == want


def test_postfix_with_a_broken_key_drops_starttls_and_probe_fails(e2e: E2E) -> None:
    """What we guard against: with a mismatched pair Postfix stops offering STARTTLS, or
    (Postfix 3.7, seen here) still offers it and answers "454 4.7.0 TLS not available"."""
    cert, key = e2e.stack.shared / "cert.pem", e2e.stack.shared / "key.pem"
    good = cert.read_bytes(), key.read_bytes()
    try:
        key.write_bytes(e2e.pki.leaf().key_pem)  # by hand, as a careless script would
        subprocess.run(e2e.stack.postfix.command("reload").split(), check=True, capture_output=True)
        with pytest.raises(probe.ProbeError, match=r"does not offer STARTTLS|STARTTLS refused: b'454"):
            for _ in range(30):  # until a fresh smtpd has read the broken pair
                probe.probe("127.0.0.1", e2e.stack.postfix.smtp_port, "smtp")
                time.sleep(0.2)
        with pytest.raises(probe.ProbeError):  # and SMTPS cannot complete a handshake
            probe.probe("127.0.0.1", e2e.stack.postfix.smtps_port, "smtps")
    finally:
        cert.write_bytes(good[0])
        key.write_bytes(good[1])
        subprocess.run(e2e.stack.postfix.command("reload").split(), check=True, capture_output=True)

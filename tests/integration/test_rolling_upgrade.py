"""A rolling upgrade: a worker of the previous release stopped in the middle of a
deploy, a worker of this release started on the same host finishes it.

The previous release is the commit before the package moved into its present rooms
(``daemons/``, ``core/steps/``, ``cli/``: issue 19), taken from this repository's own
history with ``git archive`` and run from that tree by the same Python. What crosses
the upgrade is what an operator's host keeps: the journal on disk (records, owner
entries, backups) and the messages waiting in Redis (the chain's next step, a step the
dead worker had taken). Both must mean the same to the new code.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailtls_tasks.core.journal import Journal
from mailtls_tasks.core.material import key_matches_cert
from mailtls_tasks.distributed.workflow import DeployHandle, deploy
from tests.support.host import MailHost
from tests.support.keys import Pipeline
from tests.support.pki import PKI
from tests.support.services import REPO, RedisServer, Worker, unavailable

pytestmark = pytest.mark.integration

# The last commit of the layout before issue 19: mailtls_tasks/cli.py, core/steps.py.
PREVIOUS_RELEASE = "2c812e57cc212a0df9d7a8bb452cf714f2b49511"


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's package, extracted from git into a tree of its own."""
    known = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"],
                           capture_output=True)
    if known.returncode != 0:
        unavailable(f"commit {PREVIOUS_RELEASE[:12]} (the previous release) is not in this clone's history")
    root = tmp_path_factory.mktemp("previous-release")
    archive = root / "release.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), PREVIOUS_RELEASE, "mailtls_tasks"],
                   check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    # The worker of that tree must import that tree, not this checkout's package.
    where = subprocess.run([sys.executable, "-c", "import mailtls_tasks.cli as c; print(c.__file__)"], cwd=root,
                           env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                           check=True).stdout.strip()
    assert where == str(root / "mailtls_tasks" / "cli.py"), where
    return root


@pytest.fixture
def mx(tmp_path: Path, pipeline: Pipeline) -> Iterator[MailHost]:
    host = MailHost(tmp_path / "mxu", host="mxu")
    host.enroll(pipeline)
    yield host
    host.close()


def _send(target: str, cert: bytes, key: bytes, broker: str) -> DeployHandle:
    deadline = time.monotonic() + 15
    while True:  # the worker registers its targets just after it says "ready"
        try:
            return deploy(target, cert, key, broker_url=broker)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _wait_started(host: MailHost) -> None:
    deadline = time.monotonic() + 30
    while not host.reload.calls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.reload.calls, "the reload step never started"


def test_the_previous_release_stopped_mid_deploy_and_this_one_finishes_it(
        mx: MailHost, tmp_path: Path, redis_server: RedisServer, pki: PKI, previous_release: Path) -> None:
    """systemctl stop (SIGTERM to the main process) while the old worker reloads: it
    finishes that step and leaves the chain's next message, sent by the old code, in
    the queue; the new worker takes it from there and the deploy ends deployed."""
    mx.add_target("smtp")
    old, new = pki.leaf(), pki.leaf()
    mx.install("smtp", old)
    previous = Worker(mx.config_path, redis_server.url, tmp_path / "previous.log", code=previous_release)
    current = None
    try:
        mx.reload.hang_once(3)
        handle = _send("mxu/smtp", new.fullchain_pem, new.key_pem, redis_server.url)
        _wait_started(mx)
        assert previous.stop_main() == 0
        assert "Task mailtls.verify[" not in previous.log()
        assert "Task mailtls.reload[" in previous.wait_log("Task mailtls.reload[", "succeeded")
        rec = Journal(str(mx.state)).load("smtp", handle.deploy_id)
        assert rec is not None and rec.phase == "reloaded" and not rec.finished, rec

        current = Worker(mx.config_path, redis_server.url, tmp_path / "current.log")
        res = handle.get(timeout=60)

        assert res.outcome == "deployed", res
        assert "Task mailtls.verify[" in current.wait_log("Task mailtls.verify[", "succeeded")
        assert (mx.path("smtp", "cert").read_bytes(), mx.path("smtp", "key").read_bytes()) == \
            (new.fullchain_pem, new.key_pem)
        assert len(mx.reload.calls) == 1  # the old worker's reload stood; nothing ran twice
        assert mx.stray_temps() == []
        # and the new release deploys on that journal as on its own
        later = pki.leaf()
        assert _send("mxu/smtp", later.fullchain_pem, later.key_pem, redis_server.url).get(timeout=60).outcome \
            == "deployed"
    finally:
        previous.stop()
        if current is not None:
            current.stop()


def test_the_previous_release_killed_mid_step_and_this_one_recovers_it(
        mx: MailHost, tmp_path: Path, redis_server: RedisServer, pki: PKI, previous_release: Path) -> None:
    """SIGKILL of the old worker's whole group during its reload: the new set is live,
    nothing of the old release is left to finish it. The new worker's start-up recovery
    reads the old release's record and backups and rolls back byte-exact; the step the
    dead worker held, given back to the queue, then changes nothing."""
    mx.add_target("imap")
    old, new = pki.leaf(), pki.leaf()
    mx.install("imap", old)
    mx.path("imap", "key").chmod(0o640)  # kept by the deploy, and restored by the rollback
    before = mx.snapshot()
    previous = Worker(mx.config_path, redis_server.url, tmp_path / "previous.log", code=previous_release)
    current = None
    try:
        mx.reload.hang_once(60)
        handle = _send("mxu/imap", new.fullchain_pem, new.key_pem, redis_server.url)
        _wait_started(mx)
        previous.kill9()
        subprocess.run(["pkill", "-KILL", "-f", str(mx.reload.path)], check=False)
        assert mx.path("imap", "key").read_bytes() == new.key_pem  # committed by the old release

        current = Worker(mx.config_path, redis_server.url, tmp_path / "current.log")
        res = handle.get(timeout=60)

        assert res.outcome == "rolled_back" and res.reason == "interrupted", res
        cert, key = mx.path("imap", "cert").read_bytes(), mx.path("imap", "key").read_bytes()
        assert (cert, key) == (old.fullchain_pem, old.key_pem) and key_matches_cert(key, cert)
        assert {p: (data, mode) for p, (data, mode, _) in mx.snapshot().items()} == \
            {p: (data, mode) for p, (data, mode, _) in before.items()}
        assert mx.stray_temps() == []
        assert "took back 1 message" in current.wait_log("took back")
        log = current.wait_log("Task mailtls.reload[", "succeeded")
        assert "deploy already ended" in log, log[-3000:]
        assert len(mx.reload.calls) == 2  # the old worker's, and the rollback's: the taken-back one ran none
        assert mx.path("imap", "cert").read_bytes() == old.fullchain_pem
    finally:
        previous.stop()
        if current is not None:
            current.stop()

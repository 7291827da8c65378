"""A worker killed with SIGKILL in the middle of a deploy: its restart converges."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from mailtls_tasks.core.journal import Journal
from mailtls_tasks.core.material import key_matches_cert
from mailtls_tasks.distributed.app import use_broker
from mailtls_tasks.distributed.workflow import deploy
from tests.support.host import MailHost
from tests.support.keys import Pipeline
from tests.support.pki import PKI
from tests.support.services import RedisServer, Worker

pytestmark = pytest.mark.integration


def _kill_hanging_reload(host: MailHost) -> None:
    # The reload command runs in its own session (so its timeout can kill its group);
    # the test kills it here like the OOM killer or a reboot would.
    subprocess.run(["pkill", "-KILL", "-f", str(host.reload.path)], check=False)


def test_kill9_during_reload_converges_after_restart(tmp_path: Path, redis_server: RedisServer, pki: PKI,
                                                    pipeline: Pipeline) -> None:
    host = MailHost(tmp_path / "mx3", host="mx3")
    host.enroll(pipeline)
    host.add_target("smtp3")
    old, new = pki.leaf(), pki.leaf()
    host.install("smtp3", old)
    worker = Worker(host.config_path, redis_server.url, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 15
        handle = None
        while handle is None:
            try:
                handle = deploy("smtp3", new.fullchain_pem, new.key_pem, broker_url=redis_server.url)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        host.reload.hang_once(60)
        deadline = time.monotonic() + 30
        while not host.reload.calls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host.reload.calls, "the reload step never started"
        worker.kill9()
        _kill_hanging_reload(host)
        # the new set is committed and nothing is left alive to finish or undo it
        assert host.path("smtp3", "key").read_bytes() == new.key_pem
        assert handle.status()["outcome"] is None  # type: ignore[index]

        worker.start()  # recovery runs before it consumes anything
        res = handle.get(timeout=30)

        assert res.outcome == "rolled_back" and res.reason == "interrupted", res
        cert, key = host.path("smtp3", "cert").read_bytes(), host.path("smtp3", "key").read_bytes()
        assert (cert, key) == (old.fullchain_pem, old.key_pem)
        assert key_matches_cert(key, cert)
        assert host.stray_temps() == []
        rec = Journal(str(host.state)).load("smtp3", handle.deploy_id)
        assert rec is not None and rec.outcome == "rolled_back"

        # Much later Redis redelivers the unacked reload message: it must change nothing.
        reloads = len(host.reload.calls)
        from mailtls_tasks.distributed import tasks

        use_broker(redis_server.url)
        refs = {"target": "smtp3", "host": "mx3", "deploy_id": handle.deploy_id}
        redelivered = tasks.reload.apply_async(kwargs=refs, ignore_result=False).get(timeout=30)
        again = tasks.commit.apply_async(kwargs=refs, ignore_result=False).get(timeout=30)
        assert redelivered["note"] == again["note"] == "deploy already ended"
        assert len(host.reload.calls) == reloads
        assert host.path("smtp3", "cert").read_bytes() == old.fullchain_pem

        # and the target is free for the next deploy
        later = pki.leaf()
        assert deploy("smtp3", later.fullchain_pem, later.key_pem,
                      broker_url=redis_server.url).get(timeout=60).outcome == "deployed"
    finally:
        worker.stop()
        host.close()


def test_pool_child_killed_mid_reload_is_redelivered_and_finishes(tmp_path: Path, redis_server: RedisServer,
                                                                   pki: PKI, pipeline: Pipeline) -> None:
    """task_reject_on_worker_lost: the message comes back at once and the step reruns."""
    host = MailHost(tmp_path / "mx4", host="mx4")
    host.enroll(pipeline)
    host.add_target("smtp4")
    host.install("smtp4", pki.leaf())
    new = pki.leaf()
    worker = Worker(host.config_path, redis_server.url, tmp_path / "worker.log")
    try:
        host.reload.hang_once(60)
        handle = deploy("smtp4", new.fullchain_pem, new.key_pem, broker_url=redis_server.url)
        deadline = time.monotonic() + 30
        while not host.reload.calls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host.reload.calls
        children = subprocess.run(["pgrep", "-P", str(worker.proc.pid)], capture_output=True, text=True)  # type: ignore[union-attr]
        pids = [int(p) for p in children.stdout.split()]
        assert pids, "no pool child found"
        for pid in pids:
            os.kill(pid, 9)
        _kill_hanging_reload(host)

        res = handle.get(timeout=60)

        assert res.outcome == "deployed", res
        assert len(host.reload.calls) == 2
        assert host.path("smtp4", "key").read_bytes() == new.key_pem
        assert "WorkerLostError" in worker.log() or "Process" in worker.log()
    finally:
        worker.stop()
        host.close()


def test_kill9_during_a_batch_reload_rolls_every_member_back_and_the_redelivered_batch_converges(
        tmp_path: Path, redis_server: RedisServer, pki: PKI, pipeline: Pipeline) -> None:
    """A batch runs in one task: killed at its one reload, every member's new files are
    live and nobody is left to finish them. The restarted worker's recovery ends them
    all rolled back (the batch is dead with its process, not at the end of a lease),
    and the batch message it takes back converges without touching a file."""
    from mailtls_tasks.distributed.app import app
    from mailtls_tasks.distributed.tasks import member_task_id
    from mailtls_tasks.distributed.workflow import Certificate, deploy_many

    host = MailHost(tmp_path / "mx5", host="mx5")
    host.enroll(pipeline)
    names = ["b1", "b2", "b3"]
    old = {n: pki.leaf() for n in names}
    new = {n: pki.leaf() for n in names}
    for n in names:
        host.add_target(n)
        host.install(n, old[n])
    worker = Worker(host.config_path, redis_server.url, tmp_path / "worker.log")
    try:
        host.reload.hang_once(60)
        handles = deploy_many([Certificate(f"mx5/{n}", new[n].fullchain_pem, new[n].key_pem) for n in names],
                              broker_url=redis_server.url)
        deadline = time.monotonic() + 30
        while not host.reload.calls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(host.reload.calls) == 1, "the batch's one reload never started"
        worker.kill9()
        _kill_hanging_reload(host)
        assert all(host.path(n, "key").read_bytes() == new[n].key_pem for n in names)
        assert all(h.status()["outcome"] is None for h in handles)  # type: ignore[index]

        worker.start()
        results = [h.get(timeout=30) for h in handles]

        assert [(r.outcome, r.reason) for r in results] == [("rolled_back", "interrupted")] * 3, results
        for n in names:
            cert, key = host.path(n, "cert").read_bytes(), host.path(n, "key").read_bytes()
            assert (cert, key) == (old[n].fullchain_pem, old[n].key_pem)
            assert key_matches_cert(key, cert)
        assert host.stray_temps() == []
        reloads = len(host.reload.calls)
        use_broker(redis_server.url)
        rows = [app.AsyncResult(member_task_id(h.deploy_id)) for h in handles]
        deadline = time.monotonic() + 30
        while not all(r.ready() for r in rows) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [r.state for r in rows] == ["FAILURE"] * 3  # the redelivered batch ran: a row per member
        assert all("rolled_back" in str(r.result) for r in rows)
        assert len(host.reload.calls) == reloads
        assert all(host.path(n, "key").read_bytes() == old[n].key_pem for n in names)
        later = {n: pki.leaf() for n in names}
        again = deploy_many([Certificate(f"mx5/{n}", later[n].fullchain_pem, later[n].key_pem) for n in names],
                            broker_url=redis_server.url)
        assert [h.get(timeout=60).outcome for h in again] == ["deployed"] * 3
        assert len(host.reload.calls) == reloads + 1
    finally:
        worker.stop()
        host.close()

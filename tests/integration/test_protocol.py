"""The protocol between deploys, against real Redis and real worker processes.

Each test builds the interleaving it needs deterministically: a worker runs one
message at a time, so a second deploy whose validate (or reload) command hangs keeps
the worker busy while the first deploy waits *between* its steps, its next message
queued behind. Then the worker is paused (SIGSTOP), Redis is restarted empty, a local
run or ``mailtls recover`` comes along -- and every deploy must end, be published,
and leave a matching pair that no older set replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from mailtls_tasks.core.journal import DeployRecord, Journal
from mailtls_tasks.core.material import key_matches_cert
from mailtls_tasks.distributed import tasks
from mailtls_tasks.distributed.app import use_broker
from mailtls_tasks.distributed.coordination import Coordinator
from mailtls_tasks.distributed.workflow import deploy, enqueue_sealed
from mailtls_tasks.security.envelope import seal
from mailtls_tasks.security.keys import load_pipeline
from tests.support.commands import FakeCommand
from tests.support.host import MailHost
from tests.support.keys import Pipeline
from tests.support.pki import PKI, Issued
from tests.support.services import RedisServer, Worker

pytestmark = pytest.mark.integration


class Rig:
    """One mail host with two independent targets: ``a`` (the one under test) and
    ``b``, whose validate command can hang to keep the worker busy."""

    def __init__(self, root: Path, name: str, broker: str, pki: PKI, pipeline: Pipeline, **settings: Any) -> None:
        self.pki, self.broker = pki, broker
        self.host = MailHost(root / name, host=name)
        self.host.enroll(pipeline)
        self.host.settings = {"deploy_lease": 4, "recovery_interval": 1, **settings}
        self.blocker = FakeCommand(self.host.bin, "validate-b")
        self.host.add_target("a")
        self.host.add_target("b", validate_command=str(self.blocker.path))
        self.a0 = pki.leaf()
        self.host.install("a", self.a0)
        self.host.install("b", pki.leaf())
        self.worker = Worker(self.host.config_path, broker, root / f"{name}-worker.log")

    def deploy(self, target: str, leaf: Issued, **kw: Any) -> Any:
        return deploy(target, leaf.fullchain_pem, leaf.key_pem, broker_url=self.broker, host=self.host.host, **kw)

    def record(self, target: str, deploy_id: str) -> DeployRecord | None:
        return Journal(str(self.host.state)).load(target, deploy_id)

    def live(self, target: str = "a") -> tuple[bytes, bytes]:
        return self.host.path(target, "cert").read_bytes(), self.host.path(target, "key").read_bytes()

    def park_a_between_steps(self, leaf: Issued) -> Any:
        """Deploy ``leaf`` to a; return its handle once it waits between two steps."""
        self.blocker.hang_once(60)
        # Both deploys queued while the worker is paused, so their messages interleave
        # in a known order: a's stage and validate run, then b's validate hangs.
        assert self.worker.proc is not None
        os.killpg(self.worker.proc.pid, signal.SIGSTOP)
        try:
            handle = self.deploy("a", leaf)
            hb = self.deploy("b", self.pki.leaf())
        finally:
            os.killpg(self.worker.proc.pid, signal.SIGCONT)
        # b's validate step itself, hanging on its blocker, is the sign that a waits
        # between its steps (its commit queued behind it)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rb = self.record("b", hb.deploy_id)
            if rb is not None and rb.in_step == "validate":
                break
            time.sleep(0.02)
        else:
            raise AssertionError("b's validate never started")
        rec = self.record("a", handle.deploy_id)
        assert rec is not None and not rec.finished and rec.in_step is None, rec
        assert rec.phase == "validated", rec.phase
        return handle

    def release_blocker(self) -> None:
        subprocess.run(["pkill", "-KILL", "-f", str(self.blocker.path)], check=False)

    def local(self, leaf: Issued, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.host.cli("deploy", "a", "--local", "--cert", "c.pem", "--key", "k.pem", "--json", *extra,
                             input_files={"c.pem": leaf.fullchain_pem, "k.pem": leaf.key_pem})

    def close(self) -> None:
        self.release_blocker()
        self.worker.stop()
        self.host.close()


@pytest.fixture
def rig(tmp_path: Path, redis_server: RedisServer, pki: PKI, pipeline: Pipeline) -> Iterator[Rig]:
    r = Rig(tmp_path, f"mxp{os.getpid() % 1000}{int(time.time() * 1000) % 100000}", redis_server.url, pki, pipeline)
    yield r
    r.close()


def test_paused_worker_local_deploy_and_recover(rig: Rig) -> None:
    """A distributed deploy paused between steps (its worker SIGSTOPped): while its lease
    runs, recovery leaves it alone and a local deploy is refused, naming it; once the
    lease has run out, the local run ends it and deploys; the worker then resumes, and
    its late messages change nothing but publish how the deploy ended."""
    x = rig.park_a_between_steps(rig.pki.leaf())
    assert rig.worker.proc is not None
    os.killpg(rig.worker.proc.pid, signal.SIGSTOP)
    try:
        r = rig.host.cli("recover")
        assert r.returncode == 0 and "nothing to recover" in r.stdout, r.stdout + r.stderr
        mine = rig.pki.leaf()
        r = rig.local(mine, "--wait", "1")  # it waits for the owner that long, then says who
        assert r.returncode == 1, r.stdout + r.stderr
        said = json.loads(r.stdout)["error"]  # --json: the error is in the object
        assert x.deploy_id in said and "distributed" in said and "lease until" in said, said
        assert rig.live() == (rig.a0.fullchain_pem, rig.a0.key_pem)

        rec = rig.record("a", x.deploy_id)
        assert rec is not None and rec.lease_until is not None
        time.sleep(max(0.0, rec.lease_until - time.time()) + 0.2)
        r = rig.local(mine)
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["outcome"] == "deployed"
        ended = rig.record("a", x.deploy_id)
        assert ended is not None and (ended.outcome, ended.reason) == ("rolled_back", "interrupted")
    finally:
        os.killpg(rig.worker.proc.pid, signal.SIGCONT)
    rig.release_blocker()

    res = x.get(timeout=30)
    assert (res.outcome, res.reason) == ("rolled_back", "interrupted"), res
    assert rig.live() == (mine.fullchain_pem, mine.key_pem)  # the newer local set stays
    # the resumed worker first re-establishes its broker connection, lost while it was
    # stopped (kombu backs off between tries): give its late message time to arrive
    log = rig.worker.wait_log(x.deploy_id, "deploy already ended", timeout=45)
    assert any(x.deploy_id in ln and "deploy already ended" in ln for ln in log.splitlines())


def test_busy_past_the_budget_ends_rejected_busy_and_is_published(tmp_path: Path, redis_server: RedisServer,
                                                                 pki: PKI, pipeline: Pipeline) -> None:
    """A local run holds the target (its reload hangs); a distributed deploy of it
    retries within busy_retries, then ends rejected/busy, published, nothing touched."""
    rig = Rig(tmp_path, "mxbusy", redis_server.url, pki, pipeline, busy_retries=2)
    try:
        rig.host.reload.hang_once(25)
        mine = pki.leaf()
        (rig.host.root / "c.pem").write_bytes(mine.fullchain_pem)
        (rig.host.root / "k.pem").write_bytes(mine.key_pem)
        local = subprocess.Popen(
            [sys.executable, "-m", "mailtls_tasks.cli", "deploy", "a", "--local", "--cert", "c.pem", "--key", "k.pem",
             "--json"], cwd=rig.host.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "MAILTLS_CONFIG": str(rig.host.config_path)})
        deadline = time.monotonic() + 20
        while not rig.host.reload.calls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rig.host.reload.calls, "the local run never reached its reload"
        during = rig.live()

        res = rig.deploy("a", pki.leaf()).get(timeout=60)

        assert (res.outcome, res.reason) == ("rejected", "busy"), res
        assert res.exit_code == 1 and "nothing was touched" in (res.error or "")
        assert rig.live() == during
        subprocess.run(["pkill", "-KILL", "-f", str(rig.host.reload.path)], check=False)
        local.communicate(timeout=60)
    finally:
        rig.close()


def test_a_wait_that_runs_out_while_the_target_is_busy_cancels_the_deploy(tmp_path: Path, redis_server: RedisServer,
                                                                          pki: PKI, pipeline: Pipeline) -> None:
    """A local deploy of ``a`` paused (SIGSTOP) at its reload holds the target; a
    distributed deploy of it, `--wait 6`, is claimed by its stage, which retries on
    busy. Before, the client exited "still running (phase queued)" and the deploy
    ended only after every retry (~5 min). Now: cancelled when the wait runs out,
    nothing touched, and the retry that comes later refuses to start it."""
    rig = Rig(tmp_path, "mxwait", redis_server.url, pki, pipeline)
    local = None
    try:
        mine = pki.leaf()
        (rig.host.root / "c.pem").write_bytes(mine.fullchain_pem)
        (rig.host.root / "k.pem").write_bytes(mine.key_pem)
        rig.host.reload.hang_once(60)
        local = subprocess.Popen(
            [sys.executable, "-m", "mailtls_tasks.cli", "deploy", "a", "--local", "--cert", "c.pem", "--key", "k.pem",
             "--json"], cwd=rig.host.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "MAILTLS_CONFIG": str(rig.host.config_path)}, start_new_session=True)
        deadline = time.monotonic() + 20
        while not rig.host.reload.calls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rig.host.reload.calls, "the local run never reached its reload"
        os.killpg(local.pid, signal.SIGSTOP)  # paused on its host, holding the target
        during = rig.live()

        new = pki.leaf()
        (rig.host.root / "n.pem").write_bytes(new.fullchain_pem)
        (rig.host.root / "nk.pem").write_bytes(new.key_pem)
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "deploy", "mxwait/a", "--cert", "n.pem",
                            "--key", "nk.pem", "--wait", "6", "--json", "--broker", redis_server.url],
                           cwd=rig.host.root, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - t0
        assert p.returncode == 1, p.stdout + p.stderr
        out = json.loads(p.stdout)
        assert "target busy" in out["error"] and "was cancelled; nothing was touched" in out["error"], out
        assert took < 6 + 5 + 10, f"the client took {took:.0f}s for a 6 s wait"
        deploy_id = re.search(r"deploy (\S+) did not start", out["error"]).group(1)  # type: ignore[union-attr]
        rec = Coordinator(redis_server.url).get_record(deploy_id)
        assert rec is not None and (rec["outcome"], rec["reason"]) == ("rejected", "cancelled"), rec
        assert rig.live() == during
        # the stage's next try (backoff of at most a few seconds) finds it cancelled and starts nothing
        rig.worker.wait_log(deploy_id, "cancelled by its client before it started", timeout=30)
        assert rig.record("a", deploy_id) is None and rig.live() == during
    finally:
        if local is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(local.pid, signal.SIGCONT)
            subprocess.run(["pkill", "-KILL", "-f", str(rig.host.reload.path)], check=False)
            local.communicate(timeout=60)
        rig.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path / "redis-restartable")
    yield srv
    srv.stop()


def _wait_registered(url: str, host: str, timeout: float = 30) -> None:
    r = redis.Redis.from_url(url, decode_responses=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if r.exists(f"mailtls:hosttargets:{host}"):
                return
        except redis.ConnectionError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"worker of {host} did not come back to Redis")


def test_redis_restarted_empty_between_deploys_and_mid_chain(tmp_path: Path, own_redis: RedisServer, pki: PKI,
                                                             pipeline: Pipeline) -> None:
    rig = Rig(tmp_path, "mxr", own_redis.url, pki, pipeline)
    try:
        first = rig.deploy("a", pki.leaf()).get(timeout=60)
        assert first.outcome == "deployed", first

        # between deploys: every key is gone, the fence counter too
        own_redis.restart_empty()
        _wait_registered(own_redis.url, "mxr")
        second_leaf = pki.leaf()
        second = rig.deploy("a", second_leaf).get(timeout=60)
        assert second.outcome == "deployed", second  # not "superseded": the fence grows with time
        assert rig.record("a", second.deploy_id).fence > rig.record("a", first.deploy_id).fence  # type: ignore[union-attr,operator]

        # mid-chain: the parked deploy's next message is lost with Redis's data
        x = rig.park_a_between_steps(pki.leaf())
        own_redis.restart_empty()
        rig.release_blocker()
        res = x.get(timeout=60)  # the host ends it when its lease runs out, and tells the new Redis
        assert (res.outcome, res.reason) == ("rolled_back", "interrupted"), res
        assert rig.live() == (second_leaf.fullchain_pem, second_leaf.key_pem)
        cert, key = rig.live()
        assert key_matches_cert(key, cert)

        _wait_registered(own_redis.url, "mxr")
        after = rig.deploy("a", pki.leaf()).get(timeout=60)
        assert after.outcome == "deployed", after
    finally:
        rig.close()


def test_stage_message_with_forged_fence_cannot_replay_an_old_envelope(tmp_path: Path, redis_server: RedisServer,
                                                                      pki: PKI, pipeline: Pipeline) -> None:
    """The fence a worker acts on is the one inside the signed envelope. A Redis writer
    replays a captured envelope (signed with ``force``, so the leaf-age check will not
    stop it) after its record was pruned, with ``fence: null`` in the message."""
    rig = Rig(tmp_path, "mxfence", redis_server.url, pki, pipeline)
    rig.host.targets["a"]["backup_retention"] = 1
    rig.host.write_config()
    rig.worker.stop()
    rig.worker.start()
    co = Coordinator(redis_server.url)
    use_broker(redis_server.url)
    try:
        keys = load_pipeline(str(pipeline.path))
        old = pki.leaf()
        did = f"captured-{int(time.time() * 1000)}"
        env = seal(target="a", host="mxfence", deploy_id=did, fence=co.next_fence("a"), cert=old.fullchain_pem,
                   key=old.key_pem, chain=None, force=True, signing_key=keys.signing_key,
                   recipient=keys.host_key("mxfence"))
        assert enqueue_sealed(co, env).get(60).outcome == "deployed"
        newer = pki.leaf()
        assert rig.deploy("a", newer).get(60).outcome == "deployed"
        assert rig.record("a", did) is None  # pruned: the journal no longer remembers it
        reloads = len(rig.host.reload.calls)

        co.r.delete(f"mailtls:deploy:{did}")
        co.put_record({"deploy_id": did, "target": "a", "host": "mxfence", "phase": "queued", "outcome": None})
        co.put_envelope(did, env)
        tasks.stage.apply_async(kwargs={"target": "a", "host": "mxfence", "deploy_id": did, "fence": None})
        rec = co.wait_record(did, 30)

        assert rec is not None and (rec["outcome"], rec["reason"]) == ("rejected", "superseded"), rec
        assert rig.live() == (newer.fullchain_pem, newer.key_pem)
        assert len(rig.host.reload.calls) == reloads

        # a message that lies about the fence of a genuine envelope is refused outright
        did2 = f"liar-{int(time.time() * 1000)}"
        env2 = seal(target="a", host="mxfence", deploy_id=did2, fence=co.next_fence("a"), cert=old.fullchain_pem,
                    key=old.key_pem, chain=None, force=True, signing_key=keys.signing_key,
                    recipient=keys.host_key("mxfence"))
        co.put_record({"deploy_id": did2, "target": "a", "host": "mxfence", "phase": "queued", "outcome": None})
        co.put_envelope(did2, env2)
        tasks.stage.apply_async(kwargs={"target": "a", "host": "mxfence", "deploy_id": did2, "fence": 10**18})
        rec2 = co.wait_record(did2, 30)
        assert rec2 is not None and rec2["outcome"] == "rejected" and "made for fence" in rec2["error"], rec2
        assert rig.live() == (newer.fullchain_pem, newer.key_pem)
    finally:
        rig.close()

"""Keys in transit, deploys only from the pipeline, and Redis over TLS with AUTH,
against real redis-server instances and real workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mailtls_tasks.distributed import tasks
from mailtls_tasks.distributed.app import use_broker
from mailtls_tasks.distributed.coordination import Coordinator
from mailtls_tasks.distributed.workflow import DeployTimeout, deploy, enqueue_sealed
from mailtls_tasks.errors import BrokerError, ConfigError
from mailtls_tasks.security.envelope import seal
from mailtls_tasks.security.keys import load_pipeline
from tests.integration.test_workflow import _secret_needles, redis_dump
from tests.support.host import MailHost
from tests.support.keys import Pipeline
from tests.support.pki import PKI, Issued, issue, make_pki
from tests.support.services import REPO, Flower, RedisServer, Worker

pytestmark = pytest.mark.integration


class Guarded:
    """One host, enrolled with the test pipeline, its worker on the session Redis."""

    def __init__(self, root: Path, redis_server: RedisServer, pki: PKI, pipeline: Pipeline) -> None:
        self.redis, self.pki, self.pipeline = redis_server, pki, pipeline
        self.host = MailHost(root / "mx5", host="mx5")
        self.host.enroll(pipeline)
        self.host.add_target("sec")
        self.host.add_target("other")
        self.host.install("sec", pki.leaf())
        self.worker = Worker(self.host.config_path, redis_server.url, root / "worker.log")
        self.co = Coordinator(redis_server.url)
        use_broker(redis_server.url)

    def send(self, envelope: dict[str, Any], *, target: str = "sec", deploy_id: str, fence: int) -> dict[str, Any]:
        """Put a (possibly hostile) stage message on the host's queue, as a Redis writer could."""
        self.co.put_record({"deploy_id": deploy_id, "target": target, "host": "mx5", "phase": "queued",
                            "outcome": None})
        self.co.put_envelope(deploy_id, envelope)
        tasks.stage.apply_async(kwargs={"target": target, "host": "mx5", "deploy_id": deploy_id, "fence": fence})
        rec = self.co.wait_record(deploy_id, 30)
        assert rec is not None and rec.get("outcome"), rec
        return rec

    def envelope(self, leaf: Issued, *, target: str = "sec", deploy_id: str, fence: int,
                 signing_key: Ed25519PrivateKey | None = None, issued_at: float | None = None) -> dict[str, Any]:
        keys = load_pipeline(str(self.pipeline.path))
        return seal(target=target, host="mx5", deploy_id=deploy_id, fence=fence, cert=leaf.fullchain_pem,
                    key=leaf.key_pem, chain=None, force=False, signing_key=signing_key or keys.signing_key,
                    recipient=keys.host_key("mx5"), issued_at=issued_at)

    def close(self) -> None:
        self.worker.stop()
        self.host.close()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, pki: PKI,
            pipeline: Pipeline) -> Iterator[Guarded]:
    g = Guarded(tmp_path_factory.mktemp("guarded"), redis_server, pki, pipeline)
    yield g
    g.close()


def _assert_refused(g: Guarded, rec: dict[str, Any], reason: str, before: dict[str, Any], reloads: int) -> None:
    assert rec["outcome"] == "rejected" and reason in rec["error"], rec
    assert g.host.snapshot() == before  # bytes and mtime
    assert len(g.host.reload.calls) == reloads
    status = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "status", rec["deploy_id"], "--broker",
                             g.redis.url], capture_output=True, text=True, cwd=REPO)
    assert status.returncode == 2, status.stdout + status.stderr


@pytest.mark.parametrize("attack", ["forged", "tampered", "expired", "wrong_target", "wrong_deploy_id"])
def test_hostile_envelopes_are_refused_by_the_worker(guarded: Guarded, attack: str) -> None:
    g = guarded
    before, reloads = g.host.snapshot(), len(g.host.reload.calls)
    fence = g.co.next_fence("sec")
    did = f"attack-{attack}-{fence}"
    leaf = g.pki.leaf()
    if attack == "forged":
        env, reason = g.envelope(leaf, deploy_id=did, fence=fence, signing_key=Ed25519PrivateKey.generate()), \
            "not in this host's trusted_signers"
    elif attack == "tampered":
        env = g.envelope(leaf, deploy_id=did, fence=fence)
        env["ct"] = env["ct"][:-8] + ("A" * 8 if not env["ct"].endswith("A" * 8) else "B" * 8)
        reason = "signature does not verify"
    elif attack == "expired":
        env, reason = g.envelope(leaf, deploy_id=did, fence=fence, issued_at=time.time() - 7200), "older than"
    elif attack == "wrong_target":
        env, reason = g.envelope(leaf, target="other", deploy_id=did, fence=fence), "made for target 'other'"
    else:
        env, reason = g.envelope(leaf, deploy_id="someone-else", fence=fence), "made for deploy_id"
    rec = g.send(env, deploy_id=did, fence=fence)
    _assert_refused(g, rec, reason, before, reloads)


def test_replays_cannot_roll_a_target_back(guarded: Guarded) -> None:
    g = guarded
    first, second = g.pki.leaf(), g.pki.leaf()
    f1 = g.co.next_fence("sec")
    env1 = g.envelope(first, deploy_id=f"legit-{f1}", fence=f1)
    assert enqueue_sealed(g.co, env1).get(60).outcome == "deployed"
    r2 = deploy("sec", second.fullchain_pem, second.key_pem, broker_url=g.redis.url).get(60)
    assert r2.outcome == "deployed"
    before, reloads = g.host.snapshot(), len(g.host.reload.calls)

    # 1. the very same message again: that deploy already ended, nothing happens
    g.co.put_envelope(f"legit-{f1}", env1)
    tasks.stage.apply_async(kwargs={"target": "sec", "host": "mx5", "deploy_id": f"legit-{f1}",
                                    "fence": f1}, ignore_result=False).get(timeout=30)
    assert g.host.snapshot() == before and len(g.host.reload.calls) == reloads
    # 2. the old envelope under a fresh deploy id and fence: the signature binds both
    f3 = g.co.next_fence("sec")
    rec = g.send(env1, deploy_id=f"replay-{f3}", fence=f3)
    _assert_refused(g, rec, "made for", before, reloads)
    # 3. an old envelope that never ran (captured in the queue), sent after a newer deploy: fenced off
    stale = g.envelope(g.pki.leaf(), deploy_id=f"stale-{f1}", fence=f1)
    rec = g.send(stale, deploy_id=f"stale-{f1}", fence=f1)
    _assert_refused(g, rec, "superseded", before, reloads)
    assert g.host.path("sec", "cert").read_bytes() == second.fullchain_pem


def test_queued_message_holds_only_ciphertext(guarded: Guarded, pipeline: Pipeline, tmp_path: Path) -> None:
    """A deploy for a host whose worker is down waits in Redis: scan it there."""
    g = guarded
    pipeline.enroll("mx-offline", tmp_path / "offline-keys")
    g.co.publish_target({"target": "parked", "host": "mx-offline", "mode": "postfix"})
    leaf = g.pki.leaf()
    handle = deploy("parked", leaf.fullchain_pem, leaf.key_pem, broker_url=g.redis.url)
    r = redis.Redis.from_url(g.redis.url)
    assert r.llen("mailtls.mx-offline") == 1
    text = "\n".join(redis_dump(g.redis.url))
    assert '"ct"' in text or "ct" in text
    leaked = [n[:20] for n in _secret_needles([leaf.key_pem]) if n in text]
    assert not leaked, f"queued message exposes the key: {leaked[:3]}"
    with pytest.raises(DeployTimeout, match="nothing was touched"):
        handle.get(timeout=1)
    r.delete("mailtls.mx-offline")


def test_worker_refuses_to_start_without_keys(tmp_path: Path, redis_server: RedisServer) -> None:
    host = MailHost(tmp_path / "nokeys", host="nokeys")
    host.add_target("t")
    p = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "worker", "--config", str(host.config_path),
                        "--broker", redis_server.url], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 1
    assert "no [security] section" in p.stderr and "mailtls keys init-host" in p.stderr
    # --local needs none of it
    leaf = make_pki().leaf()
    from mailtls_tasks.core.local import run_local

    assert run_local(host.config, "t", leaf.fullchain_pem, leaf.key_pem).outcome == "deployed"


def test_client_without_pipeline_keys_is_told_how_to_make_them(guarded: Guarded, tmp_path: Path) -> None:
    leaf = guarded.pki.leaf()
    with pytest.raises(ConfigError, match="mailtls keys init-pipeline"):
        deploy("sec", leaf.fullchain_pem, leaf.key_pem, broker_url=guarded.redis.url,
               pipeline=str(tmp_path / "missing.toml"))


def test_keys_commands(tmp_path: Path) -> None:
    def cli(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "keys", *a], capture_output=True,
                              text=True, cwd=REPO)

    p = cli("init-host", "--out", str(tmp_path / "host.key"))
    assert p.returncode == 0 and "x25519:" in p.stdout
    assert (tmp_path / "host.key").stat().st_mode & 0o777 == 0o600
    assert cli("init-host", "--out", str(tmp_path / "host.key")).returncode == 1  # never overwrites
    p2 = cli("init-pipeline", "--out", str(tmp_path / "pipe.key"))
    assert p2.returncode == 0 and "ed25519:" in p2.stdout
    host_pub = cli("public", str(tmp_path / "host.key")).stdout.strip()
    assert host_pub.startswith("x25519:") and host_pub in p.stdout
    os.chmod(tmp_path / "pipe.key", 0o644)
    p3 = cli("public", str(tmp_path / "pipe.key"))
    assert p3.returncode == 1 and "chmod 0600" in p3.stderr
    os.chmod(tmp_path / "pipe.key", 0o600)
    signer = cli("public", str(tmp_path / "pipe.key")).stdout.strip()
    cfg = tmp_path / "t.json"
    cfg.write_text(json.dumps({"security": {"host_keys": [str(tmp_path / "host.key")], "trusted_signers": [signer]}}))
    p4 = cli("trusted", "--config", str(cfg))
    assert p4.returncode == 0 and host_pub in p4.stdout and signer in p4.stdout


# ------------------------------------------------------------------ Redis over TLS + AUTH
@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    d = tmp_path_factory.mktemp("tls-redis")
    ca = issue("redis test ca", ca=True, days=2)
    srv = issue("127.0.0.1", ca, ips=["127.0.0.1"], days=2)
    (d / "ca.pem").write_bytes(ca.cert_pem)
    (d / "srv.pem").write_bytes(srv.cert_pem)
    (d / "srv.key").write_bytes(srv.key_pem)
    os.chmod(d / "srv.key", 0o600)
    s = RedisServer(d, tls=(d / "srv.pem", d / "srv.key", d / "ca.pem"), user="mailtls", password="s3cret-pw")
    yield s
    s.stop()


def test_deploy_over_rediss_with_auth(tls_redis: RedisServer, tmp_path: Path, pki: PKI, pipeline: Pipeline) -> None:
    assert tls_redis.url.startswith("rediss://mailtls:")
    host = MailHost(tmp_path / "mx6", host="mx6")
    host.enroll(pipeline)
    host.add_target("tls-t")
    worker = Worker(host.config_path, tls_redis.url, tmp_path / "worker.log")
    try:
        leaf = pki.leaf()
        # registered before the worker says "ready": over TLS and AUTH too
        assert Coordinator(use_broker(tls_redis.url).conf.broker_url).resolve("tls-t") == ("mx6", "tls-t")
        res = deploy("tls-t", leaf.fullchain_pem, leaf.key_pem, broker_url=tls_redis.url).get(60)
        assert res.outcome == "deployed", res.error
        assert host.path("tls-t", "key").read_bytes() == leaf.key_pem
        assert "s3cret-pw" not in worker.log()
    finally:
        worker.stop()
        host.close()


def test_rediss_refuses_unverified_or_unauthenticated(tls_redis: RedisServer, pki: PKI) -> None:
    leaf = pki.leaf()
    base = tls_redis.url.split("?")[0]
    with pytest.raises(BrokerError, match="CERTIFICATE_VERIFY_FAILED"):  # no CA given: the server is unverifiable
        deploy("tls-t", leaf.fullchain_pem, leaf.key_pem, broker_url=base)
    with pytest.raises(ConfigError, match="cannot be off"):
        deploy("tls-t", leaf.fullchain_pem, leaf.key_pem, broker_url=base + "?ssl_cert_reqs=none")
    wrong = tls_redis.url.replace("s3cret-pw", "wrong")
    with pytest.raises(BrokerError, match="invalid username-password"):
        deploy("tls-t", leaf.fullchain_pem, leaf.key_pem, broker_url=wrong)
    plain = f"redis://127.0.0.1:{tls_redis.port}/0"
    p = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "targets", "--broker", plain],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 1 and "Redis" in p.stderr


# ------------------------------------------------------------------ least-rights ACL users
def test_least_rights_acl_users(tmp_path: Path, pki: PKI, pipeline: Pipeline) -> None:
    """workers/redis-users.acl, as the README tells an operator to install it: a worker
    and the pipeline each do everything they do (deploy, targets, history, status,
    audit --now, rollout) and Redis denies nothing; the pipeline cannot take a message
    off a queue, and neither user can run an admin command."""
    acl = (REPO / "workers" / "redis-users.acl").read_text()
    acl = (acl.replace("CHANGE-ME-worker", "w-pw").replace("CHANGE-ME-pipeline", "p-pw")
           .replace("CHANGE-ME-flower", "f-pw").replace("CHANGE-ME-admin", "admin-pw"))
    (tmp_path / "users.acl").write_text(acl)
    srv = RedisServer(tmp_path / "redis", extra=["--aclfile", str(tmp_path / "users.acl")])
    admin = redis.Redis(port=srv.port, username="mailtls-admin", password="admin-pw", decode_responses=True)
    w_url = f"redis://mailtls-worker:w-pw@127.0.0.1:{srv.port}/0"
    p_url = f"redis://mailtls-pipeline:p-pw@127.0.0.1:{srv.port}/0"
    f_url = f"redis://mailtls-flower:f-pw@127.0.0.1:{srv.port}/0"
    host = MailHost(tmp_path / "mx8", host="mx8")
    host.enroll(pipeline)
    host.add_target("acl-t")
    worker = flower = None
    try:
        worker = Worker(host.config_path, w_url, tmp_path / "worker.log")
        flower = Flower(f_url, tmp_path / "flower.log")
        leaf = pki.leaf()
        res = deploy("mx8/acl-t", leaf.fullchain_pem, leaf.key_pem, broker_url=p_url).get(60)
        assert res.outcome == "deployed", res.error
        (tmp_path / "c.pem").write_bytes(leaf.fullchain_pem)
        (tmp_path / "k.pem").write_bytes(leaf.key_pem)
        env = {**os.environ, "MAILTLS_BROKER_URL": p_url, "PYTHONPATH": str(REPO)}
        for args in (["targets"], ["history", "mx8/acl-t"], ["status", res.deploy_id], ["audit", "--now"],
                     ["rollout", "--cert", "c.pem", "--key", "k.pem", "--targets", "mx8/acl-t"]):
            p = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", *args], env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=120)
            assert p.returncode == 0, (args, p.stdout[-500:], p.stderr[-1500:])
        # Flower, as its own user: sees the deploy's tasks (events), the worker (a
        # broadcast and its reply), queue lengths; reads no record, sends nothing
        deadline = time.monotonic() + 20
        names: set[str] = set()
        while time.monotonic() < deadline and "mailtls.verify" not in names:
            names = {t["name"] for t in json.loads(flower.get("/api/tasks")).values()}
            time.sleep(0.2)
        assert {"mailtls.deploy", "mailtls.stage", "mailtls.verify"} <= names, admin.execute_command("ACL", "LOG")
        assert "mailtls@mx8" in json.loads(flower.get("/api/workers?refresh=1"))
        assert "active_queues" in json.loads(flower.get("/api/queues/length"))  # LLEN of the queues it knows
        denied = admin.execute_command("ACL", "LOG")  # nothing was denied along the way
        assert denied == [], [(d["username"], d["reason"], d["object"], d["client-info"][-120:]) for d in denied]
        assert "failed" not in (tmp_path / "flower.log").read_text()  # e.g. "Inspect method stats failed: NOPERM"
        flower_client = redis.Redis.from_url(f_url)
        with pytest.raises(redis.exceptions.NoPermissionError):
            flower_client.get(f"mailtls:deploy:{res.deploy_id}")
        with pytest.raises(redis.exceptions.NoPermissionError):
            flower_client.lpush("mailtls.mx8", "x")
        pipe_client = redis.Redis.from_url(p_url)
        with pytest.raises(redis.exceptions.NoPermissionError):
            pipe_client.brpop(["mailtls.mx8"], timeout=1)
        for url in (w_url, p_url):
            with pytest.raises(redis.exceptions.NoPermissionError):
                redis.Redis.from_url(url).flushall()
    finally:
        if flower is not None:
            flower.stop()
        if worker is not None:
            worker.stop()
        host.close()
        srv.stop()


def test_a_batch_member_with_a_hostile_envelope_is_refused_alone(guarded: Guarded) -> None:
    """One ``mailtls.batch`` message, two members: a forged envelope for ``other`` is
    refused (nothing of it touched), the genuine one for ``sec`` deploys. Redis never
    held either key in the clear, nor does the batch's message."""
    from mailtls_tasks.distributed.workflow import enqueue_batch

    g = guarded
    good, bad = g.pki.leaf(), g.pki.leaf()
    f1, f2 = g.co.next_fence("sec"), g.co.next_fence("other")
    genuine = g.envelope(good, deploy_id=f"batch-sec-{f1}", fence=f1)
    forged = g.envelope(bad, target="other", deploy_id=f"batch-other-{f2}", fence=f2,
                        signing_key=Ed25519PrivateKey.generate())
    other_files = [g.host.path("other", r) for r in ("cert", "key")]
    assert not any(p.exists() for p in other_files)

    sec, other = enqueue_batch(g.co, [genuine, forged], None)
    text = "\n".join(redis_dump(g.redis.url))  # while queued: the message and both envelopes
    results = sec.get(60), other.get(60)

    assert results[0].outcome == "deployed", results[0].error
    assert results[1].outcome == "rejected" and "not in this host's trusted_signers" in (results[1].error or "")
    assert g.host.path("sec", "cert").read_bytes() == good.fullchain_pem
    assert not any(p.exists() for p in other_files)
    text += "\n".join(redis_dump(g.redis.url))
    leaked = [n[:20] for n in _secret_needles([good.key_pem, bad.key_pem]) if n in text]
    assert not leaked, f"Redis exposes a key: {leaked[:3]}"

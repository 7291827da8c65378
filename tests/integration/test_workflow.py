"""Deploys through Redis and real Celery worker processes."""

from __future__ import annotations

import base64
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from mailtls_tasks.core import probe
from mailtls_tasks.core.journal import Journal
from mailtls_tasks.core.material import key_matches_cert
from mailtls_tasks.distributed.workflow import deploy
from mailtls_tasks.errors import Rejected, UnknownTarget
from tests.support.host import MailHost
from tests.support.keys import Pipeline
from tests.support.pki import PKI, Issued
from tests.support.services import REPO, Flower, RedisServer, Worker
from tests.support.tlsserver import TLSServer

pytestmark = pytest.mark.integration


class Fleet:
    """Two mail hosts, each with its own worker and targets, sharing one Redis."""

    def __init__(self, root: Path, redis_server: RedisServer, pki: PKI, pipeline: Pipeline) -> None:
        self.redis = redis_server
        self.pki = pki
        self.mx1 = MailHost(root / "mx1", host="mx1")
        self.mx1.enroll(pipeline)
        self.mx1.add_target("smtp")
        self.mx1.add_target("plain")
        self.mx1.add_target("slow", command_timeout=1)
        self.mx1.add_target("stale")
        self.mx1.install("smtp", pki.leaf())
        self.smtp_server = self.mx1.server("smtp", "smtp")
        self.mx1.enable_verify("smtp", self.smtp_server.endpoint, timeout=3, protocol="smtp")
        # "stale": the daemon reads other files, so verify never sees a new leaf
        self.stale_files = root / "stale-daemon"
        self.stale_files.mkdir()
        self.stale_leaf = pki.leaf()
        (self.stale_files / "c.pem").write_bytes(self.stale_leaf.fullchain_pem)
        (self.stale_files / "k.pem").write_bytes(self.stale_leaf.key_pem)
        self.mx1.install("stale", self.stale_leaf)
        self.stale_server = TLSServer(self.stale_files / "c.pem", self.stale_files / "k.pem", "imap")
        self.mx1.servers.append(self.stale_server)
        self.mx1.enable_verify("stale", self.stale_server.endpoint, timeout=0.8, protocol="imap")

        self.mx2 = MailHost(root / "mx2", host="mx2")
        self.mx2.enroll(pipeline)
        self.mx2.add_target("imap2", mode="dovecot")

        # Flower watches from the start, so it sees every deploy, retry and rollback below
        self.flower = Flower(redis_server.url, root / "flower.log")
        self.w1 = Worker(self.mx1.config_path, redis_server.url, root / "worker-mx1.log")
        self.w2 = Worker(self.mx2.config_path, redis_server.url, root / "worker-mx2.log")
        self.keys: list[bytes] = []
        self._wait_registered(["smtp", "plain", "slow", "stale", "imap2"])

    def _wait_registered(self, targets: list[str]) -> None:
        r = redis.Redis.from_url(self.redis.url, decode_responses=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if all(r.smembers(f"mailtls:name:{t}") for t in targets):
                return
            time.sleep(0.1)
        raise TimeoutError("workers did not register their targets")

    def deploy(self, target: str, leaf: Issued, timeout: float = 60, **kw: object):  # type: ignore[no-untyped-def]
        """By address: other modules' hosts share this Redis and may define the same names."""
        self.keys.append(leaf.key_pem)
        if "/" not in target:
            target = f"{'mx2' if target == 'imap2' else 'mx1'}/{target}"
        return deploy(target, leaf.fullchain_pem, leaf.key_pem, broker_url=self.redis.url, **kw).get(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.flower.stop()
        self.w1.stop()
        self.w2.stop()
        self.mx1.close()
        self.mx2.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, pki: PKI,
          pipeline: Pipeline) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("fleet"), redis_server, pki, pipeline)
    yield f
    f.close()


def _task_lines(log: str, deploy_id: str) -> list[str]:
    return [ln for ln in log.splitlines() if "succeeded in" in ln and deploy_id in ln]


def test_deploy_through_queue(fleet: Fleet) -> None:
    new = fleet.pki.leaf()
    res = fleet.deploy("smtp", new)

    assert res.outcome == "deployed", res.error
    assert res.host == "mx1"
    assert res.fingerprint_sha256 == res.served_fingerprint_sha256 == new.fingerprint
    assert probe.probe("127.0.0.1", fleet.smtp_server.port, "smtp").fingerprint == new.fingerprint
    assert [s for s, r in res.steps.items() if r.status == "ok"] == ["stage", "validate", "commit", "reload", "verify"]
    ran = _task_lines(fleet.w1.wait_log("mailtls.verify[", "succeeded", res.deploy_id), res.deploy_id)
    assert [ln.split("Task ")[1].split("[")[0] for ln in ran] == [
        "mailtls.deploy", "mailtls.stage", "mailtls.validate", "mailtls.commit", "mailtls.reload", "mailtls.verify"]
    assert res.deploy_id not in fleet.w2.log()
    hist = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "history", "mx1/smtp", "--json", "--broker",
                           fleet.redis.url], capture_output=True, text=True, cwd=REPO, check=True)
    top = json.loads(hist.stdout)[0]
    assert top["deploy_id"] == res.deploy_id and top["outcome"] == "deployed" and top["host"] == "mx1"
    jrec = Journal(str(fleet.mx1.state)).load("smtp", res.deploy_id)
    assert jrec is not None and jrec.outcome == "deployed"


def test_an_explicit_deploy_id_already_used_is_refused_before_anything_is_sent(fleet: Fleet) -> None:
    """A pipeline with a fixed id would otherwise get the first deploy's outcome as its
    own: the host returns the record it has for that id."""
    first = fleet.deploy("plain", fleet.pki.leaf(), deploy_id="pipeline-fixed-1")
    assert first.outcome == "deployed", first.error
    r = redis.Redis.from_url(fleet.redis.url)
    queued = r.llen("mailtls.mx1")
    record = r.get("mailtls:deploy:pipeline-fixed-1")

    with pytest.raises(Rejected, match=r"deploy id pipeline-fixed-1 is already used .*ended deployed"):
        fleet.deploy("plain", fleet.pki.leaf(), deploy_id="pipeline-fixed-1")

    assert r.get("mailtls:deploy:pipeline-fixed-1") == record  # the first deploy's record, untouched
    assert r.llen("mailtls.mx1") == queued


def test_two_hosts_get_only_their_own_targets(fleet: Fleet) -> None:
    a = fleet.deploy("plain", fleet.pki.leaf())
    b = fleet.deploy("imap2", fleet.pki.leaf())
    assert a.outcome == b.outcome == "deployed"
    assert (a.host, b.host) == ("mx1", "mx2")
    log1, log2 = fleet.w1.log(), fleet.w2.log()
    assert a.deploy_id in log1 and a.deploy_id not in log2
    assert b.deploy_id in log2 and b.deploy_id not in log1
    assert fleet.mx2.path("imap2", "key").read_bytes() == fleet.keys[-1]


def test_reload_failure_runs_rollback_task(fleet: Fleet) -> None:
    before = fleet.mx1.path("plain", "cert").read_bytes(), fleet.mx1.path("plain", "key").read_bytes()
    fleet.mx1.reload.fail_once()
    res = fleet.deploy("plain", fleet.pki.leaf())
    assert res.outcome == "rolled_back", res.error
    assert "reload_command failed" in (res.error or "")
    assert (fleet.mx1.path("plain", "cert").read_bytes(), fleet.mx1.path("plain", "key").read_bytes()) == before
    log = fleet.w1.wait_log("mailtls.rollback[", "DeployEnded", res.deploy_id)
    # the row that ends the deploy is a failure naming how it ended (Flower's list shows it)
    assert any("mailtls.rollback[" in ln and "raised expected: DeployEnded('rolled_back (reload failed)" in ln
               and f"[deploy {res.deploy_id}]" in ln for ln in log.splitlines()), log[-3000:]
    assert any("mailtls.reload[" in ln and "raised" in ln for ln in log.splitlines())


def test_verify_failure_runs_rollback_task_and_old_leaf_served(fleet: Fleet) -> None:
    res = fleet.deploy("stale", fleet.pki.leaf())
    assert res.outcome == "rolled_back", res.error
    assert res.served_fingerprint_sha256 == fleet.stale_leaf.fingerprint
    assert fleet.mx1.path("stale", "cert").read_bytes() == fleet.stale_leaf.fullchain_pem
    assert any("mailtls.rollback[" in ln and res.deploy_id in ln
               for ln in fleet.w1.wait_log("mailtls.rollback[", res.deploy_id).splitlines())


def test_transient_command_timeout_is_retried(fleet: Fleet) -> None:
    calls = len(fleet.mx1.reload.calls)
    fleet.mx1.reload.hang_once(4)  # > command_timeout=1 of target "slow"
    res = fleet.deploy("slow", fleet.pki.leaf())
    assert res.outcome == "deployed", res.error
    assert len(fleet.mx1.reload.calls) == calls + 2
    assert "retry" in fleet.w1.log().lower()


def test_ten_concurrent_deploys_run_one_at_a_time(fleet: Fleet) -> None:
    leaves = [fleet.pki.leaf() for _ in range(10)]
    handles = [deploy("plain", leaf.fullchain_pem, leaf.key_pem, broker_url=fleet.redis.url) for leaf in leaves]
    fleet.keys += [leaf.key_pem for leaf in leaves]
    results = [h.get(timeout=240) for h in handles]

    assert all(r.outcome in ("deployed", "rejected") for r in results), [(r.outcome, r.error) for r in results]
    assert any(r.outcome == "deployed" for r in results)
    assert all(r.reason == "superseded" for r in results if r.outcome == "rejected")
    # never interleaved: the journal intervals of these deploys do not overlap
    ids = {h.deploy_id for h in handles}
    recs = sorted((r for r in Journal(str(fleet.mx1.state)).records("plain") if r.deploy_id in ids),
                  key=lambda r: r.created)
    for a, b in itertools.pairwise(recs):
        assert a.updated <= b.created, f"{a.deploy_id} overlapped {b.deploy_id}"
    # one coherent set is live: a matching pair, byte-equal to one of the deployed ones
    cert, key = fleet.mx1.path("plain", "cert").read_bytes(), fleet.mx1.path("plain", "key").read_bytes()
    assert key_matches_cert(key, cert)
    assert any(cert == leaf.fullchain_pem and key == leaf.key_pem for leaf in leaves)
    assert fleet.mx1.stray_temps() == []


def test_unknown_target_rejected_by_client(fleet: Fleet) -> None:
    leaf = fleet.pki.leaf()
    with pytest.raises(UnknownTarget, match="no worker has registered"):
        deploy("nope", leaf.cert_pem, leaf.key_pem, broker_url=fleet.redis.url)
    with pytest.raises(UnknownTarget):
        deploy("../etc", leaf.cert_pem, leaf.key_pem, broker_url=fleet.redis.url)


def test_cli_distributed_deploy_status_and_targets(fleet: Fleet, tmp_path: Path) -> None:
    leaf, other = fleet.pki.leaf(), fleet.pki.leaf()
    fleet.keys.append(leaf.key_pem)
    (tmp_path / "c.pem").write_bytes(leaf.fullchain_pem)
    (tmp_path / "k.pem").write_bytes(leaf.key_pem)
    (tmp_path / "bad.pem").write_bytes(other.key_pem)
    env = {**os.environ, "MAILTLS_BROKER_URL": fleet.redis.url}

    def cli(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", *a], capture_output=True, text=True,
                              cwd=REPO, env=env, timeout=120)

    p = cli("deploy", "plain", "--cert", str(tmp_path / "c.pem"), "--key", str(tmp_path / "k.pem"), "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert out["outcome"] == "deployed"
    p = cli("deploy", "plain", "--cert", str(tmp_path / "c.pem"), "--key", str(tmp_path / "k.pem"), "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["outcome"] == "unchanged"
    p = cli("deploy", "plain", "--cert", str(tmp_path / "c.pem"), "--key", str(tmp_path / "bad.pem"), "--json")
    assert p.returncode == 2 and json.loads(p.stdout)["outcome"] == "rejected"
    p = cli("status", out["deploy_id"], "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["outcome"] == "deployed"
    p = cli("targets", "--json")
    rows = {r["target"]: r for r in json.loads(p.stdout)}
    assert rows["plain"]["host"] == "mx1" and rows["imap2"]["host"] == "mx2"
    assert rows["plain"]["worker_alive"] is True
    deadline = time.monotonic() + 15  # the registry is refreshed when a deploy ends
    while rows["plain"]["fingerprint_sha256"] != leaf.fingerprint and time.monotonic() < deadline:
        time.sleep(0.2)
        rows = {r["target"]: r for r in json.loads(cli("targets", "--json").stdout)}
    assert rows["plain"]["fingerprint_sha256"] == leaf.fingerprint
    assert rows["plain"]["not_after"].startswith(leaf.cert.not_valid_after_utc.date().isoformat())
    p = cli("deploy", "plain", "--cert", str(tmp_path / "c.pem"), "--key", str(tmp_path / "k.pem"),
            "--broker", "redis://127.0.0.1:1/0", "--json")
    assert p.returncode == 1 and "Redis" in json.loads(p.stdout)["error"]


def _secret_needles(keys: list[bytes]) -> list[str]:
    """Every form a private key could leak in: PEM lines, DER as hex and as base64."""
    needles = []
    for pem in keys:
        body = [ln for ln in pem.decode().splitlines() if ln and "-----" not in ln]
        der = base64.b64decode("".join(body))
        needles += [*body, der.hex(), der.hex()[:64], base64.b64encode(der).decode()[:60],
                    base64.b64encode(pem).decode()[:60]]
    return needles


def _redis_value(r: redis.Redis, k: bytes) -> object:  # type: ignore[type-arg]
    t = r.type(k).decode()
    if t == "string":
        return r.get(k)
    if t == "list":
        return r.lrange(k, 0, -1)
    if t == "hash":
        return r.hgetall(k)
    if t == "set":
        return r.smembers(k)
    return r.zrange(k, 0, -1)


def redis_dump(url: str) -> list[str]:
    r = redis.Redis.from_url(url)
    return [repr(k) + repr(_redis_value(r, k)) for k in r.scan_iter(count=500)]


def test_flower_lists_deploy_tasks_by_name(fleet: Fleet) -> None:
    res = fleet.deploy("plain", fleet.pki.leaf())
    assert res.outcome == "deployed"
    deadline = time.monotonic() + 20
    names: set[str] = set()
    while time.monotonic() < deadline:
        tasks = json.loads(fleet.flower.get("/api/tasks"))
        names = {t["name"] for t in tasks.values() if res.deploy_id in json.dumps(t)}
        if {"mailtls.stage", "mailtls.verify"} <= names:
            break
        time.sleep(0.5)
    assert names >= {"mailtls.stage", "mailtls.validate", "mailtls.commit", "mailtls.reload", "mailtls.verify"}
    stage = next(t for t in json.loads(fleet.flower.get("/api/tasks")).values()
                 if t["name"] == "mailtls.stage" and res.deploy_id in json.dumps(t))
    info = json.loads(fleet.flower.get(f"/api/task/info/{stage['uuid']}"))
    # references only: the sealed envelope waits in Redis beside the message, never in it
    assert "envelope" not in info["kwargs"] and '"ct"' not in json.dumps(info)
    # what an operator reads in the args column: the target's address and the deploy
    assert info["args"] == f"mx1/plain · {res.deploy_id}", info["args"]
    # the same for every stage Flower saw, retried ones included (a busy target above;
    # Celery's retry drops kwargsrepr, which is why nothing secret may be in kwargs)
    stages = [t for t in json.loads(fleet.flower.get("/api/tasks")).values() if t["name"] == "mailtls.stage"]
    assert any(t["state"] == "RETRY" or (t.get("retries") or 0) > 0 for t in stages), "no retried stage seen"
    for t in stages:
        detail = fleet.flower.get(f"/api/task/info/{t['uuid']}")
        assert '"ct"' not in detail and "envelope" not in json.loads(detail)["kwargs"]
    all_names = {t["name"] for t in json.loads(fleet.flower.get("/api/tasks")).values()}
    assert "mailtls.rollback" in all_names  # Flower saw the compensations of the tests above


def test_zz_nothing_anywhere_contains_key_material(fleet: Fleet) -> None:
    """Last in the module: after deploys, retries, rollbacks and ten concurrent deploys,
    scan every Redis key and value, every worker log line, every Flower API response."""
    assert len(fleet.keys) >= 15, "the scan needs the deploys above to have run"
    tasks = json.loads(fleet.flower.get("/api/tasks"))
    assert len(tasks) >= 50
    pages = [fleet.flower.get("/api/tasks"), fleet.flower.get("/api/workers?refresh=1"),
             fleet.flower.get("/api/task/types"), fleet.flower.get("/api/queues/length")]
    pages += [fleet.flower.get(f"/api/task/info/{uuid}") for uuid in tasks]
    dump = redis_dump(fleet.redis.url)
    assert len(dump) > 10
    sources = {"redis": "\n".join(dump), "worker mx1 log": fleet.w1.log(), "worker mx2 log": fleet.w2.log(),
               "flower": "\n".join(pages)}
    needles = _secret_needles(fleet.keys)
    for name, text in sources.items():
        leaked = [n[:20] for n in needles if n in text]
        assert not leaked, f"key material found in {name}: {leaked[:3]}"

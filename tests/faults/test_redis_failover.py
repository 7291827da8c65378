"""Redis that fails over: a master, a replica and three sentinels on loopback, every
node behind an ACL user, the sentinels behind their own password. The broker, the
results and the coordination all go through the sentinels (``sentinel://`` URL).

The master is SIGKILLed in the middle of a rollout of several deploys: the sentinels
promote the replica; every deploy ends with an outcome (or a clear error saying how
to follow it, safe to retry), none is applied twice, the workers and the client carry
on with the new master without a restart, and -- replication being asynchronous, a
failover may lose acknowledged writes -- an older certificate still never replaces a
newer one (the hosts' journals decide, not Redis)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailtls_tasks.core.journal import Journal
from mailtls_tasks.distributed.coordination import Coordinator
from mailtls_tasks.distributed.rollout import rollout
from mailtls_tasks.distributed.workflow import deploy
from tests.support.host import MailHost
from tests.support.keys import Pipeline
from tests.support.pki import PKI
from tests.support.sentinel import SentinelSet
from tests.support.services import Worker

pytestmark = pytest.mark.integration  # in the faults lane: a Redis master SIGKILLed
HOSTS = ("sent-a", "sent-b", "sent-c")


class Ctx:
    def __init__(self, root: Path, pki: PKI, pipeline: Pipeline) -> None:
        self.redis = SentinelSet(root / "redis")
        self.pki = pki
        self.hosts: dict[str, MailHost] = {}
        self.workers: dict[str, Worker] = {}
        self.first = pki.leaf()
        for name in HOSTS:
            h = MailHost(root / name, host=name)
            h.enroll(pipeline)
            h.settings = {"deploy_lease": 4, "recovery_interval": 1}
            h.add_target("mx")
            h.install("mx", self.first)
            self.hosts[name] = h
            self.workers[name] = Worker(h.config_path, self.redis.url, root / f"{name}-worker.log")
        self.co = Coordinator(self.redis.url)
        deadline = time.monotonic() + 60
        while {e["host"] for e in self.co.fleet()} != set(HOSTS):
            assert time.monotonic() < deadline, "the workers never registered through the sentinels"
            time.sleep(0.2)

    def deployed(self, host: str, fingerprint: str) -> list[Any]:
        return [r for r in Journal(str(self.hosts[host].state)).records("mx")
                if r.fingerprint == fingerprint and r.outcome == "deployed"]

    def close(self) -> None:
        for w in self.workers.values():
            w.stop()
        for h in self.hosts.values():
            h.close()
        self.redis.stop()


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory, pki: PKI, pipeline: Pipeline) -> Iterator[Ctx]:
    c = Ctx(tmp_path_factory.mktemp("sentinel"), pki, pipeline)
    try:
        yield c
    finally:
        c.close()


def test_a_deploy_goes_through_the_sentinels(ctx: Ctx) -> None:
    leaf = ctx.pki.leaf()
    res = deploy("sent-a/mx", leaf.fullchain_pem, leaf.key_pem, broker_url=ctx.redis.url).get(timeout=60)
    assert res.outcome == "deployed", res
    assert ctx.hosts["sent-a"].path("mx", "cert").read_bytes() == leaf.fullchain_pem
    master = ctx.redis.node(ctx.redis.master_port())
    assert master.exists(f"mailtls:deploy:{res.deploy_id}")  # on the master the sentinels name


def test_a_command_in_flight_when_the_master_dies_goes_on_with_the_new_master(ctx: Ctx) -> None:
    """A blocking read in flight when the master is SIGKILLed: the coordination's
    connection asks the sentinels for the master on its reconnect and the command
    finishes there. (redis-py alone reconnects to the address it had -- the dead
    master -- until its retries are spent, redis/redis-py#3874: this raised.)"""
    co = Coordinator(ctx.redis.url)
    co.ping()
    out: dict[str, Any] = {}

    def block() -> None:
        try:
            out["got"] = co.r.blpop(["mailtls:test:never"], timeout=5)
        except Exception as err:
            out["error"] = err

    t = threading.Thread(target=block)
    t.start()
    time.sleep(0.5)  # inside BLPOP
    old = ctx.redis.kill_master()
    ctx.redis.wait_failover(old)
    t.join(60)
    assert not t.is_alive() and "error" not in out, out
    co.r.set("mailtls:test:after", "1")
    assert ctx.redis.node(ctx.redis.master_port()).get("mailtls:test:after") == "1"
    ctx.redis.restart_as_replica(old)  # the old master back, as a replica: the next test kills the new one


def test_the_master_killed_mid_rollout_fails_over_and_every_deploy_ends_once(ctx: Ctx) -> None:
    older = ctx.pki.leaf(not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))  # must never replace `leaf`
    leaf = ctx.pki.leaf()
    ctx.hosts["sent-a"].reload.hang_once(4)  # the canary wave is inside its reload when the master dies
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = rollout(leaf.fullchain_pem, leaf.key_pem, targets=[f"{h}/mx" for h in HOSTS],
                                    waves="1,100%", broker_url=ctx.redis.url, timeout=90)
        except Exception as err:
            out["error"] = err

    reloads = len(ctx.hosts["sent-a"].reload.calls)
    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 30
    while len(ctx.hosts["sent-a"].reload.calls) == reloads:
        assert time.monotonic() < deadline, "the canary never reached its reload"
        time.sleep(0.05)
    old = ctx.redis.kill_master()
    new = ctx.redis.wait_failover(old)
    t.join(180)
    assert not t.is_alive(), "the rollout never returned after the failover"
    assert new != old

    if "error" in out:  # allowed only as a clear error that says how to follow up
        assert "mailtls status" in str(out["error"]) or "safe to retry" in str(out["error"]), out["error"]
    else:
        res = out["result"]
        for addr, run_ in res.targets.items():
            assert run_.outcome in ("deployed", "unchanged") or (
                run_.outcome == "timeout" and "mailtls status" in (run_.error or "")), (addr, run_)
    # on every host the journal has it deployed at most once, and the files are one pair: old or new
    for host in HOSTS:
        assert len(ctx.deployed(host, leaf.fingerprint)) <= 1, host
        pair = (ctx.hosts[host].path("mx", "cert").read_bytes(), ctx.hosts[host].path("mx", "key").read_bytes())
        assert pair in ((leaf.fullchain_pem, leaf.key_pem), (ctx.first.fullchain_pem, ctx.first.key_pem)), host

    # the same workers and this client carry on with the new master, no restart: the
    # rollout run again finishes what the failover interrupted, nothing twice
    again = rollout(leaf.fullchain_pem, leaf.key_pem, targets=[f"{h}/mx" for h in HOSTS], waves="100%",
                    broker_url=ctx.redis.url, timeout=90)
    assert sorted(again.targets) == [f"{h}/mx" for h in HOSTS]
    assert all(r.outcome in ("deployed", "unchanged") for r in again.targets.values()), again.human()
    for host in HOSTS:
        assert len(ctx.deployed(host, leaf.fingerprint)) == 1, host
        assert ctx.hosts[host].path("mx", "cert").read_bytes() == leaf.fullchain_pem
    assert all(w.proc is not None and w.proc.poll() is None for w in ctx.workers.values())

    # older never replaces newer, whatever Redis lost: the host's journal and files decide
    stale = deploy("sent-b/mx", older.fullchain_pem, older.key_pem, broker_url=ctx.redis.url).get(timeout=60)
    assert stale.outcome == "rejected" and "older" in (stale.error or ""), stale
    assert ctx.hosts["sent-b"].path("mx", "cert").read_bytes() == leaf.fullchain_pem

"""The fleet: three hosts with the very same targets file, real Postfix and Dovecot on
each, real workers -- addressing, rollouts in waves, the names check, the drift audit,
and what Flower shows an operator."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailtls_tasks.core import probe
from mailtls_tasks.distributed.coordination import Coordinator
from mailtls_tasks.distributed.rollout import RolloutError, rollout
from mailtls_tasks.distributed.workflow import deploy
from mailtls_tasks.errors import AmbiguousTarget
from tests.support.fleet import MAIL_NAME, Fleet
from tests.support.keys import Pipeline
from tests.support.pki import PKI, Issued
from tests.support.services import REPO, Flower, RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
HOSTS = ["fleet-a", "fleet-b", "fleet-c"]


class Ctx:
    def __init__(self, fleet: Fleet, redis: RedisServer, flower: Flower, pki: PKI) -> None:
        self.fleet, self.redis, self.flower, self.pki = fleet, redis, flower, pki
        self.co = Coordinator(redis.url)

    def served(self, host: str, target: str) -> str:
        h = self.fleet.hosts[host]
        if target == "smtp":
            return probe.probe(h.address, self.fleet.smtp_ports[0], "smtp", MAIL_NAME).fingerprint
        return probe.probe(h.address, self.fleet.dovecot_ports["imaps"], "imaps", MAIL_NAME).fingerprint

    def leaf(self, name: str = MAIL_NAME, **kw: Any) -> Issued:
        return self.pki.leaf(name, **kw)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", *args, "--broker", self.redis.url],
                              capture_output=True, text=True, cwd=REPO, timeout=180)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, pki: PKI,
        pipeline: Pipeline) -> Iterator[Ctx]:
    root = tmp_path_factory.mktemp("fleet")
    anchors = root / "test-ca.pem"
    anchors.write_bytes(pki.root.cert_pem)
    fleet = Fleet(root, pki, pipeline, HOSTS, trust_anchors=anchors)
    flower = Flower(redis_server.url, root / "flower.log", auth=None)
    try:
        fleet.start(redis_server.url)
        yield Ctx(fleet, redis_server, flower, pki)
    finally:
        flower.stop()
        fleet.stop()


def test_a_bare_name_on_several_hosts_is_ambiguous(ctx: Ctx) -> None:
    leaf = ctx.leaf()
    with pytest.raises(AmbiguousTarget) as err:
        deploy("smtp", leaf.fullchain_pem, leaf.key_pem, broker_url=ctx.redis.url)
    assert "fleet-a/smtp, fleet-b/smtp, fleet-c/smtp" in str(err.value)
    r = ctx.cli("targets")
    assert r.returncode == 0
    for host in HOSTS:
        assert f"{host}  (worker alive)" in r.stdout and f"{host}/smtp" in r.stdout and f"{host}/imap" in r.stdout


def test_host_name_deploys_to_exactly_that_host(ctx: Ctx) -> None:
    before = {h: ctx.served(h, "smtp") for h in HOSTS}
    leaf = ctx.leaf()
    res = deploy("fleet-b/smtp", leaf.fullchain_pem, leaf.key_pem, broker_url=ctx.redis.url).get(90)
    assert res.outcome == "deployed", res.error
    assert (res.target, res.host) == ("fleet-b/smtp", "fleet-b")
    assert ctx.served("fleet-b", "smtp") == leaf.fingerprint
    assert {h: ctx.served(h, "smtp") for h in ("fleet-a", "fleet-c")} == {h: before[h] for h in ("fleet-a", "fleet-c")}
    assert ctx.fleet.hosts["fleet-b"].path("postfix", "key").read_bytes() == leaf.key_pem
    assert ctx.fleet.hosts["fleet-a"].path("postfix", "key").read_bytes() == ctx.fleet.initial.key_pem
    hist = json.loads(ctx.cli("history", "fleet-b/smtp", "--json").stdout)
    assert hist[0]["deploy_id"] == res.deploy_id and hist[0]["target"] == "fleet-b/smtp"


def test_a_certificate_for_other_names_is_rejected(ctx: Ctx) -> None:
    """A certbot hook installed for every lineage must not put www's cert on the mail server."""
    www = ctx.leaf("www.fleet.test")
    res = deploy("fleet-a/smtp", www.fullchain_pem, www.key_pem, broker_url=ctx.redis.url).get(60)
    assert res.outcome == "rejected", res
    assert f"does not cover {MAIL_NAME}" in (res.error or "") and "www.fleet.test" in (res.error or "")
    assert ctx.fleet.hosts["fleet-a"].path("postfix", "key").read_bytes() == ctx.fleet.initial.key_pem
    ctx.rejected_deploy = res.deploy_id  # type: ignore[attr-defined]


def test_rollout_in_waves_halts_when_the_second_wave_fails_verify(ctx: Ctx) -> None:
    """fleet-b's Dovecot is never reloaded (its reload 'succeeds' without doing it): the
    canary (fleet-a) is deployed, fleet-b rolls back, fleet-c is never touched."""
    leaf = ctx.leaf()
    ctx.rollout_leaf = leaf  # type: ignore[attr-defined]
    ctx.fleet.hosts["fleet-b"].dv_reload.skip_once()
    c_before = ctx.fleet.hosts["fleet-c"].path("dovecot", "cert").read_bytes()

    res = rollout(leaf.fullchain_pem, leaf.key_pem, label="imap", waves="1,2,3", broker_url=ctx.redis.url)

    assert res.state == "halted" and res.waves == [["fleet-a/imap"], ["fleet-b/imap"], ["fleet-c/imap"]]
    outcomes = {a: t.outcome for a, t in res.targets.items()}
    assert outcomes == {"fleet-a/imap": "deployed", "fleet-b/imap": "rolled_back", "fleet-c/imap": "skipped"}
    assert res.exit_code == 3
    assert ctx.served("fleet-a", "imap") == leaf.fingerprint
    assert ctx.served("fleet-b", "imap") == ctx.fleet.initial.fingerprint
    assert ctx.served("fleet-c", "imap") == ctx.fleet.initial.fingerprint
    assert ctx.fleet.hosts["fleet-c"].path("dovecot", "cert").read_bytes() == c_before
    status = ctx.cli("rollout-status", res.rollout_id)
    assert status.returncode == 3 and "HALTED" in status.stdout and "skipped" in status.stdout
    ctx.rollout_id = res.rollout_id  # type: ignore[attr-defined]


def test_running_the_same_rollout_again_resumes_it(ctx: Ctx) -> None:
    leaf: Issued = ctx.rollout_leaf  # type: ignore[attr-defined]
    (ctx.fleet.root / "c.pem").write_bytes(leaf.fullchain_pem)
    (ctx.fleet.root / "k.pem").write_bytes(leaf.key_pem)
    r = ctx.cli("rollout", "--cert", str(ctx.fleet.root / "c.pem"), "--key", str(ctx.fleet.root / "k.pem"),
                "--label", "imap", "--waves", "1,2,3", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    assert res["rollout_id"] == ctx.rollout_id  # type: ignore[attr-defined]
    assert {a: t["outcome"] for a, t in res["targets"].items()} == {
        "fleet-a/imap": "unchanged", "fleet-b/imap": "deployed", "fleet-c/imap": "deployed"}
    assert all(ctx.served(h, "imap") == leaf.fingerprint for h in HOSTS)


def test_covers_selects_the_targets_whose_names_the_certificate_covers(ctx: Ctx) -> None:
    www = ctx.leaf("www.fleet.test")
    res = rollout(www.fullchain_pem, www.key_pem, covers=["www.fleet.test"], waves="100%", broker_url=ctx.redis.url)
    assert sorted(res.targets) == [f"{h}/www" for h in HOSTS]
    assert all(t.outcome == "deployed" for t in res.targets.values()), res.human()
    with pytest.raises(RolloutError, match=r"no target selected by names mail.fleet.test: the certificate covers "
                                           r"www.fleet.test \(fleet-a/imap also serves mail.fleet.test"):
        rollout(www.fullchain_pem, www.key_pem, covers=[MAIL_NAME], broker_url=ctx.redis.url)


def test_audit_finds_drift_and_a_certificate_about_to_expire(ctx: Ctx) -> None:
    soon = ctx.leaf(not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=5))
    res = deploy("fleet-a/smtp", soon.fullchain_pem, soon.key_pem, broker_url=ctx.redis.url).get(90)
    assert res.outcome == "deployed", res.error
    # behind the daemon's back: new files on fleet-c's Dovecot, never reloaded
    by_hand = ctx.leaf()
    c = ctx.fleet.hosts["fleet-c"]
    c.path("dovecot", "key").write_bytes(by_hand.key_pem)
    c.path("dovecot", "cert").write_bytes(by_hand.fullchain_pem)

    r = ctx.cli("audit", "--now", "--json")
    assert r.stdout.startswith("["), r.stdout + r.stderr[-300:] + "".join(
        [ln for h in ctx.fleet.hosts.values() if h.worker for ln in h.worker.log().splitlines(True) if "audit" in ln])

    audits = {a["target"]: a for a in json.loads(r.stdout)}
    assert r.returncode == 2, r.stdout + r.stderr  # critical: the drift
    assert set(audits) >= {f"{h}/{t}" for h in HOSTS for t in ("smtp", "imap", "www")}
    a_smtp, c_imap, b_imap = audits["fleet-a/smtp"], audits["fleet-c/imap"], audits["fleet-b/imap"]
    assert a_smtp["status"] == "warning" and 4 < a_smtp["days_left"] < 6, a_smtp
    assert a_smtp["listeners"][0]["chain"] == {MAIL_NAME: "ok"}  # verifies to the fleet's CA, for its name
    assert c_imap["status"] == "critical" and c_imap["drift"] is True
    assert c_imap["on_disk_fingerprint"] == by_hand.fingerprint
    assert c_imap["listeners"][0]["served_fingerprint"] == ctx.rollout_leaf.fingerprint  # type: ignore[attr-defined]
    assert any("changed by hand" in i for i in c_imap["issues"]) and any("not reloaded" in i for i in c_imap["issues"])
    assert b_imap["status"] == "ok", b_imap
    table = ctx.cli("audit")
    assert table.returncode == 2 and "fleet-c/imap" in table.stdout and "CRITICAL" in table.stdout
    log = c.worker.log() if c.worker else ""
    assert "audit fleet-c/imap: CRITICAL" in log


def test_flower_task_list_shows_target_deploy_and_outcome(ctx: Ctx, tmp_path: Path) -> None:
    deadline = time.monotonic() + 20
    rows: dict[str, Any] = {}
    rejected = ctx.rejected_deploy  # type: ignore[attr-defined]
    while time.monotonic() < deadline:
        rows = json.loads(ctx.flower.get("/api/tasks"))
        if any(rejected in (t.get("args") or "") and t["name"] == "mailtls.stage" for t in rows.values()):
            break
        time.sleep(0.5)
    stage = next(t for t in rows.values() if t["name"] == "mailtls.stage" and rejected in (t.get("args") or ""))
    assert stage["args"] == f"fleet-a/smtp · {rejected}"
    assert stage["state"] == "FAILURE"  # a rejected deploy reads as a failed stage, and its chain stops there
    assert not any(t["name"] == "mailtls.validate" and rejected in (t.get("args") or "") for t in rows.values())
    verify = [t for t in rows.values() if t["name"] == "mailtls.verify" and t["state"] == "SUCCESS"]
    assert verify and all(" · " in t["args"] for t in verify)
    assert any("'outcome': 'deployed'" in (t.get("result") or "") for t in verify)
    # every step of a deploy is reachable from its root
    root = next(t for t in rows.values() if t["name"] == "mailtls.deploy" and rejected in (t.get("args") or ""))
    info = json.loads(ctx.flower.get(f"/api/task/info/{stage['uuid']}"))
    assert info["root_id"] == root["uuid"]
    shot = ctx.flower.screenshot(tmp_path / "flower-tasks.png")
    assert shot.stat().st_size > 10_000


def test_a_second_worker_for_the_same_host_is_refused(ctx: Ctx) -> None:
    """Two workers on one host name would consume one queue and take each other's deploys."""
    a = ctx.fleet.hosts["fleet-a"]
    first = a.worker
    with pytest.raises(RuntimeError, match="worker exited 1") as err:
        a.start_worker(ctx.redis.url)
    assert "host 'fleet-a' is already served by another live worker" in str(err.value)
    a.worker = first  # the first one still serves, untouched
    assert first is not None and first.proc is not None and first.proc.poll() is None
    assert ctx.co.host_alive("fleet-a")

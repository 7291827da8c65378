"""The fleet: three hosts with the very same targets file, real Postfix and Dovecot on
each, real workers -- addressing, rollouts in waves, the names check, the drift audit,
and what Flower shows an operator."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailtls_tasks.core import probe
from mailtls_tasks.distributed.coordination import Coordinator
from mailtls_tasks.distributed.rollout import RolloutError, rollout, rollout_many
from mailtls_tasks.distributed.workflow import Certificate, deploy, deploy_many
from mailtls_tasks.errors import AmbiguousTarget, Rejected
from tests.support.fleet import MAIL_NAME, Fleet
from tests.support.keys import Pipeline
from tests.support.pki import PKI, Issued
from tests.support.receiver import Receiver
from tests.support.services import REPO, Flower, RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
HOSTS = ["fleet-a", "fleet-b", "fleet-c"]


class Ctx:
    def __init__(self, fleet: Fleet, redis: RedisServer, flower: Flower, pki: PKI, receiver: Receiver) -> None:
        self.fleet, self.redis, self.flower, self.pki = fleet, redis, flower, pki
        self.receiver = receiver  # the pipeline file's [notify]: halted rollouts
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
def ctx(tmp_path_factory: pytest.TempPathFactory, pki: PKI, pipeline: Pipeline) -> Iterator[Ctx]:
    """A Redis and pipeline keys of the fleet's own: a rollout by label or names
    considers every host the registry and the pipeline keys know, and other modules'
    stopped hosts are not this fleet's."""
    root = tmp_path_factory.mktemp("fleet")
    anchors = root / "test-ca.pem"
    anchors.write_bytes(pki.root.cert_pem)
    redis = RedisServer(root / "redis")
    keys = Pipeline(root / "pipeline")
    receiver = Receiver().start()
    keys.notify_to(receiver.url)
    os.environ["MAILTLS_PIPELINE"] = str(keys.path)
    fleet = Fleet(root, pki, keys, HOSTS, trust_anchors=anchors)
    flower = Flower(redis.url, root / "flower.log", auth=None)
    try:
        fleet.start(redis.url)
        yield Ctx(fleet, redis, flower, pki, receiver)
    finally:
        receiver.stop()
        flower.stop()
        fleet.stop()
        redis.stop()
        os.environ["MAILTLS_PIPELINE"] = str(pipeline.path)


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
    # the rollout's client announced it, from the pipeline file's [notify] URLs
    post = ctx.receiver.wait(1)[0]
    assert post["title"] == f"mailtls: rollout {res.rollout_id} halted (rolled_back)"
    assert "fleet-b/imap: rolled_back" in post["message"] and f"mailtls rollout-status {res.rollout_id}" in \
        post["message"]
    assert any("notified json://" in n for n in res.notes), res.notes
    ctx.rollout_id = res.rollout_id  # type: ignore[attr-defined]
    ctx.rolled_back_deploy = res.targets["fleet-b/imap"].deploy_id  # type: ignore[attr-defined]


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

    # how each deploy ended, readable from the list: the row that ends it (rollback) is
    # a failure naming outcome and reason, and its root row says it too
    rolled_back = ctx.rolled_back_deploy  # type: ignore[attr-defined]
    for deploy_id, outcome, why in ((rejected, "rejected", f"does not cover {MAIL_NAME}"),
                                    (rolled_back, "rolled_back", "verify")):
        mine = {t["name"]: t for t in rows.values() if deploy_id in (t.get("args") or "")}
        ender = mine["mailtls.rollback"]
        assert ender["state"] == "FAILURE", ender
        assert f"{outcome}" in (ender.get("exception") or "") and why in ender["exception"], ender
        assert mine["mailtls.deploy"]["exception"] and outcome in mine["mailtls.deploy"]["exception"], mine
        assert f"'outcome': '{outcome}'" in (mine["mailtls.deploy"].get("result") or ""), mine["mailtls.deploy"]
    # the audits (every audit_interval on every host, and `audit --now` above) stay out of the list
    assert not any(t["name"] == "mailtls.audit" for t in rows.values())
    assert "Exception" in ctx.flower.get("/tasks")  # the column, beside Result
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


def test_deploy_many_is_one_batch_per_host_and_each_certificate_ends_on_its_own(ctx: Ctx) -> None:
    """Three certificates for fleet-a (one of them for the wrong names) and one for
    fleet-b: fleet-a gets one batch (one reload per daemon), fleet-b an ordinary
    deploy; every certificate has its own id, record, history entry and Flower row."""
    a, b = ctx.fleet.hosts["fleet-a"], ctx.fleet.hosts["fleet-b"]
    smtp, imap, wrong, b_smtp = ctx.leaf(), ctx.leaf(), ctx.leaf(), ctx.leaf()
    reloads = (a.pf_reload.calls, a.dv_reload.calls, b.pf_reload.calls)
    www_before = a.path("www", "cert").read_bytes()

    handles = deploy_many([Certificate("fleet-a/smtp", smtp.fullchain_pem, smtp.key_pem),
                           Certificate("fleet-a/imap", imap.fullchain_pem, imap.key_pem),
                           Certificate("fleet-a/www", wrong.fullchain_pem, wrong.key_pem),
                           Certificate("fleet-b/smtp", b_smtp.fullchain_pem, b_smtp.key_pem)],
                          broker_url=ctx.redis.url)

    assert [h.target for h in handles] == ["fleet-a/smtp", "fleet-a/imap", "fleet-a/www", "fleet-b/smtp"]
    assert len({h.deploy_id for h in handles}) == 4
    results = [h.get(timeout=90) for h in handles]
    assert [r.outcome for r in results] == ["deployed", "deployed", "rejected", "deployed"], [r.error for r in results]
    assert "www.fleet.test" in (results[2].error or "")
    assert ctx.served("fleet-a", "smtp") == smtp.fingerprint and ctx.served("fleet-a", "imap") == imap.fingerprint
    assert ctx.served("fleet-b", "smtp") == b_smtp.fingerprint
    assert a.path("www", "cert").read_bytes() == www_before  # rejected alone: nothing of it touched
    assert (a.pf_reload.calls, a.dv_reload.calls, b.pf_reload.calls) == (reloads[0] + 1, reloads[1] + 1,
                                                                         reloads[2] + 1)
    records = [ctx.co.get_record(h.deploy_id) for h in handles]
    batch_ids = {r["batch_id"] for r in records[:3] if r}
    assert len(batch_ids) == 1 and None not in batch_ids and records[3] and records[3].get("batch_id") is None
    status = json.loads(ctx.cli("status", handles[1].deploy_id, "--json").stdout)
    assert status["outcome"] == "deployed" and status["target"] == "fleet-a/imap"
    hist = json.loads(ctx.cli("history", "fleet-a/imap", "--json").stdout)
    assert hist[0]["deploy_id"] == handles[1].deploy_id

    # Flower: the batch's row, and under it a row per certificate with its own state
    wanted = {h.deploy_id: h.target for h in handles[:3]}
    deadline = time.monotonic() + 20
    rows: dict[str, Any] = {}
    while time.monotonic() < deadline:
        rows = json.loads(ctx.flower.get("/api/tasks"))
        members = {t["args"]: t for t in rows.values() if t["name"] == "mailtls.batch_member"
                   and t.get("state") in ("SUCCESS", "FAILURE")}
        if all(f"{target} · {i}" in members for i, target in wanted.items()):
            break
        time.sleep(0.5)
    states = {target: members[f"{target} · {i}"]["state"] for i, target in wanted.items()}
    assert states == {"fleet-a/smtp": "SUCCESS", "fleet-a/imap": "SUCCESS", "fleet-a/www": "FAILURE"}
    assert "'outcome': 'deployed'" in (members[f"fleet-a/smtp · {handles[0].deploy_id}"].get("result") or "")
    root = next(t for t in rows.values() if t["name"] == "mailtls.batch" and next(iter(batch_ids)) in t["args"])
    info = json.loads(ctx.flower.get(f"/api/task/info/{members[f'fleet-a/imap · {handles[1].deploy_id}']['uuid']}"))
    assert info["root_id"] == root["uuid"]


def test_a_rollout_of_several_certificates_sends_one_batch_per_host_and_wave(ctx: Ctx, tmp_path: Path) -> None:
    """`rollout --batch`: a mail certificate for every host's smtp, a web one for
    fleet-a's www; one wave, so fleet-a's two go as one batch. (The targets by address:
    the session's Redis also holds other modules' hosts with an `smtp`, whose workers
    have stopped, and a bare `smtp` would rightly refuse to leave them out.)"""
    mail, www = ctx.leaf(), ctx.leaf("www.fleet.test")
    for name, leaf in (("mail", mail), ("www", www)):
        (tmp_path / f"{name}.pem").write_bytes(leaf.fullchain_pem)
        (tmp_path / f"{name}.key").write_bytes(leaf.key_pem)
    entries = [(f"{h}/smtp", "mail") for h in HOSTS] + [("fleet-a/www", "www")]
    (tmp_path / "batch.toml").write_text("".join(f'[[deploy]]\ntarget = "{t}"\ncert = "{n}.pem"\nkey = "{n}.key"\n'
                                                 for t, n in entries))
    reloads = ctx.fleet.hosts["fleet-a"].pf_reload.calls

    r = ctx.cli("rollout", "--batch", str(tmp_path / "batch.toml"), "--waves", "100%", "--json")

    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    assert res["state"] == "done" and res["waves"] == [["fleet-a/smtp", "fleet-a/www", "fleet-b/smtp",
                                                        "fleet-c/smtp"]]
    runs = res["targets"]
    assert {a: t["outcome"] for a, t in runs.items()} == dict.fromkeys(runs, "deployed")
    assert runs["fleet-a/www"]["fingerprint"] == www.fingerprint
    assert all(runs[f"{h}/smtp"]["fingerprint"] == mail.fingerprint for h in HOSTS)
    assert all(ctx.served(h, "smtp") == mail.fingerprint for h in HOSTS)
    a_batch = {ctx.co.get_record(runs[f"fleet-a/{t}"]["deploy_id"])["batch_id"] for t in ("smtp", "www")}  # type: ignore[index]
    assert len(a_batch) == 1 and None not in a_batch
    assert ctx.co.get_record(runs["fleet-b/smtp"]["deploy_id"])["batch_id"] is None  # type: ignore[index]
    assert ctx.fleet.hosts["fleet-a"].pf_reload.calls == reloads + 1  # www's reload is /bin/true: not counted
    assert ctx.cli("rollout-status", res["rollout_id"]).returncode == 0


def test_a_target_two_certificates_would_go_to_is_refused_before_anything_is_sent(ctx: Ctx) -> None:
    one, two = ctx.leaf("www.fleet.test"), ctx.leaf("www.fleet.test")
    before = ctx.fleet.hosts["fleet-a"].path("www", "cert").read_bytes()
    with pytest.raises(RolloutError, match=r"fleet-a/www is chosen by two certificates"):
        rollout_many([Certificate("fleet-a/www", one.fullchain_pem, one.key_pem),
                      Certificate(None, two.fullchain_pem, two.key_pem)], broker_url=ctx.redis.url)
    with pytest.raises(RolloutError, match=r"certificate 1: no host has registered a target 'nowhere'"):
        rollout_many([Certificate("nowhere", one.fullchain_pem, one.key_pem)], broker_url=ctx.redis.url)
    with pytest.raises(Rejected, match=r"certificates for fleet-a/www more than once"):
        deploy_many([Certificate("fleet-a/www", one.fullchain_pem, one.key_pem),
                     Certificate("fleet-a/www", two.fullchain_pem, two.key_pem)], broker_url=ctx.redis.url)
    assert ctx.fleet.hosts["fleet-a"].path("www", "cert").read_bytes() == before


def test_certbot_spool_rolls_every_renewed_lineage_out_together(ctx: Ctx, tmp_path: Path) -> None:
    """certbot's hooks on the pipeline's machine (no targets file there): `--spool
    --distributed` from --deploy-hook, once per lineage, as certbot calls it (the
    RENEWED_* variables); `--deploy-spool --distributed` from --post-hook: one rollout,
    each lineage to every target whose names it covers, one batch per host."""
    mail, www, lonely = ctx.leaf(), ctx.leaf("www.fleet.test"), ctx.leaf("lonely.fleet.test")
    spool = tmp_path / "spool"
    env = {k: v for k, v in os.environ.items() if k != "MAILTLS_CONFIG"}
    for name, leaf, domains in (("mail", mail, MAIL_NAME), ("www", www, "www.fleet.test"),
                                ("lonely", lonely, "lonely.fleet.test")):  # no target serves that one
        live = tmp_path / "live" / name
        live.mkdir(parents=True)
        (live / "fullchain.pem").write_bytes(leaf.fullchain_pem)
        (live / "privkey.pem").write_bytes(leaf.key_pem)
        r = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "certbot-hook", "--spool", "--distributed",
                            "--spool-dir", str(spool)], capture_output=True, text=True, cwd=REPO, timeout=60,
                           env={**env, "RENEWED_LINEAGE": str(live), "RENEWED_DOMAINS": domains})
        assert r.returncode == 0 and "spooled" in r.stdout, r.stdout + r.stderr
    assert sorted(p.name for p in spool.iterdir()) == ["lonely.json", "mail.json", "www.json"]
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in spool.iterdir())
    reloads = {h: (ctx.fleet.hosts[h].pf_reload.calls, ctx.fleet.hosts[h].dv_reload.calls) for h in HOSTS}

    r = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "certbot-hook", "--deploy-spool", "--distributed",
                        "--spool-dir", str(spool), "--waves", "100%", "--broker", ctx.redis.url],
                       capture_output=True, text=True, cwd=REPO, timeout=180, env=env)

    assert r.returncode == 0, r.stdout + r.stderr
    assert "mailtls: lineage with no target: leaf " in r.stdout and "lonely.fleet.test" in r.stdout, r.stdout
    for h in HOSTS:
        for t in ("smtp", "imap", "www"):
            assert f"mailtls: {h}/{t}: deployed" in r.stdout, r.stdout
        assert ctx.served(h, "smtp") == ctx.served(h, "imap") == mail.fingerprint
        assert ctx.fleet.hosts[h].path("www", "cert").read_bytes() == www.fullchain_pem
        pf, dv = ctx.fleet.hosts[h].pf_reload.calls, ctx.fleet.hosts[h].dv_reload.calls
        assert (pf - reloads[h][0], dv - reloads[h][1]) == (1, 1), h  # one batch per host: one reload per daemon
    assert list(spool.iterdir()) == []


def test_deploy_batch_through_the_workers_prints_a_result_per_certificate(ctx: Ctx, tmp_path: Path) -> None:
    imap, www = ctx.leaf(), ctx.leaf("www.fleet.test")
    for name, leaf in (("imap", imap), ("www", www)):
        d = tmp_path / "batch" / name  # certbot's live/ layout, one directory per target
        d.mkdir(parents=True)
        (d / "cert.pem").write_bytes(leaf.cert_pem)
        (d / "chain.pem").write_bytes(leaf.chain_pem)
        (d / "privkey.pem").write_bytes(leaf.key_pem)
    before = ctx.served("fleet-b", "imap")
    r = ctx.cli("deploy", "--batch", str(tmp_path / "batch"), "--json")
    error = json.loads(r.stdout)["error"]  # (other modules' hosts may define an imap too)
    assert r.returncode == 2 and "target 'imap' is defined on" in error and "fleet-b/imap" in error, error
    assert ctx.served("fleet-b", "imap") == before  # refused before anything was sent
    for name in ("imap", "www"):
        (tmp_path / "batch" / name).rename(tmp_path / "batch" / f"x-{name}")
    (tmp_path / "m.toml").write_text("".join(
        f'[[deploy]]\ntarget = "fleet-b/{n}"\ncert = "batch/x-{n}/cert.pem"\nkey = "batch/x-{n}/privkey.pem"\n'
        f'chain = "batch/x-{n}/chain.pem"\n' for n in ("imap", "www")))

    r = ctx.cli("deploy", "--batch", str(tmp_path / "m.toml"), "--json")

    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert [(x["target"], x["outcome"]) for x in out] == [("fleet-b/imap", "deployed"), ("fleet-b/www", "deployed")]
    assert len({x["deploy_id"] for x in out}) == 2
    assert ctx.served("fleet-b", "imap") == imap.fingerprint
    assert ctx.fleet.hosts["fleet-b"].path("www", "cert").read_bytes() == www.fullchain_pem


def test_a_rollout_by_names_halts_on_a_host_without_a_live_worker(ctx: Ctx) -> None:
    """fleet-a's worker stopped: `rollout --covers` used to drop its targets silently
    (done, exit 0) and leave it the old certificate. It halts before sending anything,
    naming them; --skip-unreachable goes on and lists them; a host the registry has
    lost (forgotten, or Redis emptied) but the pipeline keys pin is named too."""
    a = ctx.fleet.hosts["fleet-a"]
    leaf = ctx.leaf()
    (ctx.fleet.root / "u.pem").write_bytes(leaf.fullchain_pem)
    (ctx.fleet.root / "u.key").write_bytes(leaf.key_pem)
    files = ["--cert", str(ctx.fleet.root / "u.pem"), "--key", str(ctx.fleet.root / "u.key")]
    before = {h: (ctx.served(h, "smtp"), ctx.served(h, "imap")) for h in HOSTS}
    assert a.worker is not None
    a.worker.stop()
    try:
        assert not ctx.co.host_alive("fleet-a")
        r = ctx.cli("rollout", *files, "--covers", MAIL_NAME, "--waves", "100%")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "nothing sent" in r.stderr and "fleet-a/imap (no live worker on host fleet-a)" in r.stderr
        assert "fleet-a/smtp" in r.stderr and "--skip-unreachable" in r.stderr
        assert {h: (ctx.served(h, "smtp"), ctx.served(h, "imap")) for h in HOSTS} == before
        r = ctx.cli("rollout", *files, "--label", "imap", "--waves", "100%")
        assert r.returncode == 1 and "fleet-a/imap (no live worker on host fleet-a)" in r.stderr, r.stderr

        r = ctx.cli("rollout", *files, "--covers", MAIL_NAME, "--waves", "100%", "--skip-unreachable", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        res = json.loads(r.stdout)
        assert sorted(res["unreachable"]) == ["fleet-a/imap", "fleet-a/smtp"]
        assert {t: run["outcome"] for t, run in res["targets"].items()} == {
            f"{h}/{n}": "deployed" for h in ("fleet-b", "fleet-c") for n in ("imap", "smtp")}
        assert (ctx.served("fleet-a", "smtp"), ctx.served("fleet-a", "imap")) == before["fleet-a"]
        assert ctx.served("fleet-b", "smtp") == leaf.fingerprint
        status = ctx.cli("rollout-status", res["rollout_id"])
        assert status.returncode == 0 and "2 unreachable, skipped" in status.stdout
        deadline = time.monotonic() + 20  # and in Flower, a row each
        while True:
            rows = [t for t in json.loads(ctx.flower.get("/api/tasks")).values()
                    if t["name"] == "mailtls.rollout.skipped" and res["rollout_id"] in (t.get("args") or "")]
            if len(rows) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert sorted(r["args"].split(" · ")[0] for r in rows) == ["fleet-a/imap", "fleet-a/smtp"], rows
        assert all(r["state"] == "FAILURE" and "skipped, unreachable: no live worker on host fleet-a" in
                   (r.get("exception") or "") for r in rows), rows
        assert "fleet-a/smtp" in status.stdout and "unreachable: no live worker on host fleet-a" in status.stdout

        assert ctx.cli("forget", "fleet-a").returncode == 0  # the registry no longer knows fleet-a
        r = ctx.cli("rollout", *files, "--covers", MAIL_NAME, "--waves", "100%")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "fleet-a/* (host fleet-a is in" in r.stderr and "has registered no target" in r.stderr
    finally:
        a.start_worker(ctx.redis.url)
    deadline = time.monotonic() + 30
    while not any(e["host"] == "fleet-a" for e in ctx.co.fleet()) and time.monotonic() < deadline:
        time.sleep(0.2)
    r = ctx.cli("rollout", *files, "--covers", MAIL_NAME, "--waves", "100%", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    assert res["unreachable"] == {} and res["targets"]["fleet-a/smtp"]["outcome"] == "deployed"
    assert res["targets"]["fleet-b/smtp"]["outcome"] == "unchanged"


def test_check_mode_through_the_workers_says_what_would_change_and_changes_nothing(ctx: Ctx, tmp_path: Path) -> None:
    """`deploy --check`, `rollout --check` and `certbot-hook --check --distributed`: each
    target's worker runs a deploy's checks on copies and reports; no file, reload,
    record or history entry anywhere."""
    leaf, www = ctx.leaf(), ctx.leaf("www.fleet.test")
    for name, issued in (("c", leaf), ("w", www)):
        (tmp_path / f"{name}.pem").write_bytes(issued.fullchain_pem)
        (tmp_path / f"{name}.key").write_bytes(issued.key_pem)
    files = ["--cert", str(tmp_path / "c.pem"), "--key", str(tmp_path / "c.key")]
    hosts = ctx.fleet.hosts
    served_before = {h: (ctx.served(h, "smtp"), ctx.served(h, "imap")) for h in HOSTS}
    disk_before = {h: hosts[h].path("postfix", "key").read_bytes() for h in HOSTS}
    reloads = {h: (hosts[h].pf_reload.calls, hosts[h].dv_reload.calls) for h in HOSTS}
    history = {h: ctx.co.history(f"{h}/smtp", 100) for h in HOSTS}

    r = ctx.cli("deploy", "fleet-a/smtp", "--check", "--json", *files)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["outcome"] == "would_deploy" and report["target"] == "fleet-a/smtp"
    assert report["slots"][0]["fingerprint"] == leaf.fingerprint
    assert report["slots"][0]["previous_fingerprint"] == served_before["fleet-a"][0]
    assert {li["serves_now"] for li in report["listeners"]} == {served_before["fleet-a"][0]}
    assert {li["would_serve"] for li in report["listeners"]} == {leaf.fingerprint}

    r = ctx.cli("rollout", "--check", "--covers", MAIL_NAME, "--json", *files)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted((x["target"], x["outcome"]) for x in json.loads(r.stdout)) == [
        (f"{h}/{n}", "would_deploy") for h in HOSTS for n in ("imap", "smtp")]

    r = ctx.cli("deploy", "fleet-b/smtp", "--check", "--json", "--cert", str(tmp_path / "w.pem"), "--key",
                str(tmp_path / "w.key"))
    assert r.returncode == 2 and f"does not cover {MAIL_NAME}" in json.loads(r.stdout)["error"], r.stdout

    lineage = tmp_path / "live" / MAIL_NAME
    lineage.mkdir(parents=True)
    (lineage / "fullchain.pem").write_bytes(leaf.fullchain_pem)
    (lineage / "privkey.pem").write_bytes(leaf.key_pem)
    hook = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "certbot-hook", "--check", "--distributed",
                           "--broker", ctx.redis.url], capture_output=True, text=True, cwd=REPO, timeout=180,
                          env={**os.environ, "RENEWED_LINEAGE": str(lineage), "RENEWED_DOMAINS": MAIL_NAME})
    assert hook.returncode == 0, hook.stdout + hook.stderr
    assert hook.stdout.count("WOULD_DEPLOY") == 2 * len(HOSTS), hook.stdout

    assert {h: (ctx.served(h, "smtp"), ctx.served(h, "imap")) for h in HOSTS} == served_before
    assert {h: hosts[h].path("postfix", "key").read_bytes() for h in HOSTS} == disk_before
    assert {h: (hosts[h].pf_reload.calls, hosts[h].dv_reload.calls) for h in HOSTS} == reloads
    assert {h: ctx.co.history(f"{h}/smtp", 100) for h in HOSTS} == history
    assert not ctx.co.r.keys("mailtls:envelope:*")  # each check's envelope dropped as it was read

"""Batches on real daemons: many renewals to one Postfix (one lmdb SNI table) and one
Dovecot (local_name blocks) as one deploy: one build of the table, one run of each
validate_command, one reload per daemon, a verify per name, an outcome per member.

Each test has a host of its own (the members' files and the table move).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailtls_tasks.core.batch import Member, run_batch
from mailtls_tasks.core.config import load_config
from mailtls_tasks.core.journal import Journal
from mailtls_tasks.core.material import fingerprint, leaf_of_file
from tests.e2e.test_sni import DEFAULT_NAME, SniHost, s_client
from tests.support.acme import Certbot, Pebble
from tests.support.keys import Pipeline
from tests.support.pki import PKI, Issued
from tests.support.services import REPO, RedisServer, Worker, require
from tests.support.tlsserver import TLSServer

pytestmark = pytest.mark.e2e


@pytest.fixture
def sni_host(tmp_path: Path, pki: PKI) -> Iterator[SniHost]:
    h = SniHost(tmp_path, pki, "lmdb")
    try:
        yield h
    finally:
        h.stop()


def member(target: str, leaf: Issued) -> Member:
    return Member(target, leaf.fullchain_pem, leaf.key_pem)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def calls(h: SniHost) -> dict[str, int]:
    return {w.name: w.calls for w in (h.pf_reload, h.pf_check, h.dv_reload, h.dv_check)}


def test_a_batch_checks_once_builds_once_reloads_once_and_ends_each_member_on_its_own(sni_host: SniHost,
                                                                                      pki: PKI) -> None:
    h = sni_host
    new = {"pf-a": pki.leaf("a.example.test"),
           "pf-b": pki.leaf("b.example.test", sans=["b.example.test", "*.b.example.test"]),
           "pf-c": pki.leaf("c.example.test"),
           "dv-a": pki.leaf("a.example.test"), "dv-c": pki.leaf("c.example.test")}
    wrong = pki.leaf("someone-else.example.test")  # pf-default must serve mx.example.test: rejected alone
    before = calls(h)
    default_before = h.smtp(None)

    results = run_batch(load_config(str(h.config)), [member(t, leaf) for t, leaf in new.items()]
                        + [member("pf-default", wrong)])

    by_target = {r.target.split("/")[1]: r for r in results}
    assert {t: r.outcome for t, r in by_target.items()} == {**dict.fromkeys(new, "deployed"),
                                                             "pf-default": "rejected"}
    assert "mx.example.test" in (by_target["pf-default"].error or "")
    assert len({r.deploy_id for r in results}) == 1
    after = calls(h)
    assert {k: after[k] - before[k] for k in after} == {"postfix-reload": 1, "postfix-check": 1,
                                                        "dovecot-reload": 1, "dovecot-check": 1}
    assert h.smtp("a.example.test") == h.smtps("a.example.test") == new["pf-a"].fingerprint
    assert h.smtp("b.example.test") == h.smtp("deep.b.example.test") == new["pf-b"].fingerprint
    assert h.smtp("c.example.test") == new["pf-c"].fingerprint
    assert h.smtp(None) == h.smtp(DEFAULT_NAME) == default_before
    imaps = h.dovecot.ports["imaps"]
    assert s_client(imaps, None, "a.example.test") == new["dv-a"].fingerprint
    assert s_client(imaps, None, "c.example.test") == new["dv-c"].fingerprint
    # each certificate its own record (its row in status and history); the table owned by one
    j = Journal(str(h.root / "state"))
    recs = {t: j.load(t, results[0].deploy_id) for t in [*new, "pf-default"]}
    assert all(r is not None and r.batch == sorted([*new, "pf-default"]) for r in recs.values())
    carrying = [t for t, r in recs.items() if r and any(e.role == "sni_map" for e in r.files)]
    assert carrying == ["pf-a"]
    assert j.owners() == [] and j.decision(results[0].deploy_id) == {**dict.fromkeys(new, "deployed")}
    assert sorted(p.name for p in h.source.parent.iterdir()) == ["sni", "sni.lmdb"]


def _with_extra_endpoint(h: SniHost, target: str, endpoint: str) -> Path:
    """The targets file, ``target`` also verified on ``endpoint`` (a listener that never
    reloads: its verify of a new certificate fails)."""
    raw: dict[str, Any] = tomllib.loads(h.config.read_text())
    raw["targets"][target]["post_deploy_verify"]["endpoints"].append({"endpoint": endpoint, "protocol": "tls"})
    raw["targets"][target]["post_deploy_verify"]["timeout"] = "3s"
    out = h.root / "targets-extra.json"
    out.write_text(json.dumps(raw))
    return out


def test_a_name_that_fails_verify_is_rolled_back_alone_while_the_others_stay(sni_host: SniHost, pki: PKI) -> None:
    h = sni_host
    c_dir = h.root / "certs" / "c"
    c_files = {p: p.read_bytes() for p in c_dir.iterdir()}
    stuck = TLSServer(c_dir / "fullchain.pem", c_dir / "key.pem", "tls")  # serves c's old pair, never reloads
    try:
        cfg = load_config(str(_with_extra_endpoint(h, "pf-c", stuck.endpoint)))
        new_a, new_c = pki.leaf("a.example.test"), pki.leaf("c.example.test")
        before = calls(h)
        results = run_batch(cfg, [member("pf-a", new_a), member("pf-c", new_c)])
    finally:
        stuck.close()
    outcomes = {r.target.split("/")[1]: r.outcome for r in results}
    assert outcomes == {"pf-a": "deployed", "pf-c": "rolled_back"}, results
    assert h.smtp("a.example.test") == new_a.fingerprint
    assert h.smtp("c.example.test") == h.current["c"].fingerprint  # its entry built again from its old files
    assert {p: p.read_bytes() for p in c_dir.iterdir()} == c_files
    value = h.table_value("c.example.test")
    assert h.current["c"].cert_pem.strip() in value and new_c.cert_pem.strip() not in value
    assert calls(h)["postfix-reload"] - before["postfix-reload"] == 2  # the batch's, and one for c alone
    assert sorted(p.name for p in h.source.parent.iterdir()) == ["sni", "sni.lmdb"]


def test_when_rolling_back_alone_fails_every_member_rolls_back_and_the_table_is_restored(sni_host: SniHost,
                                                                                        pki: PKI) -> None:
    h = sni_host
    c_dir = h.root / "certs" / "c"
    watched = [h.compiled, *(h.root / "certs" / n / f for n in ("a", "c") for f in ("key.pem", "fullchain.pem"))]
    assert h.compiled
    before = {p: sha(p) for p in watched if p}
    stuck = TLSServer(c_dir / "fullchain.pem", c_dir / "key.pem", "tls")
    # the second reload (c's alone) fails: the whole batch then goes back
    counter = h.root / "reloads"
    script = h.root / "bin" / "reload-fails-second"
    script.write_text(f"#!/bin/sh\nn=$(( $(cat {counter} 2>/dev/null || echo 0) + 1 ))\necho $n > {counter}\n"
                      f"[ $n -eq 2 ] && exit 1\nexec {h.postfix.command('reload')}\n")
    os.chmod(script, 0o755)
    try:
        path = _with_extra_endpoint(h, "pf-c", stuck.endpoint)
        raw = json.loads(path.read_text())
        for name in ("pf-a", "pf-c"):
            raw["targets"][name]["reload_command"] = str(script)
        path.write_text(json.dumps(raw))
        results = run_batch(load_config(str(path)), [member("pf-a", pki.leaf("a.example.test")),
                                                     member("pf-c", pki.leaf("c.example.test"))])
    finally:
        stuck.close()
    assert {r.target.split("/")[1]: r.outcome for r in results} == {"pf-a": "rolled_back", "pf-c": "rolled_back"}
    assert {p: sha(p) for p in before} == before  # the table byte-exact, every file as it was
    assert h.smtp("a.example.test") == h.current["a"].fingerprint
    assert h.smtp("c.example.test") == h.current["c"].fingerprint
    assert int(counter.read_text()) >= 3


def test_the_cli_deploys_a_live_directory_as_one_batch(sni_host: SniHost, pki: PKI) -> None:
    """`mailtls deploy --local --batch DIR`: a subdirectory per target in certbot's live/
    layout; one line of JSON per member; the exit code is the worst member's."""
    h = sni_host
    batch = h.root / "batch"
    new = {"pf-a": pki.leaf("a.example.test"), "pf-c": pki.leaf("c.example.test")}
    for target, leaf in new.items():
        d = batch / target
        d.mkdir(parents=True)
        (d / "cert.pem").write_bytes(leaf.cert_pem)
        (d / "chain.pem").write_bytes(leaf.chain_pem)
        (d / "privkey.pem").write_bytes(leaf.key_pem)
    (batch / "dv-c").mkdir()  # a lineage missing its key: the batch names what is wrong, touches nothing
    (batch / "dv-c" / "fullchain.pem").write_bytes(new["pf-c"].fullchain_pem)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bad = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "deploy", "--local", "--batch", str(batch),
                          "--config", str(h.config)], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "dv-c: key: cannot read" in bad.stderr, bad.stdout + bad.stderr
    assert h.smtp("a.example.test") == h.current["a"].fingerprint
    (batch / "dv-c" / "fullchain.pem").unlink()
    (batch / "dv-c").rmdir()

    res = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "deploy", "--local", "--batch", str(batch),
                          "--config", str(h.config), "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout)
    assert [(r["target"], r["outcome"]) for r in out] == [("sni-host/pf-a", "deployed"), ("sni-host/pf-c", "deployed")]
    assert h.smtp("a.example.test") == new["pf-a"].fingerprint and h.smtp("c.example.test") == new["pf-c"].fingerprint


def test_certbot_spools_each_renewed_lineage_and_its_post_hook_deploys_them_as_one_batch(tmp_path: Path,
                                                                                        pki: PKI) -> None:
    require("certbot")
    pebble = Pebble(tmp_path / "pebble", pki)
    h = SniHost(tmp_path / "mx", pki, "lmdb")
    try:
        raw: dict[str, Any] = tomllib.loads(h.config.read_text())
        for t in raw["targets"].values():
            t.pop("trust_anchors")  # pebble's own CA issues these
        config = h.root / "targets.json"
        config.write_text(json.dumps(raw))
        certbot = Certbot(tmp_path / "certbot", pebble)
        env = {"PYTHONPATH": str(REPO)}
        for name in ("a.example.test", "c.example.test"):
            issued = certbot.run("certonly", "--standalone", "--http-01-port", str(certbot.http_port), "-d", name,
                                 env=env)
            assert issued.returncode == 0, issued.stdout + issued.stderr + certbot.log()[-3000:]
        hook = f"{shlex.quote(sys.executable)} -m mailtls_tasks.cli certbot-hook --config {shlex.quote(str(config))}"
        before = calls(h)
        renewed = certbot.run("renew", "--force-renewal", "--deploy-hook", f"{hook} --spool",
                              "--post-hook", f"{hook} --deploy-spool", env=env)
        assert renewed.returncode == 0, renewed.stdout + renewed.stderr
        log = certbot.log()
        served = {}
        for name in ("a.example.test", "c.example.test"):
            leaf = leaf_of_file((certbot.live(name) / "cert.pem").read_bytes())
            assert leaf is not None
            served[name] = fingerprint(leaf)
            assert h.smtp(name) == s_client(h.dovecot.ports["imaps"], None, name) == served[name], log[-3000:]
        after = calls(h)
        assert after["postfix-reload"] - before["postfix-reload"] == 1, log[-3000:]
        assert after["dovecot-reload"] - before["dovecot-reload"] == 1
        for target in ("pf-a", "pf-c", "dv-a", "dv-c"):
            assert f"mailtls: sni-host/{target}: deployed" in log
        assert not list((h.root / "state" / "certbot-spool").iterdir())
    finally:
        h.stop()
        pebble.stop()


def test_a_validate_command_that_fails_rejects_its_members_and_the_others_go_on(sni_host: SniHost,
                                                                               pki: PKI) -> None:
    """Each validate_command starts as the batch begins (it runs while the members
    stage) and its verdict is the one validate acts on. Postfix's failing rejects every
    member naming it, and so every member of the table (built with all their files):
    their files and the table stay byte-exact, Postfix is not reloaded. The Dovecot
    member, whose own check passed, is deployed."""
    h = sni_host
    watched = [h.compiled, h.source,
               *(h.root / "certs" / n / f for n in ("a", "c") for f in ("key.pem", "fullchain.pem"))]
    before = {p: sha(p) for p in watched}
    served = {n: h.smtp(n) for n in ("a.example.test", "c.example.test")}
    calls_before = calls(h)
    new_dv = pki.leaf("a.example.test")
    h.pf_check.fail_once()

    results = run_batch(load_config(str(h.config)), [member("pf-a", pki.leaf("a.example.test")),
                                                     member("pf-c", pki.leaf("c.example.test")),
                                                     member("dv-a", new_dv)])

    outcomes = {r.target.split("/")[1]: r.outcome for r in results}
    assert outcomes == {"pf-a": "rejected", "pf-c": "rejected", "dv-a": "deployed"}, results
    assert all("validate_command failed" in (r.error or "") for r in results[:2]), results
    after = calls(h)
    assert after["postfix-check"] - calls_before["postfix-check"] == 1  # the early run's verdict, not a second run
    assert after["postfix-reload"] == calls_before["postfix-reload"]
    assert after["dovecot-reload"] - calls_before["dovecot-reload"] == 1
    assert {p: sha(p) for p in watched} == before
    assert {n: h.smtp(n) for n in served} == served
    assert s_client(h.dovecot.ports["imaps"], None, "a.example.test") == new_dv.fingerprint
    j = Journal(str(h.root / "state"))
    assert j.owners() == [] and j.decision(results[0].deploy_id) == {"dv-a": "deployed"}
    assert sorted(p.name for p in h.source.parent.iterdir()) == ["sni", "sni.lmdb"]


def test_a_member_rejected_by_its_table_check_takes_its_table_mates_alone(sni_host: SniHost, pki: PKI) -> None:
    """The carrier's table check refuses a table whose other names would change (the
    live table older than a file it names): every member of that table is rejected,
    the Dovecot member goes on."""
    h = sni_host
    b_key = h.root / "certs" / "b" / "key.pem"
    b_key_bytes = b_key.read_bytes()
    stale = pki.leaf("b.example.test", sans=["b.example.test", "*.b.example.test"])
    (h.root / "certs" / "b" / "fullchain.pem").write_bytes(stale.fullchain_pem)  # behind the table's back
    b_key.write_bytes(stale.key_pem)
    table_before = sha(h.compiled)
    new_dv = pki.leaf("c.example.test")
    try:
        results = run_batch(load_config(str(h.config)), [member("pf-a", pki.leaf("a.example.test")),
                                                         member("pf-c", pki.leaf("c.example.test")),
                                                         member("dv-c", new_dv)])
    finally:
        b_key.write_bytes(b_key_bytes)
    outcomes = {r.target.split("/")[1]: r.outcome for r in results}
    assert outcomes == {"pf-a": "rejected", "pf-c": "rejected", "dv-c": "deployed"}, results
    assert "would change what" in (results[0].error or ""), results
    assert "rejected with pf-a" in (results[1].error or ""), results
    assert sha(h.compiled) == table_before
    assert s_client(h.dovecot.ports["imaps"], None, "c.example.test") == new_dv.fingerprint
    assert sorted(p.name for p in h.source.parent.iterdir()) == ["sni", "sni.lmdb"]


def test_a_batch_through_the_worker_builds_the_table_once_with_every_member(sni_host: SniHost, pki: PKI,
                                                                            redis_server: RedisServer,
                                                                            pipeline: Pipeline) -> None:
    """``deploy_many`` to an SNI host: each certificate its own deploy id, the batch one
    build of the table whose check counts every member's names as the batch's own (it
    once looked the members up under the carrier's deploy id, found none, took their
    names for others' and rejected the lot: found by bench-sni), one reload per daemon."""
    from mailtls_tasks.distributed.workflow import Certificate, deploy_many

    h = sni_host
    raw: dict[str, Any] = tomllib.loads(h.config.read_text())
    raw["security"] = pipeline.enroll("sni-host", h.root / "keys")
    config = h.root / "targets-worker.json"
    config.write_text(json.dumps(raw))
    new = {"pf-a": pki.leaf("a.example.test"), "pf-c": pki.leaf("c.example.test"),
           "dv-a": pki.leaf("a.example.test")}
    default_before = h.smtp(None)
    worker = Worker(config, redis_server.url, h.root / "worker.log")
    try:
        before = calls(h)
        handles = deploy_many([Certificate(f"sni-host/{t}", leaf.fullchain_pem, leaf.key_pem)
                               for t, leaf in new.items()], broker_url=redis_server.url)
        results = {t: hd.get(timeout=90) for t, hd in zip(new, handles, strict=True)}
    finally:
        worker.stop()
    assert {t: r.outcome for t, r in results.items()} == dict.fromkeys(new, "deployed"), \
        {t: r.error for t, r in results.items()}
    assert len({r.deploy_id for r in results.values()}) == 3
    after = calls(h)
    assert {k: after[k] - before[k] for k in after} == {"postfix-reload": 1, "postfix-check": 1,
                                                        "dovecot-reload": 1, "dovecot-check": 1}
    assert h.smtp("a.example.test") == new["pf-a"].fingerprint and h.smtp("c.example.test") == new["pf-c"].fingerprint
    assert h.smtp(None) == default_before
    assert s_client(h.dovecot.ports["imaps"], None, "a.example.test") == new["dv-a"].fingerprint
    j = Journal(str(h.root / "state"))
    recs = {t: j.load(t, r.deploy_id) for t, r in results.items()}
    assert len({r.batch_id for r in recs.values() if r}) == 1
    assert [t for t, r in recs.items() if r and any(e.role == "sni_map" for e in r.files)] == ["pf-a"]

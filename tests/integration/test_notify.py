"""Notifications through Apprise, delivered for real: a local HTTP receiver for
``json://``, a private Postfix delivering ``mailto://`` into a mailbox file, a
receiver that is down (retried, the deploy untouched). URLs come from the host's
targets file (``[notify]``) or the pipeline file, never from a message."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailtls_tasks.distributed.workflow import deploy
from tests.support.daemons import Postfix
from tests.support.host import MailHost
from tests.support.keys import Pipeline
from tests.support.pki import PKI
from tests.support.receiver import Receiver
from tests.support.services import RedisServer, Worker, wait_port

pytestmark = pytest.mark.integration


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def _cli(host: MailHost, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", *args], capture_output=True, text=True,
                          cwd=host.root, timeout=120, env={**os.environ, "MAILTLS_CONFIG": str(host.config_path)})


def test_a_rejected_local_deploy_notifies_the_hosts_urls(host: MailHost, pki: PKI, receiver: Receiver) -> None:
    host.add_target("mx")
    host.install("mx", pki.leaf())
    host.settings["notify"] = {"rejected": [receiver.url], "rolled_back": [receiver.url]}
    host.write_config()
    leaf, wrong = pki.leaf(), pki.leaf()
    (host.root / "c.pem").write_bytes(leaf.fullchain_pem)
    (host.root / "k.pem").write_bytes(wrong.key_pem)

    p = _cli(host, "deploy", "mx", "--local", "--json", "--cert", "c.pem", "--key", "k.pem")

    assert p.returncode == 2, p.stdout + p.stderr
    res = json.loads(p.stdout)
    post = receiver.wait(1)[0]
    assert post["title"] == "mailtls: mx1/mx rejected"
    assert res["deploy_id"] in post["message"] and "does not match" in post["message"]
    assert "mailtls history mx1/mx --local" in post["message"]
    body = [ln for ln in wrong.key_pem.decode().splitlines() if "-----" not in ln]
    assert not any(line in json.dumps(post) for line in body)
    assert any("notified" in n and "json://" in n for n in res["notes"]), res["notes"]

    # a deploy that goes out notifies nobody
    (host.root / "k.pem").write_bytes(leaf.key_pem)
    assert _cli(host, "deploy", "mx", "--local", "--json", "--cert", "c.pem", "--key", "k.pem").returncode == 0
    time.sleep(1)
    assert len(receiver.posts) == 1


def test_a_receiver_that_is_down_leaves_the_local_deploy_as_it_is(host: MailHost, pki: PKI) -> None:
    down = Receiver()  # nothing listens on its port
    host.add_target("mx")
    host.install("mx", pki.leaf())
    host.settings["notify"] = {"rejected": [down.url], "retries": 2}
    host.write_config()
    before = host.snapshot()
    (host.root / "c.pem").write_bytes(pki.leaf().fullchain_pem)
    (host.root / "k.pem").write_bytes(pki.leaf().key_pem)
    t0 = time.monotonic()
    p = _cli(host, "deploy", "mx", "--local", "--json", "--cert", "c.pem", "--key", "k.pem")
    assert p.returncode == 2, p.stdout + p.stderr
    res = json.loads(p.stdout)
    assert res["outcome"] == "rejected" and "does not match" in res["error"]
    assert any("notification failed" in n and f"127.0.0.1:{down.port}" in n for n in res["notes"]), res["notes"]
    assert time.monotonic() - t0 < 30
    assert host.snapshot() == before


def test_a_bad_notify_url_is_refused_when_the_targets_file_is_read(host: MailHost) -> None:
    host.add_target("mx")
    host.settings["notify"] = {"failed": ["jsno://127.0.0.1/x"]}
    host.write_config()
    p = _cli(host, "check-config")
    assert p.returncode == 1, p.stderr
    assert "notify.failed: URL 1 (jsno://…) is not a notification URL Apprise knows" in p.stderr, p.stderr
    host.settings["notify"] = {"faild": ["json://127.0.0.1/x"]}
    host.write_config()
    p = _cli(host, "check-config")
    assert p.returncode == 1 and "did you mean 'failed'?" in p.stderr, p.stderr


def test_the_worker_notifies_a_rolled_back_deploy_and_retries_a_receiver_that_is_down(
        tmp_path: Path, redis_server: RedisServer, pki: PKI, pipeline: Pipeline) -> None:
    late = Receiver()  # down for the first tries
    host = MailHost(tmp_path / "notify-mx", host="notify-mx")
    host.enroll(pipeline)
    host.settings = {"deploy_lease": 4, "recovery_interval": 1, "notify": {"rolled_back": [late.url]}}
    host.add_target("mx")
    host.install("mx", pki.leaf())
    worker = Worker(host.config_path, redis_server.url, tmp_path / "worker.log")
    try:
        host.reload.fail_once()
        leaf = pki.leaf()
        res = deploy("notify-mx/mx", leaf.fullchain_pem, leaf.key_pem, broker_url=redis_server.url)
        out = res.get(timeout=60)
        assert out.outcome == "rolled_back", out
        worker.wait_log("mailtls.notify[", "Retry", timeout=30)  # the receiver is down: retried, with backoff
        late.start()
        post = late.wait(1, timeout=60)[0]
        assert post["title"].startswith("mailtls: notify-mx/mx rolled_back")
        assert out.deploy_id in post["message"] and f"mailtls status {out.deploy_id}" in post["message"]
        assert "reload_command failed" in post["message"]
        time.sleep(2)
        assert len(late.posts) == 1  # once, whoever published the ending
    finally:
        late.stop()
        worker.stop()
        host.close()


def test_mailto_through_a_private_postfix_into_a_mailbox(host: MailHost, pki: PKI, tmp_path: Path) -> None:
    """A real SMTP delivery: Apprise's mailto:// to a private Postfix on loopback, which
    delivers into a mailbox file (its virtual(8) agent)."""
    nobody = pwd.getpwnam("nobody")
    spool = tmp_path / "spool"
    spool.mkdir()
    os.chown(spool, nobody.pw_uid, nobody.pw_gid)
    sink_cert = tmp_path / "sink-cert.pem"
    sink_key = tmp_path / "sink-key.pem"
    leaf = pki.leaf("sink.mailtls.test")
    sink_cert.write_bytes(leaf.fullchain_pem)
    sink_key.write_bytes(leaf.key_pem)
    sink = Postfix(tmp_path / "sink", sink_cert, sink_key, extra_main=(
        "mynetworks = 127.0.0.0/8\nvirtual_mailbox_domains = notify.test\n"
        f"virtual_mailbox_base = {spool}\nvirtual_mailbox_maps = static:mailbox\n"
        f"virtual_uid_maps = static:{nobody.pw_uid}\nvirtual_gid_maps = static:{nobody.pw_gid}\n"
        "virtual_minimum_uid = 1\n"))
    sink.start()
    try:
        wait_port(sink.smtp_port, 10)
        host.add_target("mx")
        host.install("mx", pki.leaf())
        url = f"mailto://127.0.0.1:{sink.smtp_port}/ops@notify.test?from=mailtls@mx1.mailtls.test"
        host.settings["notify"] = {"rejected": [url]}
        host.write_config()
        (host.root / "c.pem").write_bytes(pki.leaf().fullchain_pem)
        (host.root / "k.pem").write_bytes(pki.leaf().key_pem)
        p = _cli(host, "deploy", "mx", "--local", "--json", "--cert", "c.pem", "--key", "k.pem")
        assert p.returncode == 2, p.stdout + p.stderr
        deploy_id = json.loads(p.stdout)["deploy_id"]
        mailbox = spool / "mailbox"
        deadline = time.monotonic() + 30
        while not (mailbox.exists() and deploy_id in mailbox.read_text(errors="replace")):
            assert time.monotonic() < deadline, sink.debug()[-3000:]
            time.sleep(0.2)
        mail = mailbox.read_text(errors="replace")
        assert "Subject: mailtls: mx1/mx rejected" in mail and "To: ops@notify.test" in mail
    finally:
        sink.stop()


def test_the_audit_announces_a_certificate_about_to_expire_once(tmp_path: Path, redis_server: RedisServer, pki: PKI,
                                                                pipeline: Pipeline, receiver: Receiver) -> None:
    """A leaf ending in 5 days, `expiring_days = 14`: the worker's audit (every 2 s here)
    sends one notice -- not one per audit."""
    host = MailHost(tmp_path / "expiry-mx", host="expiry-mx")
    host.enroll(pipeline)
    host.settings = {"deploy_lease": 4, "recovery_interval": 1, "audit_interval": 2,
                     "notify": {"expiring": [receiver.url], "expiring_days": 14}}
    host.add_target("mx")
    host.install("mx", pki.leaf(days=5))
    worker = Worker(host.config_path, redis_server.url, tmp_path / "worker.log")
    try:
        post = receiver.wait(1, timeout=60)[0]
        assert post["title"].startswith("mailtls: expiry-mx/mx expires in ") and post["type"] == "warning", post
        assert "mailtls audit --now" in post["message"]
        worker.wait_log("mailtls.audit[", timeout=30)
        time.sleep(6)  # three more audits
        assert len(receiver.posts) == 1
    finally:
        worker.stop()
        host.close()

"""/metrics of a real worker: scraped over HTTP and parsed as Prometheus does."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailtls_tasks.distributed.app import queue_for, use_broker
from mailtls_tasks.distributed.workflow import deploy
from tests.support.host import MailHost
from tests.support.keys import Pipeline
from tests.support.pki import PKI
from tests.support.services import RedisServer, Worker, free_port

pytestmark = pytest.mark.integration


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, labels[k]) in ls for k in labels))


def test_worker_metrics_scraped_and_parsed(tmp_path: Path, redis_server: RedisServer, pki: PKI,
                                          pipeline: Pipeline) -> None:
    port = free_port()
    host = MailHost(tmp_path / "mxm", host="mxm")
    host.enroll(pipeline)
    host.settings = {"metrics_port": port, "audit_interval": "1h"}
    host.add_target("m")
    host.install("m", pki.leaf())
    srv = host.server("m", "smtp")
    host.enable_verify("m", srv.endpoint, protocol="smtp", timeout=2)
    worker = Worker(host.config_path, redis_server.url, tmp_path / "worker.log")
    try:
        new = pki.leaf()
        assert deploy("mxm/m", new.fullchain_pem, new.key_pem, broker_url=redis_server.url).get(60).outcome == \
            "deployed"
        host.reload.fail_once()
        other = pki.leaf()
        assert deploy("mxm/m", other.fullchain_pem, other.key_pem, broker_url=redis_server.url).get(60).outcome == \
            "rolled_back"
        # rejected at stage (the key is another leaf's): its chain stops there, and the rollback
        # errback still runs and finds it ended -- counted once all the same
        assert deploy("mxm/m", other.fullchain_pem, new.key_pem, broker_url=redis_server.url).get(60).outcome == \
            "rejected"
        app = use_broker(redis_server.url)
        app.send_task("mailtls.audit", kwargs={"host": "mxm"}, queue=queue_for("mxm")).get(timeout=60)

        samples = _scrape(port)

        assert _value(samples, "mailtls_deploys_total", host="mxm", target="m", outcome="deployed") == 1
        assert _value(samples, "mailtls_deploys_total", host="mxm", target="m", outcome="rolled_back") == 1
        assert _value(samples, "mailtls_rollbacks_total", host="mxm", target="m") == 1
        assert _value(samples, "mailtls_deploys_total", host="mxm", target="m", outcome="rejected") == 1  # once
        # every outcome's series exists from the start, at 0, so increase() sees the first failure
        assert ("mailtls_deploys_total", (("host", "mxm"), ("outcome", "failed"), ("target", "m"))) in samples
        assert _value(samples, "mailtls_deploys_total", host="mxm", target="m", outcome="failed") == 0
        assert _value(samples, "mailtls_step_seconds_count", host="mxm", step="stage") == 3
        assert _value(samples, "mailtls_step_seconds_count", host="mxm", step="verify") == 1
        expiry = _value(samples, "mailtls_cert_expiry_seconds", host="mxm", target="m", listener=srv.endpoint)
        assert 29 * 86400 < expiry < 31 * 86400  # the test PKI's leaves live 30 days
        assert _value(samples, "mailtls_drift", host="mxm", target="m") == 0
        assert time.time() - _value(samples, "mailtls_audit_last_timestamp_seconds", host="mxm") < 60
        assert time.time() - _value(samples, "mailtls_worker_heartbeat_timestamp_seconds", host="mxm") < 60
        with pytest.raises(OSError):  # loopback only: 127.0.0.2 is loopback too, but not the bound address
            urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=2)
    finally:
        worker.stop()
        host.close()

from __future__ import annotations

import pytest

from mailtls_tasks.distributed.app import client_app, normalize_url, route_task
from mailtls_tasks.errors import ConfigError


def test_one_client_app_per_broker_url() -> None:
    """Regression: re-pointing one Celery app kept sending to the first broker."""
    a, b = client_app("redis://127.0.0.1:1/0"), client_app("redis://127.0.0.1:2/0")
    assert a is not b
    assert a.conf.broker_url.endswith(":1/0") and b.conf.broker_url.endswith(":2/0")
    assert client_app("redis://127.0.0.1:1/0") is a


def test_rediss_always_verifies() -> None:
    url = normalize_url("rediss://u:p@redis.internal:6380/0?ssl_ca_certs=/etc/mailtls/ca.pem")
    assert "ssl_cert_reqs=required" in url and "ssl_ca_certs=/etc/mailtls/ca.pem" in url
    for weak in ("none", "optional", "CERT_NONE"):
        with pytest.raises(ConfigError, match="cannot be off"):
            normalize_url(f"rediss://h:6380/0?ssl_cert_reqs={weak}")
    with pytest.raises(ConfigError, match="not supported"):
        normalize_url("amqp://guest@localhost//")
    assert normalize_url("redis://h:6379/0") == "redis://h:6379/0"


def test_router_sends_steps_and_errback_to_the_host_queue() -> None:
    for name in ("mailtls.stage", "mailtls.verify", "mailtls.rollback"):
        assert route_task(name, (), {"target": "t", "host": "mx1", "deploy_id": "d"}, {}) == {
            "queue": "mailtls.mx1", "routing_key": "mailtls.mx1"}
    assert route_task("other.task", (), {"host": "mx1"}, {}) is None

from __future__ import annotations

import re

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


SENTINEL = ("sentinel://mailtls:node%40pw@10.0.0.1:26379;sentinel://mailtls:node%40pw@10.0.0.2;"
            "sentinel://mailtls:node%40pw@10.0.0.3:26380/2?master_name=mx-redis&sentinel_password=s-pw")


def test_a_sentinel_url_names_every_sentinel_the_master_and_both_passwords() -> None:
    from mailtls_tasks.distributed.broker import sentinel_spec

    spec = sentinel_spec(SENTINEL)
    assert spec is not None
    assert spec.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380))
    assert (spec.master_name, spec.db, spec.username, spec.password) == ("mx-redis", 2, "mailtls", "node@pw")
    assert spec.sentinel_kwargs()["password"] == "s-pw" and "ssl" not in spec.sentinel_kwargs()
    assert spec.kombu_url().split(";")[1] == "sentinel://mailtls:node%40pw@10.0.0.2:26379/2"
    app = client_app(SENTINEL)  # kombu's sentinel transport and Celery's sentinel backend, both told the master
    assert app.conf.broker_transport_options["master_name"] == "mx-redis"
    assert app.conf.result_backend_transport_options["sentinel_kwargs"]["password"] == "s-pw"
    assert app.conf.broker_url.startswith("sentinel://") and "master_name" not in app.conf.broker_url
    assert normalize_url(SENTINEL) == SENTINEL and sentinel_spec("redis://127.0.0.1/0") is None


def test_sentinels_over_tls_verify_certificates() -> None:
    from mailtls_tasks.distributed.broker import sentinel_spec

    url = SENTINEL.replace("sentinel://", "sentinels://") + "&ssl_ca_certs=/etc/mailtls/redis-ca.pem"
    spec = sentinel_spec(url)
    assert spec is not None and dict(spec.tls) == {"ssl_cert_reqs": "required",
                                                   "ssl_ca_certs": "/etc/mailtls/redis-ca.pem"}
    assert spec.node_kwargs()["ssl"] is True and spec.sentinel_kwargs()["ssl_ca_certs"] == "/etc/mailtls/redis-ca.pem"
    import ssl

    app = client_app(url)
    assert app.conf.broker_use_ssl == app.conf.redis_backend_use_ssl == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/mailtls/redis-ca.pem"}


@pytest.mark.parametrize(("url", "why"), [
    ("sentinel://h1:26379;sentinel://h2:26379/0", "needs ?master_name"),
    ("sentinel://h1:26379/0?master_name=m", "at least two"),
    ("sentinel://h1;sentinels://h2/0?master_name=m", "every one sentinels://"),
    ("sentinel://h1;sentinel://h2/0?master_name=m&ssl_ca_certs=/x", "need sentinels://"),
    ("sentinels://h1;sentinels://h2/0?master_name=m&ssl_cert_reqs=none", "must be 'required'"),
    ("sentinel://h1;sentinel://h2/0?master_name=m&mastername=x", "unknown Sentinel options"),
    ("sentinel://h1;sentinel://h2/x?master_name=m", "not a database number"),
])
def test_a_bad_sentinel_url_is_refused_naming_what_is_wrong(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(why)):
        normalize_url(url)

"""Prometheus metrics of a worker, served on a loopback port (``metrics_port``, off by default).

A worker is a main process plus pool children, and a step runs in a child: metrics use
prometheus_client's multiprocess mode, each process writing its samples under
``state_dir/metrics`` and the main process serving their sum on ``/metrics``. The
directory is wiped at worker start (counters restart there, as Prometheus expects).

Exported (all labelled with ``host``):

* ``mailtls_deploys_total{target,outcome}`` -- deploys that ended, by outcome
* ``mailtls_rollbacks_total{target,outcome}`` -- compensations that ran
* ``mailtls_step_seconds{step}`` -- histogram of step durations
* ``mailtls_cert_expiry_seconds{target,listener}`` -- until the served (or on-disk) leaf's notAfter
* ``mailtls_drift{target}`` -- 1 when served, on-disk and last-deployed disagree
* ``mailtls_audit_last_timestamp_seconds`` -- when the last audit finished
* ``mailtls_worker_heartbeat_timestamp_seconds`` -- the worker's heartbeat
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from ..core import files

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

_m: dict[str, Any] = {}


def prepare(state_dir: str) -> str:
    """Before prometheus_client is imported and before the pool forks: a fresh directory
    for the processes' samples, named in the environment the children inherit."""
    d = os.path.join(state_dir, "metrics")
    if os.environ.get(MULTIPROC_ENV) == d:
        return d  # already prepared by this worker (run_worker, then worker_init)
    shutil.rmtree(d, ignore_errors=True)
    files.private_dirs(state_dir, d)
    os.environ[MULTIPROC_ENV] = d
    # prometheus_client picks its value store when first imported; if anything imported
    # it before this, pick again (metrics created from here on write to the directory).
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return d


def enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def _metrics() -> dict[str, Any]:
    if not _m:
        from prometheus_client import Counter, Gauge, Histogram

        _m["deploys"] = Counter("mailtls_deploys", "Deploys that ended, by outcome", ["host", "target", "outcome"])
        _m["rollbacks"] = Counter("mailtls_rollbacks", "Compensating rollbacks that ran, by how they ended",
                                  ["host", "target", "outcome"])
        _m["steps"] = Histogram("mailtls_step_seconds", "Duration of deploy steps", ["host", "step"],
                                buckets=STEP_BUCKETS)
        _m["expiry"] = Gauge("mailtls_cert_expiry_seconds", "Seconds until the served leaf's notAfter "
                             "(listener 'disk': the leaf on disk)", ["host", "target", "listener"],
                             multiprocess_mode="mostrecent")
        _m["drift"] = Gauge("mailtls_drift", "1 when served, on-disk and last-deployed leaves disagree",
                            ["host", "target"], multiprocess_mode="mostrecent")
        _m["audit"] = Gauge("mailtls_audit_last_timestamp_seconds", "When the last drift audit finished",
                            ["host"], multiprocess_mode="mostrecent")
        _m["heartbeat"] = Gauge("mailtls_worker_heartbeat_timestamp_seconds", "The worker's last heartbeat",
                                ["host"], multiprocess_mode="mostrecent")
    return _m


OUTCOMES = ("deployed", "unchanged", "rejected", "rolled_back", "failed")


def init_series(host: str, targets: list[str]) -> None:
    """Every (target, outcome) counter at 0 from the start: ``increase()`` cannot see a
    series' first increment, so without this the first failure after a restart would
    never fire an alert."""
    if not enabled():
        return
    m = _metrics()
    for target in targets:
        for outcome in OUTCOMES:
            m["deploys"].labels(host, target, outcome).inc(0)
        for outcome in ("rolled_back", "failed"):
            m["rollbacks"].labels(host, target, outcome).inc(0)


def deploy_ended(host: str, target: str, outcome: str, steps: dict[str, float], rolled_back: bool) -> None:
    if not enabled():
        return
    m = _metrics()
    m["deploys"].labels(host, target, outcome).inc()
    if rolled_back:
        m["rollbacks"].labels(host, target, outcome).inc()
    for step, seconds in steps.items():
        m["steps"].labels(host, step).observe(seconds)


def audited(host: str, target: str, expiry: dict[str, float], drift: bool) -> None:
    if not enabled():
        return
    m = _metrics()
    for listener, seconds in expiry.items():
        m["expiry"].labels(host, target, listener).set(seconds)
    m["drift"].labels(host, target).set(1 if drift else 0)
    m["audit"].labels(host).set(time.time())


def heartbeat(host: str) -> None:
    if enabled():
        _metrics()["heartbeat"].labels(host).set(time.time())


def child_exited(pid: int) -> None:
    if enabled():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def serve(port: int) -> None:
    """The HTTP endpoint, in the main process, on 127.0.0.1 only."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    start_http_server(port, addr="127.0.0.1", registry=registry)

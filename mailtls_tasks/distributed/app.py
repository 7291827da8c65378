"""The Celery application: broker/backend, reliability settings, routing, events.

Every setting here is a decision about failure:

* ``acks_late`` + prefetch 1: a message is acknowledged only after its step ran, and
  a worker never hoards deploys it might die holding;
* ``task_reject_on_worker_lost``: a pool child killed mid-step puts the message back
  (bounded: tasks count their redeliveries and give up into the rollback);
* ``visibility_timeout`` above every task time limit plus retry backoff, so Redis
  never hands a running step to another consumer; kombu only sweeps for unacked
  messages every ``unacked_restore_interval`` x ``unacked_restore_throttle`` seconds,
  set together with it. A *whole* worker killed is healed by its recovery on
  restart, long before redelivery (see ``worker.py``);
* events on (``-E`` and sent events) so Flower shows every step by name.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from ..core.config import STEP_SOFT_TIME_LIMIT, STEP_TIME_LIMIT
from .broker import BROKER_ENV, DEFAULT_BROKER, broker_url, normalize_url, notify_queue_for, queue_for, sentinel_spec

__all__ = ["BROKER_ENV", "DEFAULT_BROKER", "app", "broker_url", "client_app", "configure", "normalize_url",
           "queue_for", "route_task", "use_broker"]

TASK_TIME_LIMIT = int(STEP_TIME_LIMIT)          # hard limit of any step, seconds (config checks
TASK_SOFT_TIME_LIMIT = int(STEP_SOFT_TIME_LIMIT)  # that every target's timeouts fit inside)
MAX_RETRY_BACKOFF = 30
VISIBILITY_TIMEOUT = 2 * 3600  # > TASK_TIME_LIMIT + all retries' backoff


def route_task(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> dict[str, str] | None:
    """Send every mailtls step, and the rollback errback, to its host's queue.

    The host travels as a keyword argument on every signature (resolved from the
    fleet registry once, at enqueue), so it survives chaining and errbacks alike.
    """
    if name.startswith("mailtls.") and isinstance(kwargs, dict) and kwargs.get("host"):
        q = (notify_queue_for if name == "mailtls.notify" else queue_for)(str(kwargs["host"]))
        return {"queue": q, "routing_key": q}
    return None


def configure(app: Celery, url: str) -> None:
    """Point ``app`` at ``url``: a Redis (``redis://``, ``rediss://``) or a Redis
    behind Sentinel (``sentinel://``: kombu's sentinel transport and Celery's sentinel
    result backend, both told the master's name and how to reach the sentinels)."""
    transport: dict[str, Any] = {
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "unacked_restore_interval": 60,
        "unacked_restore_throttle": 1,
    }
    backend: dict[str, Any] = {"retry_policy": {"timeout": 5.0}}
    spec = sentinel_spec(url)
    kombu_url = url
    ssl: dict[str, Any] | None = None
    if spec is not None:
        kombu_url = spec.kombu_url()
        for options in (transport, backend):
            options.update(master_name=spec.master_name, sentinel_kwargs=spec.sentinel_kwargs())
        if spec.tls:
            import ssl as _ssl

            ssl = {**dict(spec.tls), "ssl_cert_reqs": _ssl.CERT_REQUIRED}
    app.conf.update(
        mailtls_url=url,  # as the operator wrote it (what url_of gives the coordination)
        broker_url=kombu_url,
        result_backend=kombu_url,
        broker_use_ssl=ssl,
        redis_backend_use_ssl=ssl,
        broker_transport_options=transport,
        result_backend_transport_options=backend,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=TASK_TIME_LIMIT,
        task_soft_time_limit=TASK_SOFT_TIME_LIMIT,
        # Clients wait on the deploy records, never on Celery results: storing a result (and
        # a STARTED state) per step is Redis work nobody reads. A caller that does want one
        # asks per message (apply_async(ignore_result=False)); the audit task keeps its own.
        task_ignore_result=True,
        task_track_started=False,
        # Flower sees received/started/succeeded from the workers; a separate "sent" event
        # per message is one more PUBLISH for the same row.
        task_send_sent_event=False,
        worker_send_task_events=True,
        # Never True: extended results store the task's kwargs -- the stage bundle.
        result_extended=False,
        result_expires=7 * 24 * 3600,
        task_routes=(route_task,),
        task_default_queue="mailtls.unrouted",
    )


app = Celery("mailtls", include=["mailtls_tasks.distributed.tasks"])
configure(app, broker_url())


def url_of(app: Celery) -> str:
    """The broker URL ``app`` was configured with, as written (a Sentinel URL, not
    kombu's form of it): what ``Coordinator`` takes."""
    return str(app.conf.get("mailtls_url") or app.conf.broker_url)


_clients: dict[str, Celery] = {}


def client_app(url: str | None = None) -> Celery:
    """A sending-only app for ``url``, one per broker URL.

    Celery caches its connection and producer pools on first use, so re-pointing one
    app at another broker silently keeps sending to the first. A pipeline process
    may talk to several fleets: each URL gets its own app. Tasks are sent by name.
    """
    norm = broker_url(url)
    client = _clients.get(norm)
    if client is None:
        client = Celery("mailtls-client", set_as_current=False)
        configure(client, norm)
        _clients[norm] = client
    return client


def use_broker(url: str | None) -> Celery:
    """Point the module app (the worker's, and the CLI's one-shot) at ``url``, before it connects."""
    if url:
        configure(app, normalize_url(url))
    return app

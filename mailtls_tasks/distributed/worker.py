"""Running a worker on a mail host: ``mailtls worker`` (or ``python -m mailtls_tasks.distributed.worker``).

It consumes only its own host's queue (``mailtls.<host>``), one deploy at a time
(concurrency 1: a host's targets share daemons, and the lock would serialize them
anyway), with task events on for Flower. Recovery of interrupted deploys and the
first registry heartbeat happen in ``worker_init``, before anything is consumed.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from ..core.config import CONFIG_ENV, HOST_ENV, config_path
from ..errors import BrokerError
from .app import BROKER_ENV, queue_for, url_of, use_broker
from .broker import notify_queue_for

log = logging.getLogger("mailtls.worker")


def worker_options(host: str, loglevel: str = "INFO", concurrency: int = 1) -> dict[str, Any]:
    """What ``celery worker -Q mailtls.<host> -c 1 -E -n mailtls@<host> -l LEVEL
    --without-gossip --without-mingle -O fair`` would pass to the worker."""
    from celery.utils.log import mlevel

    return {"queues": [queue_for(host), notify_queue_for(host)], "concurrency": concurrency, "task_events": True,
            "hostname": f"mailtls@{host}", "loglevel": mlevel(loglevel.upper()), "without_gossip": True,
            "without_mingle": True, "optimization": "fair"}


def run_worker(config: str | None = None, broker: str | None = None, loglevel: str = "INFO",
               concurrency: int = 1, host: str | None = None) -> None:
    os.environ[CONFIG_ENV] = config_path(config)
    if host:
        os.environ[HOST_ENV] = host  # one targets file for the fleet: each worker names its host
    app = use_broker(broker)
    os.environ[BROKER_ENV] = url_of(app)
    from . import tasks

    # Config and keys, loaded once and inherited by the pool's children; fails fast with
    # the config's own message, or says how to create keys. Then the host is claimed
    # in the registry: refused (exit 1) while another live worker serves the same host.
    rt = tasks.runtime()
    _register_when_redis_answers(rt, tasks)
    if rt.cfg.metrics_port:
        from . import metrics

        metrics.prepare(rt.cfg.state_dir)  # before the pool forks: children inherit where to write
    # The worker itself, not Celery's command line (`app.worker_main`): that one imports
    # Celery's whole CLI (click-repl, prompt-toolkit: some 450 modules, 24 MiB) into a
    # process that then forks its pool child with all of it.
    worker = app.Worker(**worker_options(rt.host, loglevel, concurrency))
    worker.start()
    sys.exit(worker.exitcode)


def _register_when_redis_answers(rt: Any, tasks: Any) -> None:
    """Redis down at start (a boot race, maintenance) is waited out, not an exit: under
    systemd an exit would count towards the unit's start limit, meant for configs the
    worker can never start with, and leave the host without a worker for good."""
    import redis

    delay = 1.0
    while True:
        try:
            tasks.register(rt, tasks.coordinator())
            return
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, BrokerError) as err:
            log.warning("Redis does not answer (%s); registering host %s again in %.0fs", err, rt.host, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


if __name__ == "__main__":
    run_worker(sys.argv[1] if len(sys.argv) > 1 else None)

"""Running a worker on a mail host: ``mailtls worker`` (or ``python -m mailtls_tasks.worker``).

It consumes only its own host's queue (``mailtls.<host>``), one deploy at a time
(concurrency 1: a host's targets share daemons, and the lock would serialize them
anyway), with task events on for Flower. Recovery of interrupted deploys and the
first registry heartbeat happen in ``worker_init``, before anything is consumed.
"""

from __future__ import annotations

import os
import sys

from .app import BROKER_ENV, queue_for, use_broker
from .config import CONFIG_ENV, config_path, load_config


def worker_argv(host: str, loglevel: str = "INFO", concurrency: int = 1) -> list[str]:
    return ["worker", "-Q", queue_for(host), "-c", str(concurrency), "-E", "-n", f"mailtls@{host}",
            "-l", loglevel, "--without-gossip", "--without-mingle", "-O", "fair"]


def run_worker(config: str | None = None, broker: str | None = None, loglevel: str = "INFO",
               concurrency: int = 1) -> None:
    cfg = load_config(config)  # fail fast, with the config's own message
    from .host import HostRuntime

    HostRuntime(cfg).check_security()  # no keys, no distributed mode: say how to make them
    os.environ[CONFIG_ENV] = config_path(config)
    app = use_broker(broker)
    os.environ[BROKER_ENV] = str(app.conf.broker_url)
    from . import tasks

    tasks.runtime()  # loaded now, inherited by the pool's children
    app.worker_main(worker_argv(cfg.host, loglevel, concurrency))


if __name__ == "__main__":
    run_worker(sys.argv[1] if len(sys.argv) > 1 else None)

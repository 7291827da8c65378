"""Entry module for running the worker with the plain ``celery`` command.

    MAILTLS_CONFIG=/etc/mailtls/targets.toml MAILTLS_BROKER_URL=redis://... \\
        celery -A workers.celery_entry worker -Q mailtls.$(hostname -s) -c 1 -E

``mailtls worker`` does the same with the right queue and options filled in; this
exists for operators who manage Celery workers with their own tooling.
"""

from mailtls_tasks.distributed import tasks as _tasks  # noqa: F401  (registers the tasks and worker signals)
from mailtls_tasks.distributed.app import app

__all__ = ["app"]

"""Where the broker is and what a task message on it looks like, without Celery.

A pipeline's `mailtls deploy` sends one message per deploy and then only waits: it
need not load Celery and kombu (a tenth of a second) to do that. ``task_message``
builds the very JSON kombu's Redis transport pushes for Celery's
``apply_async(ignore_result=True)`` of a task by name (protocol 2); a test compares
it with what the installed Celery sends, so an upgrade that changes the format fails
there, not in production. Workers are plain Celery consumers of it.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import ConfigError

BROKER_ENV = "MAILTLS_BROKER_URL"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"


def broker_url(explicit: str | None = None) -> str:
    return normalize_url(explicit or os.environ.get(BROKER_ENV) or DEFAULT_BROKER)


def normalize_url(url: str) -> str:
    """``rediss://`` always verifies the server certificate.

    Accepts ``?ssl_ca_certs=/path/ca.pem`` (and client ``ssl_certfile``/``ssl_keyfile``);
    adds ``ssl_cert_reqs=required`` when absent and refuses anything weaker, because a
    broker connection that can be intercepted carries every deploy's metadata.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"broker URL scheme {parts.scheme!r} is not supported (redis://, rediss://, unix://)")
    if parts.scheme != "rediss":
        return url
    query = dict(parse_qsl(parts.query))
    reqs = query.get("ssl_cert_reqs", "required").lower()
    if reqs not in ("required", "cert_required"):
        raise ConfigError("broker URL: ssl_cert_reqs must be 'required' (certificate verification cannot be off)")
    query["ssl_cert_reqs"] = "required"
    return urlunsplit(parts._replace(query=urlencode(query, safe="/")))


def queue_for(host: str) -> str:
    return f"mailtls.{host}"


def notify_queue_for(host: str) -> str:
    """The host's notices: a queue of their own, so a step never waits behind a retry."""
    return f"mailtls.{host}.notify"


def task_message(task: str, kwargs: dict[str, Any], queue: str, argsrepr: str,
                 task_id: str | None = None) -> str:
    """The message kombu's Redis transport LPUSHes onto ``queue`` (a list of that name)
    for ``app.signature(task, kwargs=kwargs).set(argsrepr=argsrepr, kwargsrepr="")
    .apply_async(ignore_result=True)`` routed to ``queue``: a root task, no parent, no
    callbacks, no time limits of its own, persistent, priority 0."""
    task_id = task_id or str(uuid.uuid4())
    body = json.dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    headers: dict[str, Any] = {
        "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None, "group": None,
        "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id, "parent_id": None,
        "argsrepr": argsrepr, "kwargsrepr": "", "origin": f"gen{os.getpid()}@{socket.gethostname()}",
        "ignore_result": True, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
    }
    properties = {
        "correlation_id": task_id, "reply_to": str(uuid.uuid4()), "argsrepr": argsrepr, "kwargsrepr": "",
        "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
        "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
    }
    return json.dumps({"body": base64.b64encode(body.encode()).decode(), "content-encoding": "utf-8",
                       "content-type": "application/json", "headers": headers, "properties": properties})

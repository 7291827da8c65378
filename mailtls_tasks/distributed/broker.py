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
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from ..errors import ConfigError

BROKER_ENV = "MAILTLS_BROKER_URL"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"


def broker_url(explicit: str | None = None) -> str:
    return normalize_url(explicit or os.environ.get(BROKER_ENV) or DEFAULT_BROKER)


def normalize_url(url: str) -> str:
    """``rediss://`` always verifies the server certificate.

    Accepts ``?ssl_ca_certs=/path/ca.pem`` (and client ``ssl_certfile``/``ssl_keyfile``);
    adds ``ssl_cert_reqs=required`` when absent and refuses anything weaker, because a
    broker connection that can be intercepted carries every deploy's metadata. A
    ``sentinel://`` URL is checked here too (``sentinel_spec``) and kept as written.
    """
    if url.startswith(("sentinel://", "sentinels://")):
        sentinel_spec(url)  # raises, naming what is wrong
        return url
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"broker URL scheme {parts.scheme!r} is not supported (redis://, rediss://, unix://, "
                          "sentinel://, sentinels://)")
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


@dataclass(frozen=True)
class SentinelSpec:
    """A Redis behind Sentinel, from a broker URL::

        sentinel://USER:PASSWORD@s1:26379;sentinel://USER:PASSWORD@s2:26379;sentinel://…@s3:26379/0
            ?master_name=NAME&sentinel_password=…[&sentinel_username=…]
        sentinels://…  the same over TLS to every node and sentinel (?ssl_ca_certs=… required-verified)

    USER:PASSWORD are the ACL user's on the master and its replicas (the same on every
    node: a failover promotes a replica); the sentinels have their own password. The
    options may follow any of the addresses; the database follows the last."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls: tuple[tuple[str, str], ...] = ()  # ssl_* options, certificate checks required

    def node_kwargs(self) -> dict[str, Any]:
        """redis-py keyword arguments for the master (and a replica)."""
        out: dict[str, Any] = {"db": self.db, "username": self.username, "password": self.password}
        if self.tls:
            out.update(ssl=True, **dict(self.tls))
        return out

    def sentinel_kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"password": self.sentinel_password, "socket_timeout": 5.0,
                               "socket_connect_timeout": 5.0}
        if self.sentinel_username:
            out["username"] = self.sentinel_username
        if self.tls:
            out.update(ssl=True, **dict(self.tls))
        return out

    def kombu_url(self) -> str:
        """kombu's form: one ``sentinel://`` per sentinel, the master's credentials on
        each, the options left to its transport options."""
        auth = ""
        if self.username or self.password:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        return ";".join(f"sentinel://{auth}{h}:{p}/{self.db}" for h, p in self.sentinels)


SENTINEL_OPTIONS = {"master_name", "sentinel_password", "sentinel_username", "ssl_ca_certs", "ssl_certfile",
                    "ssl_keyfile", "ssl_cert_reqs"}


def sentinel_spec(url: str) -> SentinelSpec | None:
    """The Sentinel set a ``sentinel://`` (or TLS: ``sentinels://``) URL names, or None
    for any other URL. Raises ConfigError naming what is missing or wrong."""
    if not url.startswith(("sentinel://", "sentinels://")):
        return None
    tls = url.startswith("sentinels://")
    addresses: list[tuple[str, int]] = []
    options: dict[str, str] = {}
    username = password = None
    db = 0
    for part in url.split(";"):
        p = urlsplit(part.strip())
        if p.scheme not in ("sentinel", "sentinels") or not p.hostname:
            raise ConfigError(f"broker URL: {p.scheme or '?'}://{p.hostname or '?'}: each address of a Sentinel URL "
                              "is sentinel://HOST:PORT (sentinels:// for TLS)")
        if (p.scheme == "sentinels") != tls:
            raise ConfigError("broker URL: every address of a Sentinel URL is sentinel:// or every one sentinels://")
        addresses.append((p.hostname, p.port or 26379))
        if p.username or p.password:
            username, password = unquote(p.username or "") or None, unquote(p.password or "") or None
        if p.path.strip("/"):
            try:
                db = int(p.path.strip("/"))
            except ValueError:
                raise ConfigError(f"broker URL: {p.path!r} is not a database number") from None
        options.update(parse_qsl(p.query))
    unknown = set(options) - SENTINEL_OPTIONS
    if unknown:
        raise ConfigError(f"broker URL: unknown Sentinel options {sorted(unknown)} (known: "
                          f"{', '.join(sorted(SENTINEL_OPTIONS))})")
    if not options.get("master_name"):
        raise ConfigError("broker URL: a Sentinel URL needs ?master_name=NAME (the name the sentinels monitor)")
    if len(addresses) < 2:
        raise ConfigError("broker URL: name every sentinel (at least two: one sentinel alone is the single point "
                          "of failure Sentinel is there to remove)")
    reqs = options.pop("ssl_cert_reqs", "required").lower()
    if reqs not in ("required", "cert_required"):
        raise ConfigError("broker URL: ssl_cert_reqs must be 'required' (certificate verification cannot be off)")
    tls_opts: tuple[tuple[str, str], ...] = ()
    if tls:
        tls_opts = (("ssl_cert_reqs", "required"),
                    *((k, options[k]) for k in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") if k in options))
    elif any(k.startswith("ssl_") for k in options):
        raise ConfigError("broker URL: ssl_* options need sentinels:// (TLS)")
    return SentinelSpec(tuple(addresses), options["master_name"], db, username, password,
                        options.get("sentinel_username"), options.get("sentinel_password"), tls_opts)

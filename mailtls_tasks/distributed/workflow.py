"""Enqueueing a deploy from a pipeline, and waiting for how it ended.

    handle = mailtls_tasks.deploy("mx1-smtp", cert_pem, key_pem, chain_pem)
    result = handle.get(timeout=600)      # the same DeployResult as a local run
    if not result.ok: ...

The client waits on the deploy *record* in Redis, not only on Celery's result: when
a worker is killed outright, its host's recovery ends the deploy (and writes the
record) long before Redis would redeliver the unacked message.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import redis
from celery import Celery, Signature, chain

from ..core.config import TARGET_NAME_RE
from ..core.journal import check_deploy_id
from ..core.local import new_deploy_id
from ..core.material import MAX_INPUT_BYTES
from ..errors import BrokerError, MailTLSError, Rejected, UnknownTarget
from ..result import DeployResult
from ..security.envelope import seal
from ..security.keys import PipelineKeys, load_pipeline
from .app import client_app
from .coordination import Coordinator


class DeployTimeout(MailTLSError):
    """The client's wait budget ran out (exit 1). Says whether anything was touched."""

    exit_code = 1


class DeployHandle:
    """A deploy in flight. ``get()`` blocks until it ends and returns its result."""

    def __init__(self, coordinator: Coordinator, deploy_id: str, target: str, host: str) -> None:
        self.coordinator = coordinator
        self.deploy_id = deploy_id
        self.target = target
        self.host = host

    def __repr__(self) -> str:
        return f"<DeployHandle {self.deploy_id} target={self.target} host={self.host}>"

    def status(self) -> dict[str, Any] | None:
        return self.coordinator.get_record(self.deploy_id)

    def get(self, timeout: float = 600.0) -> DeployResult:
        """Wait for the outcome (blocking on the record's ``ended`` message, no polling).

        On timeout: a deploy whose stage had not started is cancelled (nothing touched)
        and DeployTimeout says so; one already running is left to finish (the host
        ends it, if need be by recovery when its lease runs out) and DeployTimeout
        says how to follow it."""
        try:
            rec = self.coordinator.wait_record(self.deploy_id, timeout)
            if rec and rec.get("outcome"):
                return DeployResult.from_public(rec)
            if rec is None:
                raise DeployTimeout(
                    f"deploy {self.deploy_id}: Redis has no record of it after {timeout:g}s (restarted and lost its "
                    f"data?); its host finishes it either way; follow it with: mailtls status {self.deploy_id}")
            if rec.get("phase") == "queued" and self.coordinator.claim(self.deploy_id, "cancelled") == "cancelled":
                self.coordinator.finish_unstarted(
                    self.deploy_id, "rejected", "cancelled: it did not start within the client's wait budget; "
                    "nothing was touched", reason="cancelled")
                alive = self.coordinator.host_alive(self.host)
                why = "target busy" if alive else f"no live worker for host {self.host!r}"
                raise DeployTimeout(f"{why}: deploy {self.deploy_id} did not start within {timeout:g}s and was "
                                    "cancelled; nothing was touched")
            phase = rec.get("phase", "?")
            raise DeployTimeout(f"deploy {self.deploy_id} is still running (phase {phase}) after {timeout:g}s; "
                                f"follow it with: mailtls status {self.deploy_id}")
        except redis.RedisError as err:
            raise BrokerError(f"lost Redis while waiting for deploy {self.deploy_id}: {err}") from None


def deploy(target: str, cert_pem: bytes, key_pem: bytes, chain_pem: bytes | None = None, *,
           force: bool = False, broker_url: str | None = None, host: str | None = None,
           deploy_id: str | None = None, pipeline: PipelineKeys | str | None = None) -> DeployHandle:
    """Enqueue a deploy of ``target`` and return a handle to wait on.

    The bundle is sealed for the target host's pinned public key and signed with the
    pipeline's key (``pipeline``: loaded keys, or the path of a pipeline file; default
    ``$MAILTLS_PIPELINE`` or /etc/mailtls/pipeline.toml), so Redis only ever holds
    ciphertext. The target's host comes from the fleet registry. Raises UnknownTarget
    if no worker has registered it, ConfigError without pipeline keys, BrokerError if
    Redis is unreachable. The material itself is checked on the host.
    """
    keys = pipeline if isinstance(pipeline, PipelineKeys) else load_pipeline(pipeline)
    if not TARGET_NAME_RE.match(target):
        raise UnknownTarget(f"{target!r} is not a valid target name")
    for what, data in (("cert", cert_pem), ("key", key_pem), ("chain", chain_pem)):
        if data is not None and len(data) > MAX_INPUT_BYTES:
            raise Rejected(f"{what}: over the {MAX_INPUT_BYTES}-byte limit")
    app = client_app(broker_url)
    co = Coordinator(str(app.conf.broker_url))
    deploy_id = check_deploy_id(deploy_id or new_deploy_id())
    try:
        host = host or co.target_host(target)
        if not host:
            raise UnknownTarget(f"unknown target {target!r}: no worker has registered it (is its worker running "
                                "with a config that defines it?)")
        recipient = keys.host_key(host)  # pinned here, never taken from Redis
        now = time.time()
        fence = co.next_fence(target, now)  # from the time signed below; survives Redis losing its data
        envelope = seal(target=target, host=host, deploy_id=deploy_id, fence=fence, cert=cert_pem, key=key_pem,
                        chain=chain_pem, force=force, signing_key=keys.signing_key, recipient=recipient,
                        issued_at=now)
        return enqueue_sealed(co, envelope, app)
    except redis.RedisError as err:
        raise BrokerError(f"cannot enqueue deploy: Redis error: {err}") from None
    except (OSError, ConnectionError) as err:
        raise BrokerError(f"cannot enqueue deploy: broker unreachable: {err}") from None


def enqueue_sealed(co: Coordinator, envelope: dict[str, Any], app: Celery | None = None) -> DeployHandle:
    """Enqueue an envelope sealed and signed elsewhere (e.g. by a signer holding the
    pipeline key in an HSM): records the deploy and sends the step chain.

    Target, host, deploy id and fence are taken from the envelope's signed header; the
    worker refuses it unless they match the message, so nothing here is trusted.
    """
    try:
        target, host, deploy_id, fence = (envelope["target"], envelope["host"], envelope["deploy_id"],
                                          envelope["fence"])
    except (KeyError, TypeError):
        raise Rejected("envelope: missing target, host, deploy_id or fence") from None
    co.put_record({"deploy_id": deploy_id, "target": target, "host": host, "phase": "queued",
                   "outcome": None, "fence": fence, "steps": {}, "error": None,
                   "created": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")})
    co.push_history(target, deploy_id)
    # The envelope travels beside the messages, not in them: every task's arguments are
    # references only, whatever Celery does with them (a retry drops kwargsrepr).
    co.put_envelope(deploy_id, envelope)
    app = app or client_app(co.url)
    refs = {"target": target, "host": host, "deploy_id": deploy_id}

    def step(name: str) -> Signature:
        return app.signature(f"mailtls.{name}", kwargs=refs, immutable=True)

    flow = chain(step("stage"), step("validate"), step("commit"), step("reload"), step("verify"), app=app)
    flow.apply_async(link_error=step("rollback"))
    return DeployHandle(co, deploy_id, target, host)

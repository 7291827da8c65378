"""Enqueueing a deploy from a pipeline, and waiting for how it ended.

    handle = mailtls_tasks.deploy("mx1/smtp", cert_pem, key_pem, chain_pem)
    result = handle.get(timeout=600)      # the same DeployResult as a local run
    if not result.ok: ...

The client waits on the deploy *record* in Redis, not only on Celery's result: when
a worker is killed outright, its host's recovery ends the deploy (and writes the
record) long before Redis would redeliver the unacked message.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from ..errors import BrokerError, MailTLSError, Rejected, UnknownTarget
from ..ids import MAX_INPUT_BYTES, TARGET_NAME_RE, check_deploy_id, new_deploy_id
from ..security.envelope import seal
from ..security.keys import PipelineKeys, load_pipeline
from .broker import broker_url as resolve_broker_url
from .broker import queue_for, task_message
from .coordination import Coordinator

# how long a client whose wait ran out tries to cancel a deploy whose stage is trying
# its busy target at that moment (each try takes milliseconds; then it lets go)
CANCEL_GRACE = 5.0

if TYPE_CHECKING:
    from celery import Celery, Signature

    from ..core.result import DeployResult


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

    def _cancel(self, grace: float = CANCEL_GRACE) -> bool:
        """Cancel a deploy that has not started. A stage that finds its target busy
        holds the claim only while it tries, then lets go until its next try: the
        cancel is tried again for ``grace`` seconds while the record says queued."""
        deadline = time.monotonic() + grace
        while True:
            if self.coordinator.claim(self.deploy_id, "cancelled") == "cancelled":
                return True
            rec = self.coordinator.get_record(self.deploy_id) or {}
            if rec.get("outcome") or rec.get("phase") != "queued" or time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def get(self, timeout: float = 600.0) -> DeployResult:
        """Wait for the outcome (blocking on the record's ``ended`` message, no polling).

        On timeout: a deploy whose stage had not started is cancelled (nothing touched)
        and DeployTimeout says so; one already running is left to finish (the host
        ends it, if need be by recovery when its lease runs out) and DeployTimeout
        says how to follow it."""
        from ..core.result import DeployResult  # the model loads while the host works, not before the send

        try:
            rec = self.coordinator.wait_record(self.deploy_id, timeout)
            if rec and rec.get("outcome"):
                return DeployResult.from_public(rec)
            if rec is None:
                raise DeployTimeout(
                    f"deploy {self.deploy_id}: Redis has no record of it after {timeout:g}s (restarted and lost its "
                    f"data?); its host finishes it either way; follow it with: mailtls status {self.deploy_id}")
            if rec.get("phase") == "queued" and self._cancel():
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
           deploy_id: str | None = None, pipeline: PipelineKeys | str | None = None,
           also: list[tuple[bytes, bytes, bytes | None]] | None = None) -> DeployHandle:
    """Enqueue a deploy of ``target`` (``HOST/NAME``, or a bare ``NAME`` that exactly one
    host defines) and return a handle to wait on.

    The bundle is sealed for the target host's pinned public key and signed with the
    pipeline's key (``pipeline``: loaded keys, or the path of a pipeline file; default
    ``$MAILTLS_PIPELINE`` or /etc/mailtls/pipeline.toml), so Redis only ever holds
    ciphertext. The target's host comes from the fleet registry. Raises UnknownTarget
    if no worker has registered it, AmbiguousTarget for a bare NAME on several hosts
    (naming them), ConfigError without pipeline keys, BrokerError if Redis is
    unreachable. The material itself is checked on the host.
    """
    keys = pipeline if isinstance(pipeline, PipelineKeys) else load_pipeline(pipeline)
    co = Coordinator.for_url(resolve_broker_url(broker_url))
    if host is not None and "/" not in target:
        target = f"{host}/{target}"
    envelope = _seal(co, keys, target, cert_pem, key_pem, chain_pem, force=force, deploy_id=deploy_id, also=also)
    return _enqueue(co, envelope)


@dataclass(frozen=True, repr=False)
class Certificate:
    """One certificate of ``deploy_many`` or ``rollout_many``: the target it goes to
    (``HOST/NAME``, or a bare NAME one host defines; for a rollout, None: every target
    whose names it all covers), its PEM files, and (``also``) a dual target's second
    certificate, key and chain."""

    target: str | None
    cert: bytes
    key: bytes
    chain: bytes | None = None
    also: tuple[tuple[bytes, bytes, bytes | None], ...] = ()
    # for a rollout, target None: the names it is for (certbot's RENEWED_DOMAINS);
    # empty, the leaf's own
    covers: tuple[str, ...] = ()

    def __repr__(self) -> str:  # never the key
        return f"<Certificate for {self.target or 'the targets it covers'}>"


def deploy_many(certificates: Sequence[Certificate], *, force: bool = False, broker_url: str | None = None,
                pipeline: PipelineKeys | str | None = None) -> list[DeployHandle]:
    """Enqueue several certificates at once; one handle per certificate, in order.

    The certificates of one host go as one batch (one ``mailtls.batch`` message: a
    stage per certificate, one validate, one build per SNI table, one reload per
    daemon, a verify per name; see core/batch.py); a host with one certificate gets an
    ordinary deploy. Each certificate is still a deploy of its own: its own id,
    envelope (sealed for its host), fence, record and outcome (``handle.get()``), and a
    member whose own checks fail is rejected alone. Raises as ``deploy`` does, before
    anything is sent, for any certificate (and Rejected for a target named twice)."""
    keys = pipeline if isinstance(pipeline, PipelineKeys) else load_pipeline(pipeline)
    co = Coordinator.for_url(resolve_broker_url(broker_url))
    envelopes = seal_many(co, keys, certificates, force=force)
    handles: dict[str, DeployHandle] = {}
    for group in _by_host(envelopes):
        try:
            if len(group) == 1:
                handles[group[0]["deploy_id"]] = _enqueue(co, group[0])
            else:
                handles.update((h.deploy_id, h) for h in enqueue_batch(co, group, None))
        except MailTLSError as err:
            if not handles:
                raise
            sent = ", ".join(f"{h.target} {h.deploy_id}" for h in handles.values())
            raise BrokerError(f"{err}; already sent (follow them with `mailtls status ID`): {sent}") from None
    return [handles[e["deploy_id"]] for e in envelopes]


def seal_many(co: Coordinator, keys: PipelineKeys, certificates: Sequence[Certificate], *,
              force: bool) -> list[dict[str, Any]]:
    """Each certificate sealed for its target's host (as ``deploy`` seals one), refusing
    a target named twice: one deploy of a target at a time, and a batch names each once."""
    envelopes = []
    for c in certificates:
        if c.target is None:
            raise UnknownTarget("deploy_many: each certificate names its target")
        envelopes.append(seal_one(co, keys, c.target, c, force=force))
    addresses = [f"{e['host']}/{e['target']}" for e in envelopes]
    twice = sorted({a for a in addresses if addresses.count(a) > 1})
    if twice:
        raise Rejected(f"certificates for {', '.join(twice)} more than once: one certificate per target")
    return envelopes


def seal_one(co: Coordinator, keys: PipelineKeys, target: str, c: Certificate, *, force: bool) -> dict[str, Any]:
    """One certificate sealed for ``target``'s host, under a new deploy id and fence."""
    return _seal(co, keys, target, c.cert, c.key, c.chain, force=force, deploy_id=None, also=list(c.also) or None)


def _by_host(envelopes: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in envelopes:
        groups.setdefault(e["host"], []).append(e)
    return list(groups.values())


def enqueue_batch(co: Coordinator, envelopes: list[dict[str, Any]], rollout_id: str | None) -> list[DeployHandle]:
    """Several deploys to one host as one batch: every member's record and envelope,
    and the one ``mailtls.batch`` message, pushed together (``create_deploys``)."""
    host = envelopes[0]["host"]
    assert all(e["host"] == host for e in envelopes)
    batch_id = new_deploy_id()
    members = [{"target": f"{host}/{e['target']}", "deploy_id": e["deploy_id"]} for e in envelopes]
    queue = queue_for(host)
    shown = f"{host} · batch of {len(members)} · {batch_id}"
    message = task_message("mailtls.batch", {"host": host, "batch_id": batch_id, "members": members,
                                             "rollout": rollout_id}, queue, shown)
    with _broker_errors():
        co.create_deploys([(_new_record(e, rollout_id, batch_id), e) for e in envelopes], (queue, message))
    return [DeployHandle(co, m["deploy_id"], m["target"], host) for m in members]


def prepare(co: Coordinator, app: Celery, keys: PipelineKeys, target: str, cert_pem: bytes, key_pem: bytes,
            chain_pem: bytes | None, *, force: bool = False, deploy_id: str | None = None,
            rollout_id: str | None = None,
            also: list[tuple[bytes, bytes, bytes | None]] | None = None) -> tuple[DeployHandle, Signature]:
    """Resolve, seal, record and stash one deploy; return its handle and the root task's
    signature, not yet sent (a rollout sends a wave's signatures as one group)."""
    envelope = _seal(co, keys, target, cert_pem, key_pem, chain_pem, force=force, deploy_id=deploy_id, also=also)
    return _register(co, envelope, app, rollout_id)


def _seal(co: Coordinator, keys: PipelineKeys, target: str, cert_pem: bytes, key_pem: bytes,
          chain_pem: bytes | None, *, force: bool, deploy_id: str | None,
          also: list[tuple[bytes, bytes, bytes | None]] | None) -> dict[str, Any]:
    """Check the address and sizes, resolve the host, and seal the bundle for it."""
    host, sep, name = target.partition("/")
    if not ((sep and TARGET_NAME_RE.match(name)) or (not sep and TARGET_NAME_RE.match(host))):
        raise UnknownTarget(f"{target!r} is not a target address (HOST/NAME or NAME)")
    for what, data in (("cert", cert_pem), ("key", key_pem), ("chain", chain_pem),
                       *((w, d) for c, k, ch in also or [] for w, d in (("cert", c), ("key", k), ("chain", ch)))):
        if data is not None and len(data) > MAX_INPUT_BYTES:
            raise Rejected(f"{what}: over the {MAX_INPUT_BYTES}-byte limit")
    chosen = deploy_id is not None
    deploy_id = check_deploy_id(deploy_id or new_deploy_id())
    now = time.time()
    with _broker_errors():
        if chosen:  # a generated id is new by construction; a chosen one may have been used
            _refuse_used(co, deploy_id)
        # the fence grows with the time signed below: it survives Redis losing its data
        host, name, fence = co.resolve_with_fence(target, now)
    recipient = keys.host_key(host)  # pinned here, never taken from Redis
    return seal(target=name, host=host, deploy_id=deploy_id, fence=fence, cert=cert_pem, key=key_pem,
                chain=chain_pem, force=force, signing_key=keys.signing_key, recipient=recipient, issued_at=now,
                also=also)


def _refuse_used(co: Coordinator, deploy_id: str) -> None:
    """An id names one deploy. Sent again, the host would answer with the record it has
    for it, and the caller would take the first deploy's outcome for its own."""
    rec = co.get_record(deploy_id)
    if rec is not None:
        state = f"ended {rec.get('outcome')}" if rec.get("outcome") else f"in phase {rec.get('phase', '?')}"
        raise Rejected(f"deploy id {deploy_id} is already used (a deploy of {rec.get('target', '?')}, {state}); "
                       f"follow it with: mailtls status {deploy_id}, or leave out the id to get a new one")


def enqueue_sealed(co: Coordinator, envelope: dict[str, Any], app: Any = None) -> DeployHandle:
    """Enqueue an envelope sealed and signed elsewhere (e.g. by a signer holding the
    pipeline key in an HSM): records the deploy and sends it. (``app``: no longer
    used, kept for callers that pass their Celery app.)

    Target, host, deploy id and fence are taken from the envelope's signed header; the
    worker refuses it unless they match the message, so nothing here is trusted.
    """
    with _broker_errors():
        _refuse_used(co, _refs(envelope)[2])
    return _enqueue(co, envelope)


def _refs(envelope: dict[str, Any]) -> tuple[str, str, str, Any]:
    try:
        return envelope["target"], envelope["host"], envelope["deploy_id"], envelope["fence"]
    except (KeyError, TypeError):
        raise Rejected("envelope: missing target, host, deploy_id or fence") from None


def _record(co: Coordinator, envelope: dict[str, Any], rollout_id: str | None,
            message: tuple[str, str] | None = None) -> DeployHandle:
    """Record the deploy and stash its envelope (and push ``message``: queue, payload),
    in one round trip, in that order: a worker never sees a message before its record."""
    # The envelope travels beside the messages, not in them: every task's arguments are
    # references only, whatever Celery does with them (a retry drops kwargsrepr).
    data = _new_record(envelope, rollout_id)
    with _broker_errors():
        co.create_deploy(data, envelope, message=message)
    return DeployHandle(co, data["deploy_id"], data["target"], data["host"])


def _new_record(envelope: dict[str, Any], rollout_id: str | None, batch_id: str | None = None) -> dict[str, Any]:
    """A deploy's record in Redis as its client creates it: queued."""
    name, host, deploy_id, fence = _refs(envelope)
    return {"deploy_id": deploy_id, "target": f"{host}/{name}", "host": host, "phase": "queued", "outcome": None,
            "fence": fence, "steps": {}, "error": None, "rollout": rollout_id, "batch_id": batch_id,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")}


@contextlib.contextmanager
def _broker_errors() -> Iterator[None]:
    """Redis trouble while enqueueing, as the BrokerError a caller can act on."""
    try:
        yield
    except redis.RedisError as err:
        raise BrokerError(f"cannot enqueue deploy: Redis error: {err}") from None
    except (OSError, ConnectionError) as err:
        raise BrokerError(f"cannot enqueue deploy: broker unreachable: {err}") from None


def _root_kwargs(envelope: dict[str, Any], rollout_id: str | None) -> dict[str, Any]:
    name, host, deploy_id, _ = _refs(envelope)
    return {"target": f"{host}/{name}", "host": host, "deploy_id": deploy_id, "rollout": rollout_id}


def _enqueue(co: Coordinator, envelope: dict[str, Any]) -> DeployHandle:
    """One deploy: its record, envelope and root message (``mailtls.deploy``, run on the
    host, which sends the steps as its children: Flower shows a deploy as one tree),
    pushed together without loading Celery (``broker.task_message``)."""
    kwargs = _root_kwargs(envelope, None)
    queue = queue_for(kwargs["host"])
    message = task_message("mailtls.deploy", kwargs, queue, readable(kwargs["target"], kwargs["deploy_id"]))
    return _record(co, envelope, None, (queue, message))


def _register(co: Coordinator, envelope: dict[str, Any], app: Celery,
              rollout_id: str | None) -> tuple[DeployHandle, Signature]:
    """Record one deploy of a rollout; return its root task's signature, not yet sent."""
    handle = _record(co, envelope, rollout_id)
    kwargs = _root_kwargs(envelope, rollout_id)
    signature = app.signature("mailtls.deploy", kwargs=kwargs).set(
        argsrepr=readable(kwargs["target"], kwargs["deploy_id"]), kwargsrepr="")
    return handle, signature


def readable(address: str, deploy_id: str) -> str:
    """What Flower's args column shows for every task of a deploy."""
    return f"{address} · {deploy_id}"


def check(target: str, cert_pem: bytes, key_pem: bytes, chain_pem: bytes | None = None, *, force: bool = False,
          broker_url: str | None = None, pipeline: PipelineKeys | str | None = None,
          also: list[tuple[bytes, bytes, bytes | None]] | None = None, timeout: float = 120.0) -> Any:
    """Check mode through the target's worker (``deploy --check``): the bundle sealed
    for its host as a deploy's is, a ``mailtls.check`` task that runs every check a
    deploy would (``core.check``) and changes nothing; returns its ``CheckReport``
    (no key material in it). No deploy record, lock or fence on the host."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    from ..core.check import CheckReport
    from .app import client_app

    keys = pipeline if isinstance(pipeline, PipelineKeys) else load_pipeline(pipeline)
    co = Coordinator.for_url(resolve_broker_url(broker_url))
    envelope = _seal(co, keys, target, cert_pem, key_pem, chain_pem, force=force, deploy_id=None, also=also)
    name, host, check_id, _ = _refs(envelope)
    with _broker_errors():
        co.put_envelope(check_id, envelope)
        app = client_app(co.url)
        result = app.send_task("mailtls.check", kwargs={"target": f"{host}/{name}", "host": host,
                                                        "check_id": check_id},
                               queue=queue_for(host), argsrepr=f"{host}/{name} · check {check_id}", kwargsrepr="",
                               ignore_result=False)
    try:
        data = result.get(timeout=timeout)
    except CeleryTimeout:
        with contextlib.suppress(redis.RedisError):
            co.drop_envelope(check_id)
        alive = co.host_alive(host)
        raise DeployTimeout(f"check of {host}/{name}: no answer within {timeout:g}s"
                            + ("" if alive else f" (no live worker for host {host!r})") + "; nothing was changed"
                            ) from None
    except MailTLSError:
        raise
    except Exception as err:  # noqa: BLE001 -- the task failed on the host: its error, as the worker gave it
        raise BrokerError(f"check of {host}/{name} failed on its host: {type(err).__name__}: {err}") from None
    return CheckReport.model_validate(data)

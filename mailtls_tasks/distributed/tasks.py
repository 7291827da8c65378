"""The Celery tasks: one per step, plus the compensating ``mailtls.rollback``.

Tasks are thin. They check the message belongs to this host, call the host runtime,
publish the journal record to Redis, and translate errors: transient ones are retried
with backoff and jitter, permanent ones fail the task so the chain's ``link_error``
sends ``mailtls.rollback`` to the same host as its own message. They never see a file.

Every way a deploy can end is published (docs/protocol.md): a step, the rollback, a
message that finds its deploy already ended, a deploy busy past its retry budget, a
cancelled claim, and recovery (at start and every ``recovery_interval``, which also
re-publishes the journal's outbox: endings Redis did not hear of when they happened).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import random
import signal
import threading
from collections.abc import Callable
from typing import Any

import redis
from celery import Task, chain
from celery.signals import worker_init, worker_process_shutdown, worker_shutdown

from ..core.audit import worst
from ..core.config import load_config
from ..core.host import HostRuntime
from ..core.journal import DeployRecord, process_alive, process_token
from ..core.notices import for_expiry, for_record
from ..errors import HostTaken, MailTLSError, Rejected, StepFailed, TargetBusy, Transient, UnknownTarget
from ..notify import Notice
from ..security.envelope import EnvelopeError
from . import metrics
from .app import MAX_RETRY_BACKOFF, app, queue_for, url_of
from .broker import notify_queue_for
from .coordination import Coordinator
from .workflow import readable

log = logging.getLogger("mailtls.tasks")

# A batch runs every step of all its members in one task: up to an hour (the soft
# limit raises inside the run, which then rolls every unfinished member back); still
# well inside the broker's visibility timeout (app.VISIBILITY_TIMEOUT, two hours).
BATCH_TIME_LIMIT = 3600
MAX_DELIVERIES = 3          # the same message redelivered after a lost worker, at most
HEARTBEAT_INTERVAL = 10.0
MAX_RETRIES = 10
OUTBOX_ORPHAN_AGE = 24 * 3600.0
EXPIRY_NOTICE_EVERY = 24 * 3600  # an expiring certificate is announced once a day per target, not per audit

_state: dict[str, Any] = {}


def runtime() -> HostRuntime:
    """The worker host's runtime, loaded once from its own config file (keys required)."""
    rt = _state.get("runtime")
    if rt is None:
        rt = HostRuntime(load_config(os.environ.get("MAILTLS_CONFIG")))
        rt.security()
        _state["runtime"] = rt
    return rt


def _runtime_for(host: str) -> HostRuntime:
    rt = runtime()
    if host != rt.host:
        # Routing sent it here by mistake; acting on another host's target is never right.
        raise Rejected(f"message for host {host!r} reached worker of host {rt.host!r}")
    return rt


def _local_name(target: str, host: str) -> str:
    """``HOST/NAME`` (or a bare NAME, from messages sent before addresses) -> NAME,
    refusing an address of another host."""
    h, sep, name = target.partition("/")
    if not sep:
        return target
    if h != host:
        raise Rejected(f"message for target {target!r} carries host {host!r}")
    return name


def coordinator() -> Coordinator:
    co = _state.get("coordinator")
    if co is None:
        co = _state["coordinator"] = Coordinator(url_of(app))
    return co


def _summary(rec: DeployRecord | None, step: str, note: str | None = None) -> dict[str, Any]:
    """What a task returns (the result backend stores it, Flower's result column shows
    it): the target's address, the deploy, how far it got and how it ended."""
    out: dict[str, Any] = {}
    if rec is not None:  # first what an operator scans the column for: how it ended, or how far it got
        if rec.outcome:
            out["outcome"] = rec.outcome
        else:
            out["phase"] = rec.phase
        if rec.reason:
            out["reason"] = rec.reason
        out.update(step=step, target=f"{rec.host}/{rec.target}", deploy_id=rec.deploy_id,
                   fingerprint_sha256=rec.fingerprint)
    else:
        out["step"] = step
    if note:
        out["note"] = note
    return out


def _after(rec: DeployRecord | None) -> None:
    """Publish the record; once the deploy has ended, clear its outbox entry (Redis
    has it now), refresh that target's registry entry and count it."""
    if rec is None:
        return
    co = coordinator()
    if not rec.finished:
        co.publish(rec)
        return
    rt = runtime()
    co.publish(rec, inventory=rt.inventory_entry(rec.target))
    _published(rt, rec)


def _published(rt: HostRuntime, rec: DeployRecord) -> None:
    """Redis has this ending: drop its outbox entry, count it and send its notice --
    once, whoever published it (a step, a late message, the rollback errback, or
    recovery)."""
    if rt.journal.outbox_done(rec.target, rec.deploy_id):
        metrics.deploy_ended(rt.host, rec.target, rec.outcome or "", {n: s.ms / 1000 for n, s in rec.steps.items()},
                             rolled_back="rollback" in rec.steps)
        _notify(rt, for_record(rec, distributed=True))


def _notify(rt: HostRuntime, notice: Notice | None) -> None:
    """Queue a notice for this host's ``mailtls.notify`` task (its own queue, retried
    with backoff), when the host's config routes its kind anywhere. Never fails the
    caller: a notice is not the deploy's business."""
    if notice is None or not rt.cfg.notify.urls_for(notice.kind):
        return
    try:
        app.send_task("mailtls.notify", kwargs={"host": rt.host, "notice": notice.as_data()},
                      queue=notify_queue_for(rt.host), argsrepr=notice.title, kwargsrepr="")
    except Exception as err:  # noqa: BLE001 -- logged; the deploy has ended either way
        log.warning("could not queue the notice %r: %s", notice.title, err)


class DeployEnded(MailTLSError):
    """Raised by the rollback task when the deploy it ends did not deploy: its row in
    Flower is then a failure whose exception column names the outcome and the reason
    (not a green "nothing to roll back"). Expected, so logged without a traceback."""


def ending(rec: DeployRecord) -> str:
    """One line: how a deploy ended and why, for Flower's exception column."""
    failed = next((n for n, st in rec.steps.items() if st.status == "failed" and n != "rollback"), None)
    why = rec.reason or (f"{failed} failed" if failed else None)
    return f"{rec.outcome}" + (f" ({why})" if why else "") + (f": {rec.error}" if rec.error else "")


def _tell_root(task: Task, rec: DeployRecord | None) -> None:
    """The deploy has ended: say so on its root ``mailtls.deploy`` row, which went
    green ("steps sent") long before. A custom ``task-outcome`` event (Celery's way
    for monitors to learn more of a task) for the root's uuid: Flower's state takes
    its ``result`` and, for a deploy that did not deploy, its ``exception`` (which the
    root's own success event, should it come later, does not overwrite)."""
    root = task.request.root_id
    if rec is None or not rec.finished or not root or root == task.request.id or not task.request.hostname:
        return
    fields: dict[str, Any] = {"result": repr(_summary(rec, "deploy", "ended"))}
    if rec.outcome not in ("deployed", "unchanged"):
        fields["exception"] = ending(rec)
    try:
        with task.app.events.default_dispatcher(hostname=task.request.hostname) as d:
            d.send("task-outcome", uuid=root, retry=False, **fields)
    except Exception as err:  # noqa: BLE001 -- a view, never the deploy's business
        log.debug("deploy %s: could not tell its root row: %s", rec.deploy_id, err)


def _ended(task: Task, rec: DeployRecord | None) -> None:
    """A deploy that ended here stops its chain: an ``unchanged`` one quietly (no four
    no-op steps in Flower), a ``rejected`` one as a failure of this step."""
    if rec is None or not rec.finished:
        return
    _tell_root(task, rec)
    task.request.chain = None
    if rec.outcome == "rejected":
        raise Rejected(rec.error or "rejected")


class StepTask(Task):  # type: ignore[misc]
    """Reliability defaults shared by every step."""

    acks_late = True
    reject_on_worker_lost = True
    # TargetBusy is retried by _run itself, within the host's busy_retries budget.
    autoretry_for = (Transient, redis.ConnectionError, redis.TimeoutError)
    dont_autoretry_for = (TargetBusy,)
    max_retries = MAX_RETRIES
    retry_backoff = 1
    retry_backoff_max = MAX_RETRY_BACKOFF
    retry_jitter = True
    typing = True


def _backoff(retries: int) -> float:
    """1, 2, 4 ... MAX_RETRY_BACKOFF seconds, with full jitter (as Celery's own)."""
    return random.uniform(0, min(MAX_RETRY_BACKOFF, 2.0 ** retries))  # noqa: S311 -- jitter, not crypto


def _open(address: str, host: str, deploy_id: str) -> tuple[HostRuntime, Coordinator, str, DeployRecord | None]:
    """What every step message starts with: this host's runtime, the registry, the
    target's local name and the deploy's journal record. A target this host does not
    define ends the deploy ``rejected`` in Redis, then raises UnknownTarget."""
    rt = _runtime_for(host)
    co = coordinator()
    try:
        target = _local_name(address, host)
        return rt, co, target, rt.record(target, deploy_id)
    except UnknownTarget as err:
        co.finish_unstarted(deploy_id, "rejected", str(err))
        raise


def _run(task: Task, step: str, address: str, host: str, deploy_id: str,
         call: Callable[[HostRuntime, str], DeployRecord]) -> dict[str, Any]:
    rt, co, target, rec = _open(address, host, deploy_id)
    if step != "stage" and (rec is None or not _forward(rec)):
        # A late or redelivered message: the deploy ended (or is being rolled back, or
        # never reached this host). Say so in Redis, touch nothing.
        if rec is None:
            co.finish_unstarted(deploy_id, "rejected", f"deploy {deploy_id} is unknown on host {rt.host} "
                                "(its stage never ran here)")
        _after(rec)
        task.request.chain = None
        return _summary(rec, step, "deploy already ended" if rec and rec.finished else
                        "deploy is rolling back" if rec else "deploy unknown on this host")
    if _redelivered(task) and co.deliveries(deploy_id, step, int(task.request.retries or 0)) > MAX_DELIVERIES:
        raise StepFailed(f"{step} was redelivered more than {MAX_DELIVERIES} times (its worker kept dying)")
    try:
        rec = call(rt, target)
    except TargetBusy as err:
        budget = rt.cfg.busy_retries
        retries = int(task.request.retries or 0)
        unstarted = step == "stage" and rt.record(target, deploy_id) is None
        if retries < budget:
            if unstarted:  # nothing touched: until the next try, its client may still cancel it
                co.let_go(deploy_id)
            raise task.retry(exc=err, countdown=_backoff(retries), max_retries=budget) from None
        if unstarted:
            msg = f"cancelled: {err}; still busy after {budget} retries; nothing was touched"
            co.finish_unstarted(deploy_id, "rejected", msg, reason="busy")
            raise Rejected(msg) from None
        raise StepFailed(f"{step}: {err}; still busy after {budget} retries") from None
    except MailTLSError:
        after = rt.record(target, deploy_id)
        _after(after)
        _ended(task, after)  # ended (rejected, conflict): the chain stops here, as a failure
        raise
    except Exception as err:
        after = rt.record(target, deploy_id)
        if after is None:  # died before the journal knew it: nothing was touched, end it visibly
            co.finish_unstarted(deploy_id, "rejected", f"internal error in {step}: {type(err).__name__}: {err}")
        else:
            _after(after)
        raise
    _after(rec)
    if rec.finished and rec.outcome != "rejected":
        task.request.chain = None  # unchanged, or deployed at its last step: nothing follows
    _ended(task, rec)
    return _summary(rec, step)


def _redelivered(task: Task) -> bool:
    """A message put back after a lost worker (kombu marks it): only those are counted,
    so a deploy's normal path pays no Redis round trip for the bound."""
    info = task.request.delivery_info or {}
    return bool(info.get("redelivered"))


def _forward(rec: DeployRecord) -> bool:
    return not rec.finished and rec.phase != "rolling_back"


@app.task(bind=True, base=StepTask, name="mailtls.deploy")
def deploy(self: Task, *, target: str, host: str, deploy_id: str, rollout: str | None = None) -> dict[str, Any]:
    """The root of one deploy on its host: sends the steps, chained, as its children
    (with ``mailtls.rollback`` as their errback), so Flower shows a deploy as one tree."""
    _runtime_for(host)
    refs = {"target": target, "host": host, "deploy_id": deploy_id}
    shown = readable(target, deploy_id)

    def step(name: str) -> Any:
        return app.signature(f"mailtls.{name}", kwargs=refs, immutable=True).set(argsrepr=shown, kwargsrepr="")

    chain(step("stage"), step("validate"), step("commit"), step("reload"), step("verify"), app=app).apply_async(
        link_error=step("rollback"))
    return {"step": "deploy", "target": target, "deploy_id": deploy_id, "rollout": rollout,
            "note": "steps sent; how the deploy ends: its last row (verify, or rollback)"}


@app.task(bind=True, base=StepTask, name="mailtls.stage")
def stage(self: Task, *, target: str, host: str, deploy_id: str, fence: int | None = None) -> dict[str, Any]:
    """Open the sealed, signed envelope on this host and stage its bundle.

    The envelope waits in Redis beside the message (never in the task's arguments);
    the fence used is the one inside its signed header. ``fence`` in a message, if
    any, must agree with it."""
    co = coordinator()
    claim, envelope = co.claim_with_envelope(deploy_id)
    if claim != "started":
        raise Rejected(f"deploy {deploy_id} was cancelled by its client before it started")
    rt = _runtime_for(host)
    name = _local_name(target, host)
    existing = rt.record(name, deploy_id)
    if envelope is None and existing is None:
        msg = (f"deploy {deploy_id}: its envelope is gone from Redis (expired, or Redis lost its data); "
               "nothing was touched")
        co.finish_unstarted(deploy_id, "rejected", msg, reason="envelope_missing")
        raise Rejected(msg)
    try:
        out = _run(self, "stage", target, host, deploy_id,
                   lambda rt, n: rt.stage_envelope(n, deploy_id, envelope, fence=fence))
    except EnvelopeError as err:
        log.warning("deploy %s of %s: envelope refused: %s", deploy_id, target, err)
        co.finish_unstarted(deploy_id, "rejected", str(err))
        co.drop_envelope(deploy_id)
        raise
    except Rejected:
        co.drop_envelope(deploy_id)
        raise
    co.drop_envelope(deploy_id)
    return out


def _step_task(step: str) -> Any:
    @app.task(bind=True, base=StepTask, name=f"mailtls.{step}")
    def run_step(self: Task, *, target: str, host: str, deploy_id: str) -> dict[str, Any]:
        return _run(self, step, target, host, deploy_id, lambda rt, n: rt.step(step, n, deploy_id))

    run_step.__doc__ = f"The {step} step of a deploy (references only: target and deploy id)."
    return run_step


validate = _step_task("validate")
commit = _step_task("commit")
reload = _step_task("reload")
verify = _step_task("verify")


@app.task(bind=True, base=StepTask, name="mailtls.batch", time_limit=BATCH_TIME_LIMIT,
          soft_time_limit=BATCH_TIME_LIMIT - 60)
def batch(self: Task, *, host: str, batch_id: str, members: list[dict[str, str]],
          rollout: str | None = None) -> dict[str, Any]:
    """Several certificates to this host as one deploy (``deploy_many``): one stage per
    member, one validate, one build per SNI table, one reload per daemon, a verify
    per name (``core.batch``, run here from start to end). ``members``: each one's
    ``target`` address and ``deploy_id``; each has its own record, envelope and fence
    in Redis, as a deploy of its own has, and ends with its own outcome.

    A member its client cancelled is left out; one whose envelope or target is
    refused ends ``rejected`` alone. Busy (another live deploy owns a member's files):
    retried with backoff, within the host's busy_retries, then every member not
    staged ends ``rejected`` (busy), nothing touched. Redelivered after a lost worker:
    recovery has ended what the lost run had staged; the run converges from there.
    Then a ``mailtls.batch_member`` per member, its child: Flower shows a row per
    certificate, with its own outcome."""
    rt = _runtime_for(host)
    co = coordinator()
    addresses: dict[str, str] = {}
    taken: list[tuple[str, str, Any]] = []
    for m in members:
        address, deploy_id = str(m.get("target", "")), str(m.get("deploy_id", ""))
        try:
            name = _local_name(address, host)
            claim, envelope = co.claim_with_envelope(deploy_id)
        except Rejected as err:
            co.finish_unstarted(deploy_id, "rejected", str(err))
            continue
        if claim != "started":
            continue  # cancelled by its client, who has ended it
        addresses[deploy_id] = address
        taken.append((name, deploy_id, envelope))
    if _redelivered(self) and co.deliveries(batch_id, "batch", int(self.request.retries or 0)) > MAX_DELIVERIES:
        sweep(rt, co)  # each member as recovery left it; the rest never staged
        for name, deploy_id, _ in taken:
            if _record_of(rt, name, deploy_id) is None:
                co.finish_unstarted(deploy_id, "rejected", f"batch {batch_id} was redelivered more than "
                                    f"{MAX_DELIVERIES} times (its worker kept dying); nothing was touched")
        raise StepFailed(f"batch {batch_id} was redelivered more than {MAX_DELIVERIES} times")
    chosen, refused = rt.open_batch(taken)
    for deploy_id, why in refused.items():  # ended now: a busy retry below must not hold them
        log.warning("batch %s: deploy %s of %s refused: %s", batch_id, deploy_id, addresses[deploy_id], why)
        co.finish_unstarted(deploy_id, "rejected", why)
    try:
        records = rt.run_batch(batch_id, chosen)
    except TargetBusy as err:
        budget = rt.cfg.busy_retries
        retries = int(self.request.retries or 0)
        if retries < budget:
            for name, deploy_id, _ in taken:  # nothing of them touched: their clients may still cancel
                if _record_of(rt, name, deploy_id) is None:
                    co.let_go(deploy_id)
            raise self.retry(exc=err, countdown=_backoff(retries), max_retries=budget) from None
        msg = f"cancelled: {err}; still busy after {budget} retries; nothing was touched"
        for name, deploy_id, _ in taken:
            if _record_of(rt, name, deploy_id) is None:
                co.finish_unstarted(deploy_id, "rejected", msg, reason="busy")
        raise Rejected(msg) from None
    except Exception as err:  # no member may be left "queued" in Redis: its client could not cancel it
        log.exception("batch %s failed", batch_id)
        for name, deploy_id, _ in taken:
            rec = _record_of(rt, name, deploy_id)
            if rec is None:
                co.finish_unstarted(deploy_id, "rejected", f"batch {batch_id}: internal error before this "
                                    f"certificate staged ({type(err).__name__}); nothing was touched")
            else:
                _after(rec)  # an unfinished one: recovery ends it, and the sweep publishes that
        raise
    outcomes: dict[str, str | None] = {}
    for _, deploy_id, _ in taken:
        rec = records.get(deploy_id)
        if rec is not None:
            _after(rec)
        elif deploy_id not in refused:  # taken in by an earlier run whose record is gone
            co.finish_unstarted(deploy_id, "rejected", f"batch {batch_id}: not staged by this run; nothing was "
                                "touched")
        co.drop_envelope(deploy_id)
        address = addresses[deploy_id]
        outcomes[address] = rec.outcome if rec is not None else "rejected"
        kwargs = {"target": address, "host": host, "deploy_id": deploy_id, "batch_id": batch_id}
        app.signature("mailtls.batch_member", kwargs=kwargs, immutable=True).set(
            argsrepr=readable(address, deploy_id), kwargsrepr="").apply_async(task_id=member_task_id(deploy_id))
    return {"step": "batch", "batch_id": batch_id, "rollout": rollout, "members": outcomes}


def _record_of(rt: HostRuntime, name: str, deploy_id: str) -> DeployRecord | None:
    """A member's journal record, or None (none, or a target this host no longer defines)."""
    try:
        return rt.record(name, deploy_id)
    except MailTLSError:
        return None


def member_task_id(deploy_id: str) -> str:
    """The Celery id of a batch member's row: one per member, whatever redelivers the batch."""
    return f"{deploy_id}.member"


@app.task(bind=True, name="mailtls.batch_member", acks_late=False, ignore_result=False)
def batch_member(self: Task, *, target: str, host: str, deploy_id: str, batch_id: str) -> dict[str, Any]:
    """One certificate of a batch, as it ended: its record published again (a no-op
    when the batch already did) and returned, so Flower has a row per certificate. A
    member that did not deploy fails this task, as a single deploy's failing step
    fails: Flower's state column flags it."""
    _, co, _, rec = _open(target, host, deploy_id)
    if rec is None:
        data = co.get_record(deploy_id) or {}
        raise Rejected(f"batch {batch_id}: {data.get('error') or 'not staged on this host'}")
    _after(rec)
    if not rec.finished:
        raise StepFailed(f"unfinished (phase {rec.phase}): recovery finishes it; follow it with: "
                         f"mailtls status {deploy_id}")
    if rec.outcome in ("rejected", "rolled_back", "failed"):
        error = rec.error or rec.outcome
        raise (Rejected if rec.outcome == "rejected" else StepFailed)(f"{rec.outcome}: {error}")
    return _summary(rec, "batch", f"batch {batch_id}")


@app.task(bind=True, base=StepTask, name="mailtls.rollback", max_retries=MAX_RETRIES, throws=(DeployEnded,))
def rollback(self: Task, *, target: str, host: str, deploy_id: str) -> dict[str, Any]:
    """Compensation, sent by the chain's link_error when any step failed for good.

    Restores the old files only if something was committed; for a deploy that never
    reached this host's journal it makes sure Redis has an outcome. It is the row
    that ends a deploy that did not deploy: it fails with ``DeployEnded`` naming the
    outcome and the reason, so Flower's list says how the deploy ended.
    """
    try:
        rt, co, target, rec = _open(target, host, deploy_id)
    except UnknownTarget as err:
        raise DeployEnded(f"rejected: {err}") from None
    if rec is None:
        why = f"deploy {deploy_id} failed before it reached host {rt.host}; nothing was touched"
        co.finish_unstarted(deploy_id, "rejected", why)
        ended = co.get_record(deploy_id) or {}
        raise DeployEnded(f"{ended.get('outcome') or 'rejected'}"
                          + (f" ({ended['reason']})" if ended.get("reason") else "")
                          + f": {ended.get('error') or why} [deploy {deploy_id}]")
    if rec.finished:
        _after(rec)
    else:
        try:
            rec = rt.rollback(target, deploy_id)
        except TargetBusy as err:  # a step of an overlapping deploy is running: come back
            raise self.retry(exc=err, countdown=_backoff(int(self.request.retries or 0))) from None
        _after(rec)
    _tell_root(self, rec)
    if rec.outcome in ("deployed", "unchanged"):  # (an errback never ends one so; if it did: say so, green)
        return _summary(rec, "rollback", "nothing to roll back")
    raise DeployEnded(f"{ending(rec)} [deploy {rec.deploy_id}]")


@app.task(bind=True, name="mailtls.check", acks_late=False, ignore_result=False)
def check(self: Task, *, target: str, host: str, check_id: str) -> dict[str, Any]:
    """``deploy --check`` on this host: every check a deploy runs, nothing changed
    (``core.check``). Returns the report (names, keys, chains, listeners; never key
    material); its envelope is dropped from Redis as soon as it is read."""
    rt = _runtime_for(host)
    co = coordinator()
    envelope = co.get_envelope(check_id)
    co.drop_envelope(check_id)
    name = _local_name(target, host)
    try:
        report = rt.check_envelope(name, check_id, envelope)
    except (EnvelopeError, UnknownTarget) as err:
        from ..core.check import CheckReport

        report = CheckReport(target=target, host=host, outcome="rejected", error=str(err))
    return dict(report.model_dump(mode="json"))


@app.task(bind=True, name="mailtls.notify", acks_late=True, max_retries=None, time_limit=120, soft_time_limit=100)
def notify(self: Task, *, host: str, notice: dict[str, Any], only: list[int] | None = None) -> dict[str, Any]:
    """Deliver a notice of this host's to the URLs its own config routes its kind to
    (the message names none: it carries the notice and, on a retry, which of the
    config's URLs still failed). Retried with backoff up to ``notify.retries``."""
    from ..notify import deliver

    rt = _runtime_for(host)
    n = Notice.from_data(notice)
    urls = rt.cfg.notify.urls_for(n.kind)
    pending = [i for i in (only if only is not None else range(len(urls))) if 0 <= i < len(urls)]
    got = deliver([urls[i] for i in pending], n)
    failed = [i for i in pending if urls[i] in got.failed]
    retries = int(self.request.retries or 0)
    if failed and retries < rt.cfg.notify.retries:
        log.warning("notice %r: %d URL(s) failed (%s); retrying", n.title, len(failed), ", ".join(got.shown_failed))
        raise self.retry(kwargs={"host": host, "notice": notice, "only": failed},
                         countdown=_backoff(retries + 1), max_retries=rt.cfg.notify.retries)
    if failed:
        log.error("notice %r: gave up after %d tries: %s", n.title, retries + 1, ", ".join(got.shown_failed))
    return {"step": "notify", "kind": n.kind, "sent": got.sent, "failed": got.shown_failed}


# send_events=False: an audit every audit_interval per host would crowd the deploys out
# of Flower's list; its results are in `mailtls audit` and the metrics.
@app.task(bind=True, name="mailtls.audit", acks_late=False, ignore_result=False, send_events=False)
def audit(self: Task, *, host: str) -> dict[str, Any]:
    """Probe every target of this host and record what it serves (see core/audit.py)."""
    rt = _runtime_for(host)
    co = coordinator()
    results = rt.audit()
    for a in results:
        co.put_audit(a.target, a.model_dump(mode="json"))
        expiring = for_expiry(a, rt.cfg.notify.expiring_days)
        if expiring is not None and rt.cfg.notify.urls_for("expiring") and co.once(f"notified:expiring:{a.target}",
                                                                                     EXPIRY_NOTICE_EVERY):
            _notify(rt, expiring)
        expiry = {la.endpoint: _seconds_until(la.served_not_after) for la in a.listeners if la.served_not_after}
        if a.not_after:
            expiry["disk"] = _seconds_until(a.not_after)
        metrics.audited(rt.host, a.target.split("/", 1)[1], expiry, a.drift)
        if a.status != "ok":
            log.warning("audit %s: %s: %s", a.target, a.status.upper(), "; ".join(a.issues))
    return {"worst": worst(results), "issues": sum(len(a.issues) for a in results), "step": "audit", "host": host,
            "targets": len(results)}


def _seconds_until(iso: str) -> float:
    return (dt.datetime.fromisoformat(iso) - dt.datetime.now(dt.UTC)).total_seconds()


# ----------------------------------------------------------------- worker lifecycle
def sweep(rt: HostRuntime, co: Coordinator, *, full_scan: bool = False) -> list[DeployRecord]:
    """Finish dead deploys, then publish every ending Redis has not heard of.

    An outbox entry goes only once Redis has its record: one whose record is not
    (yet) finished stays (``core.steps.phases.finish`` writes the entry just before the record)."""
    done = rt.recover(full_scan=full_scan)
    for target, deploy_id in rt.journal.outbox():
        try:
            rec = rt.journal.load(target, deploy_id)
        except MailTLSError as err:
            log.warning("outbox entry %s/%s unreadable: %s", target, deploy_id, err)
            continue
        if rec is None and rt.journal.outbox_age(target, deploy_id) > OUTBOX_ORPHAN_AGE:
            rt.journal.outbox_done(target, deploy_id)  # its record is long gone: nothing to say
        if rec is None or not rec.finished:
            continue
        co.publish(rec)
        _published(rt, rec)
    for name in {r.target for r in done}:
        co.publish_target(rt.inventory_entry(name))
    return done


def instance_token() -> str:
    """This worker process: ``machine|boot:pid:start``, where machine is the machine id
    and PID namespace. It tells a restart on the same machine (whose predecessor can be
    checked by pid) from another machine, container or cloned image claiming the same
    host name (which can only take over once the claim has lapsed). Without a machine
    id it is ``unknown``: never taken for the same machine."""
    try:
        with open("/etc/machine-id") as f:
            machine = f.read().strip() or "unknown"
    except OSError:
        machine = "unknown"
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = 0
    return f"{machine}:{pidns}|{process_token()}"


def register(rt: HostRuntime, co: Coordinator) -> None:
    """Claim this host in the registry (HostTaken if another live worker serves it)."""
    if _state.get("instance"):
        return
    instance = instance_token()
    co.register_host(rt.host, instance, rt.inventory(), alive=process_alive)
    _state["instance"] = instance


def _background(stop: threading.Event) -> None:
    rt, co = runtime(), coordinator()
    clock = rt.journal.clock
    next_sweep = 0.0
    next_audit = clock() + min(rt.cfg.audit_interval, 30.0)
    while not stop.is_set():
        try:
            state = co.heartbeat(rt.host, _state["instance"])
            if state == 0:
                log.critical("another worker has taken over host %s: this one stops", rt.host)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if state == 2:  # Redis forgot us (restarted empty, or a long pause): say again what we serve
                co.register_host(rt.host, _state["instance"], rt.inventory(), alive=process_alive)
                log.warning("registered host %s again (its registry entries were gone)", rt.host)
            metrics.heartbeat(rt.host)
        except Exception as err:  # noqa: BLE001 -- the heartbeat must outlive any error
            log.warning("registry heartbeat failed: %s", err)
        if clock() >= next_sweep:
            try:
                sweep(rt, co)
            except Exception:  # this thread is the host's recovery: it must outlive any error
                log.exception("recovery sweep failed (will retry)")
            next_sweep = clock() + rt.cfg.recovery_interval
        if clock() >= next_audit:
            try:
                audit.apply_async(kwargs={"host": rt.host}, queue=queue_for(rt.host), argsrepr=rt.host)
            except Exception as err:  # noqa: BLE001
                log.warning("could not schedule the audit: %s", err)
            next_audit = clock() + rt.cfg.audit_interval
        stop.wait(min(HEARTBEAT_INTERVAL, rt.cfg.recovery_interval, rt.cfg.audit_interval))


def take_back_unacked(queue: str) -> int:
    """Put back on ``queue`` every message a dead predecessor of this worker had taken.

    Redis hands an unacknowledged message to another consumer only after the
    visibility timeout (hours: longer than any step). But a host has one worker (the
    registry refuses a second live one), so at start every unacked message of its own
    queue belonged to a worker that is gone: a step it was running when it was killed,
    or the next one it had prefetched. Taken back now, a deploy caught between two
    steps continues at once instead of waiting for its lease. If the predecessor was
    only paused, a step may run twice: steps are idempotent, and the journal decides."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        client = channel.client
        tags = []
        for tag, raw in client.hgetall(channel.unacked_key).items():
            try:
                _, _, routing_key = json.loads(raw)
            except (ValueError, TypeError):
                continue
            if routing_key == queue:
                tags.append(tag.decode() if isinstance(tag, bytes) else tag)
        for tag in tags:
            channel.qos.restore_by_tag(tag, leftmost=True)
    return len(tags)


@worker_init.connect
def _on_worker_init(**_: Any) -> None:
    """Before consuming: claim the host (or stop), finish dead deploys and publish
    endings, take back what a dead predecessor held, start metrics and the heartbeat."""
    rt, co = runtime(), coordinator()
    try:
        register(rt, co)
    except HostTaken as err:
        log.critical("%s", err)
        raise SystemExit(1) from None
    if rt.cfg.metrics_port:
        metrics.prepare(rt.cfg.state_dir)
        metrics.serve(rt.cfg.metrics_port)
        metrics.init_series(rt.host, list(rt.cfg.targets))
        log.info("metrics on http://127.0.0.1:%d/metrics", rt.cfg.metrics_port)
    try:
        sweep(rt, co, full_scan=True)
    except Exception:  # never start without the background recovery below
        log.exception("start-up recovery incomplete (the periodic sweep retries)")
    try:
        taken = take_back_unacked(queue_for(rt.host))
        if taken:
            log.warning("took back %d message(s) a previous worker of host %s had not finished", taken, rt.host)
    except Exception:
        log.exception("could not take back unacknowledged messages (Redis redelivers them after the "
                      "visibility timeout)")
    stop = threading.Event()
    _state["background_stop"] = stop
    threading.Thread(target=_background, args=(stop,), name="mailtls-heartbeat", daemon=True).start()
    _cross_check(rt)
    log.info("mailtls worker for host %s serving targets: %s", rt.host, ", ".join(rt.cfg.targets) or "none")


def _cross_check(rt: HostRuntime) -> None:
    """Ask each daemon instance the targets name what it serves, and say where the two
    disagree (``check-config --strict`` refuses it; a worker only warns). Here, before
    the pool forks, not in a thread of its own beside the fork: with such a thread, a
    pool child twice sat in a step until the test gave up (test_protocol's paused
    worker), cause not pinned down; without it nothing runs beside the fork but what
    always did. Each daemon tool has COMMAND_TIMEOUT: a hanging one delays the start,
    boundedly."""
    from ..core.discover import cross_check

    try:
        for warning in cross_check(rt.cfg):
            log.warning("%s", warning)
    except Exception:  # a warning that could not be made must not stop a worker
        log.exception("could not compare the targets with the daemons' configuration")


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    stop = _state.get("background_stop")
    if stop is not None:
        stop.set()
    instance, rt = _state.get("instance"), _state.get("runtime")
    if instance and rt is not None:
        try:
            coordinator().release_host(rt.host, instance)
        except Exception as err:  # noqa: BLE001 -- the claim lapses on its own within its TTL
            log.warning("could not release host %s in the registry: %s", rt.host, err)


@worker_process_shutdown.connect
def _on_pool_child_exit(pid: int | None = None, **_: Any) -> None:
    """A pool child going away: its live gauges leave /metrics with it."""
    metrics.child_exited(pid or os.getpid())

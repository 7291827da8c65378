"""The Celery tasks: one per step, plus the compensating ``mailtls.rollback``.

Tasks are thin. They check the message belongs to this host, coordinate through
Redis (target lock, claim, redelivery bound), call the host runtime, publish the
journal record to Redis, and translate errors: transient ones are retried with
backoff and jitter, permanent ones fail the task so the chain's ``link_error`` sends
``mailtls.rollback`` to the same host as its own message. They never see a file.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import redis
from celery import Task
from celery.signals import worker_init, worker_shutdown

from .app import MAX_RETRY_BACKOFF, app
from .config import load_config
from .coordination import Coordinator
from .envelope import EnvelopeError
from .errors import MailTLSError, Rejected, StepFailed, Transient, UnknownTarget
from .host import HostRuntime
from .journal import DeployRecord

log = logging.getLogger("mailtls.tasks")

MAX_DELIVERIES = 3          # the same message redelivered after a lost worker, at most
HEARTBEAT_INTERVAL = 10.0

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


def coordinator() -> Coordinator:
    co = _state.get("coordinator")
    if co is None:
        co = _state["coordinator"] = Coordinator(str(app.conf.broker_url))
    return co


def _summary(rec: DeployRecord | None, step: str, note: str | None = None) -> dict[str, Any]:
    """What a task returns (and the result backend stores): references, never bytes."""
    out: dict[str, Any] = {"step": step}
    if rec is not None:
        out.update(deploy_id=rec.deploy_id, target=rec.target, phase=rec.phase, outcome=rec.outcome,
                   fingerprint_sha256=rec.fingerprint)
    if note:
        out["note"] = note
    return out


def _after(rec: DeployRecord | None) -> None:
    """Publish the record; when the deploy has ended, free the target and refresh the registry."""
    if rec is None:
        return
    co = coordinator()
    co.publish(rec)
    if rec.finished:
        co.release(rec.target, rec.deploy_id)
        rt = runtime()
        co.publish_host(rt.host, rt.inventory())


class StepTask(Task):  # type: ignore[misc]
    """Reliability defaults shared by every step."""

    acks_late = True
    reject_on_worker_lost = True
    autoretry_for = (Transient, redis.ConnectionError, redis.TimeoutError)
    max_retries = 10
    retry_backoff = 1
    retry_backoff_max = MAX_RETRY_BACKOFF
    retry_jitter = True
    typing = True


def _run(task: Task, step: str, target: str, host: str, deploy_id: str,
         call: Callable[[HostRuntime], DeployRecord]) -> dict[str, Any]:
    rt = _runtime_for(host)
    co = coordinator()
    try:
        rec = rt.record(target, deploy_id)
    except UnknownTarget as err:
        co.finish_unstarted(deploy_id, "rejected", str(err))
        return {"step": step, "deploy_id": deploy_id, "outcome": "rejected", "note": str(err)}
    if step != "stage" and (rec is None or rec.finished):
        return _summary(rec, step, "deploy already ended" if rec else "deploy unknown on this host")
    if co.deliveries(deploy_id, step, int(task.request.retries or 0)) > MAX_DELIVERIES:
        raise StepFailed(f"{step} was redelivered more than {MAX_DELIVERIES} times (its worker kept dying)")
    co.acquire(target, deploy_id)  # TargetBusy -> retried later; never runs in parallel
    task.send_event("task-progress", deploy_id=deploy_id, target=target, step=step)
    task.update_state(state="PROGRESS", meta={"deploy_id": deploy_id, "target": target, "step": step})
    try:
        rec = call(rt)
    except Rejected:
        rec = rt.record(target, deploy_id)
        _after(rec)
        if rec is not None and rec.finished:
            return _summary(rec, step)  # the deploy ended (rejected); later steps are no-ops
        raise
    except MailTLSError:
        _after(rt.record(target, deploy_id))
        raise
    except Exception as err:
        after = rt.record(target, deploy_id)
        if after is None:  # died before the journal knew it: nothing was touched, end it visibly
            co.finish_unstarted(deploy_id, "rejected", f"internal error in {step}: {type(err).__name__}: {err}")
            co.release(target, deploy_id)
        else:
            _after(after)
        raise
    _after(rec)
    return _summary(rec, step)


@app.task(bind=True, base=StepTask, name="mailtls.stage")
def stage(self: Task, *, target: str, host: str, deploy_id: str, fence: int | None = None,
          envelope: dict[str, Any]) -> dict[str, Any]:
    """Open the sealed, signed envelope on this host and stage its bundle.

    The only task given material, and only as ciphertext for this host's key."""
    if coordinator().claim(deploy_id, "started") != "started":
        return {"step": "stage", "deploy_id": deploy_id, "note": "cancelled by the client before it started"}
    try:
        return _run(self, "stage", target, host, deploy_id,
                    lambda rt: rt.stage_envelope(target, deploy_id, envelope, fence=fence))
    except EnvelopeError as err:
        log.warning("deploy %s of %s: envelope refused: %s", deploy_id, target, err)
        coordinator().finish_unstarted(deploy_id, "rejected", str(err))
        return {"step": "stage", "deploy_id": deploy_id, "outcome": "rejected", "note": str(err)}


def _step_task(step: str) -> Any:
    @app.task(bind=True, base=StepTask, name=f"mailtls.{step}")
    def run_step(self: Task, *, target: str, host: str, deploy_id: str) -> dict[str, Any]:
        return _run(self, step, target, host, deploy_id, lambda rt: rt.step(step, target, deploy_id))

    run_step.__doc__ = f"The {step} step of a deploy (references only: target and deploy id)."
    return run_step


validate = _step_task("validate")
commit = _step_task("commit")
reload = _step_task("reload")
verify = _step_task("verify")


@app.task(bind=True, base=StepTask, name="mailtls.rollback", max_retries=10)
def rollback(self: Task, *, target: str, host: str, deploy_id: str) -> dict[str, Any]:
    """Compensation, sent by the chain's link_error when any step failed for good.

    Restores the old files only if something was committed; a no-op for a deploy
    that already ended (e.g. rejected before commit).
    """
    rt = _runtime_for(host)
    rec = rt.record(target, deploy_id)
    if rec is None or rec.finished:
        _after(rec)
        return _summary(rec, "rollback", "nothing to roll back")
    self.send_event("task-progress", deploy_id=deploy_id, target=target, step="rollback")
    rec = rt.rollback(target, deploy_id)
    _after(rec)
    return _summary(rec, "rollback")


# ----------------------------------------------------------------- worker lifecycle
def _heartbeat(stop: threading.Event) -> None:
    rt, co = runtime(), coordinator()
    while not stop.is_set():
        try:
            co.publish_host(rt.host, rt.inventory())
        except (redis.RedisError, OSError) as err:
            log.warning("registry heartbeat failed: %s", err)
        stop.wait(HEARTBEAT_INTERVAL)


@worker_init.connect
def _on_worker_init(**_: Any) -> None:
    """Before consuming: recover interrupted deploys, then announce this host."""
    rt = runtime()
    for rec in rt.recover():
        log.warning("recovered interrupted deploy %s of %s: %s", rec.deploy_id, rec.target, rec.outcome)
        try:
            _after(rec)
        except redis.RedisError as err:
            log.warning("could not publish recovered deploy %s: %s", rec.deploy_id, err)
    stop = threading.Event()
    _state["heartbeat_stop"] = stop
    threading.Thread(target=_heartbeat, args=(stop,), name="mailtls-heartbeat", daemon=True).start()
    log.info("mailtls worker for host %s serving targets: %s", rt.host, ", ".join(rt.cfg.targets) or "none")


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    stop = _state.get("heartbeat_stop")
    if stop is not None:
        stop.set()

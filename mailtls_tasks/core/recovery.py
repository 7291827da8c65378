"""Finishing deploys whose owner died: roll forward when provably served, else back.

Runs on worker start, periodically in the worker, before every local run, and as
``mailtls recover`` (a boot-time unit runs it before Postfix and Dovecot start). It
reads the owner entries (the deploys in flight), not every target's history, so its
cost does not grow with the number of targets. See docs/protocol.md, "Recovery".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from ..errors import JournalError, TargetBusy
from .journal import DeployRecord, Journal, Owner
from .ownership import is_dead
from .steps.context import StepContext, target_reals
from .steps.phases import finish
from .steps.rollback import rollback
from .steps.stage import tombstone
from .steps.verify import finish_forward

log = logging.getLogger("mailtls.recovery")

INTERRUPTED = "the deploy was interrupted before it finished"


def recover_deploy(contexts: Mapping[str, StepContext], journal: Journal, target: str,
                   deploy_id: str, *, force: bool = False, boot: bool = False) -> DeployRecord | None:
    """Finish one deploy if it is dead (or ``force``: the operator says so), holding
    all its locks. Returns the finished record, or None if it was alive or gone."""
    rec = journal.load(target, deploy_id)
    if rec is None:
        return None
    if rec.batch and not rec.finished:
        return _recover_batch(contexts, journal, rec, force=force, boot=boot)
    ctx = contexts.get(target)
    try:
        with journal.lock_files(rec.reals, timeout=0.0):
            rec = journal.load(target, deploy_id)
            if rec is None:
                return None
            if rec.finished:
                for real in rec.reals:  # a stale owner entry left by a crash after finishing
                    journal.clear_owner(real, deploy_id, target)
                return None
            if not (force or is_dead(journal, rec)):
                return None
            if ctx is None:
                log.error("deploy %s of %s is unfinished but target %r is no longer configured: "
                          "left for an operator", deploy_id, target, target)
                return None
            # at boot nothing is served yet: a roll-forward cannot be proven, so back
            done = None if boot else finish_forward(ctx, deploy_id)
            if done is None:
                done = rollback(ctx, deploy_id, error=INTERRUPTED, reason="interrupted", boot=boot)
            log.warning("recovered deploy %s of %s: %s (%s)", deploy_id, target, done.outcome, done.reason)
            return done
    except TargetBusy:
        return None  # one of its steps is running: alive by definition


def _recover_batch(contexts: Mapping[str, StepContext], journal: Journal, rec: DeployRecord, *, force: bool,
                   boot: bool) -> DeployRecord | None:
    """A member of a batch ends with the batch: as the batch's decision says when it
    wrote one (a crash while finishing its members), else every unfinished member
    back, those carrying an SNI table first (never rolled forward one by one: a
    member's names are served from a table the others' files went into too)."""
    batch_id = rec.decision_id
    members = {n: journal.load(n, rec.member_id(n)) for n in rec.batch}
    reals = sorted({r for m in members.values() if m is not None for r in m.reals})
    try:
        with journal.lock_files(reals, timeout=0.0):
            members = {n: journal.load(n, rec.member_id(n)) for n in rec.batch}
            pending = {n: m for n, m in members.items() if m is not None and not m.finished}
            if rec.target not in pending:
                return None
            if not (force or all(is_dead(journal, m) for m in pending.values())):
                return None
            missing = [n for n in pending if n not in contexts]
            if missing:
                log.error("batch %s is unfinished but target(s) %s are no longer configured: left for an operator",
                          batch_id, ", ".join(missing))
                return None
            decision = journal.decision(batch_id)
            order = sorted(pending, key=lambda n: (not any(e.role == "sni_map" for e in pending[n].files), n))
            for n in order:
                ctx, m = contexts[n], pending[n]
                outcome = (decision or {}).get(n)
                if outcome == "deployed":
                    finish(ctx, m, "deployed", reason="recovered")
                elif outcome == "rolled_back":  # rolled back alone before the decision was written
                    finish(ctx, m, "rolled_back", m.error)
                else:
                    rollback(ctx, m.deploy_id, error=INTERRUPTED, reason="interrupted", boot=boot)
                log.warning("recovered batch %s member %s: %s", batch_id, n, outcome or "rolled back")
            return journal.load(rec.target, rec.deploy_id)
    except TargetBusy:
        return None  # one of its steps is running: alive by definition


def _clear_if_stale(journal: Journal, owner: Owner) -> None:
    """An owner entry whose deploy has no record (died while claiming) or has finished
    (died before releasing) owns nothing: remove it, under the file's lock."""
    try:
        with journal.lock_files([owner.path], timeout=0.0):
            current = journal.owner_of(owner.path)
            if current is None or current.deploy_id != owner.deploy_id:
                return
            rec = journal.load(owner.target, owner.deploy_id)
            if rec is None or rec.finished:
                journal.clear_owner(owner.path, owner.deploy_id, owner.target)
    except (TargetBusy, JournalError):
        return


def _abandoned(contexts: Mapping[str, StepContext], journal: Journal, target: str) -> list[DeployRecord]:
    """Deploys that died before their first record (only an intent left): end them,
    under the target's locks (a stage still running holds them), if the runner is gone."""
    ctx = contexts.get(target)
    if ctx is None:
        return []
    out = []
    for deploy_id, origin, runner in journal.abandoned(target):
        if journal.alive(runner):
            continue
        try:
            with journal.lock_files(target_reals(ctx.target), timeout=0.0):
                if journal.load(target, deploy_id) is not None:
                    continue
                out.append(tombstone(ctx, deploy_id, "distributed" if origin == "distributed" else "local"))
                log.warning("deploy %s of %s died before it was staged: ended rolled_back (interrupted)",
                            deploy_id, target)
        except TargetBusy:
            continue
    return out


def recover(contexts: Mapping[str, StepContext], journal: Journal, *, full_scan: bool = False,
            force: bool = False, boot: bool = False) -> list[DeployRecord]:
    """Finish every dead deploy on this host. Returns what it finished.

    ``full_scan`` also reads every configured target's records: for journals written
    before owner entries existed (once, at worker start and by ``mailtls recover``).
    """
    owners = journal.owners()
    candidates = {(o.target, o.deploy_id) for o in owners}
    for o in owners:
        _clear_if_stale(journal, o)
    if full_scan:
        for name in contexts:
            candidates.update((name, r.deploy_id) for r in journal.records(name) if not r.finished)
    done: list[DeployRecord] = []
    if full_scan:
        for name in contexts:
            try:
                done += _abandoned(contexts, journal, name)
            except Exception as err:  # noqa: BLE001 -- as above
                log.error("ending abandoned deploys of %s failed: %s", name, err)
    for target, deploy_id in sorted(candidates):
        try:
            rec = recover_deploy(contexts, journal, target, deploy_id, force=force, boot=boot)
        except Exception as err:  # noqa: BLE001 -- one deploy's trouble must not stop the others' recovery
            log.error("recovering deploy %s of %s failed: %s", deploy_id, target, err)
            continue
        if rec is not None:
            done.append(rec)
    return done

"""Who owns a target's real files, and whether that owner is still alive.

docs/protocol.md, "Is the owner alive?": judged only by someone holding at least one
of the owner's file locks, so the owner is certainly not inside a step right then.
A local deploy is dead when its process is; a distributed one when it died inside a
step (runner gone) or its lease ran out between steps; a batch's member when its run
has let go of its locks. "The lock is free" alone
never means dead.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Callable, Iterator

from ..errors import TargetBusy
from .journal import DeployRecord, Journal, Owner

MAX_TAKEOVERS = 8


def is_dead(journal: Journal, rec: DeployRecord) -> bool:
    """An unfinished deploy nobody will finish: its owner must be recovered."""
    if rec.finished:
        return False
    if rec.batch:
        # A batch runs from start to end in one process (a local run, or one worker's
        # task), holding every member's locks throughout; no later message continues
        # it. Whoever holds one of those locks (the only one who asks) knows that run
        # is over: its unfinished members are dead, whether or not its process lives
        # on (a worker's pool process runs the next task).
        return True
    if rec.origin == "local":
        return not journal.alive(rec.runner)
    if rec.in_step and not journal.alive(rec.runner):
        return True
    if not rec.in_step and rec.phase in ("committing", "rolling_back"):
        # A commit or rollback that stopped half-way with an error (not a crash): the
        # files may be mixed, and no forward message can move it. Finish it now rather
        # than at the end of its lease (the errback, if it comes, then finds it done).
        return True
    return rec.lease_until is None or journal.clock() >= rec.lease_until


def describe(rec: DeployRecord, journal: Journal) -> str:
    """How an operator reads "busy": who owns it, doing what, until when."""
    if rec.origin == "local":
        return f"deploy {rec.deploy_id} of target {rec.target!r} (a local run, phase {rec.phase})"
    lease = "-"
    if rec.lease_until is not None:
        left = rec.lease_until - journal.clock()
        until = dt.datetime.fromtimestamp(rec.lease_until, dt.UTC).isoformat(timespec="seconds")
        lease = f"until {until} ({left:.0f}s left)" if left > 0 else f"expired {-left:.0f}s ago"
    return (f"deploy {rec.deploy_id} of target {rec.target!r} (distributed, phase {rec.phase}, "
            f"lease {lease})")


def busy_message(journal: Journal, real: str) -> str:
    """Worded for a flock that stayed held: a step is running right now."""
    owner = journal.owner_of(real)
    rec = journal.load(owner.target, owner.deploy_id) if owner else None
    who = describe(rec, journal) if rec else "another deploy"
    return f"{real} is busy: a step of {who} is running on it"


def blockers(journal: Journal, reals: list[str], deploy_id: str, target: str | None = None) -> list[Owner]:
    """Other deploys owning any of ``reals`` (caller holds their locks).

    Clears stale entries (owner finished or gone); raises TargetBusy naming a live
    owner; returns the dead ones, which the caller must recover before claiming."""
    dead: dict[str, Owner] = {}
    for real in reals:
        owner = journal.owner_of(real)
        if owner is None or (owner.deploy_id == deploy_id and target in (None, owner.target)):
            continue
        rec = journal.load(owner.target, owner.deploy_id)
        if rec is None or rec.finished:
            journal.clear_owner(real, owner.deploy_id, owner.target)
            continue
        if not is_dead(journal, rec):
            busy = TargetBusy(f"{real} is owned by {describe(rec, journal)}; try again after it ends")
            busy.owned = True
            raise busy
        dead.setdefault(owner.deploy_id, owner)
    return list(dead.values())


@contextlib.contextmanager
def holding(journal: Journal, reals: list[str], deploy_id: str, *, timeout: float,
            recover: Callable[[Owner], object], on_wait: Callable[[str], None] | None = None,
            target: str | None = None, wait_for_owner: bool = True) -> Iterator[None]:
    """Hold the locks of ``reals`` with no other live deploy owning any of them.

    Waits up to ``timeout`` for the locks, and (``wait_for_owner``) for a live owner to
    finish (``on_wait`` is told why, once); a dead owner is recovered first (with its
    own locks: it may own more files than ours), then we try again. TargetBusy if
    still owned or locked at the deadline. A worker does not wait for an owner: the
    owner's next message may be queued behind the very message that would wait."""
    deadline = time.monotonic() + timeout
    takeovers = 0
    told = False
    while True:
        acquired = False
        try:
            with journal.lock_files(reals, max(0.0, deadline - time.monotonic()),
                                    busy=lambda real: busy_message(journal, real)):
                dead = blockers(journal, reals, deploy_id, target)
                if not dead:
                    acquired = True
                    yield
                    return
        except TargetBusy as err:
            if acquired or time.monotonic() >= deadline or (not wait_for_owner and err.owned):
                raise
            if on_wait is not None and not told:
                on_wait(str(err))
                told = True
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            continue
        takeovers += 1
        if takeovers > MAX_TAKEOVERS:
            raise TargetBusy(f"could not take over {', '.join(reals)}: dead owners kept coming back")
        for owner in dead:
            recover(owner)

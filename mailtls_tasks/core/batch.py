"""A batch: K certificates to one host as one deploy, in-process.

Many domains on one Postfix and Dovecot renew on their own schedules; one deploy per
certificate is one ``postfix check``, one table build and one reload per renewal. A
batch runs the same steps over all of them at once: a stage per certificate, each
one's own checks, one build per SNI table (with every member's staged files), one
run of each validate_command, every commit, one reload per daemon, then a verify per
name. One deploy id names the batch; each member keeps its own record (its row in
``status`` and ``history``) and its own outcome:

- a member whose own checks fail (its material, its names, its files) is rejected
  alone, before any table is built, and the others go on;
- a member whose names fail verify after the reload is rolled back alone: its files
  restored, each SNI table it is in built again from the live files and renamed in,
  one more reload, its names checked on the old pair and the others' on the new;
- if that fails, or anything else does (a table that would change other names, a
  validate_command, a commit, a reload), every member rolls back, the members whose
  records carry a table first (the table restored byte-exact from its backup).

One owner per file holds: the run holds every member's locks at once (sorted: two
batches never deadlock) and each member owns its files; a table is owned by the
member whose record carries it. No member is finished until the batch has written
its decision (``Journal.write_decision``): recovery ends a crashed batch's members
all back, or each as the decision says. See docs/protocol.md, "Batches".
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from ..commands import Running
from ..errors import ConfigError, MailTLSError, Rejected, StepFailed
from ..ids import check_deploy_id, new_deploy_id
from . import files, sni
from .config import HostConfig, Target
from .journal import DeployRecord, Journal, Origin, Owner
from .local import Terminated, check_id_reuse, contexts_for, shielded, signals_as_exceptions
from .local import log as local_log
from .ownership import holding
from .recovery import recover, recover_deploy
from .result import DeployResult
from .steps.commit import commit
from .steps.context import BatchRun, HostContexts, StepContext, target_reals
from .steps.live import live_state
from .steps.phases import already_staged, finish, remove_temps, timed
from .steps.reload import reload
from .steps.rollback import _restore, rollback
from .steps.served import wait_served
from .steps.stage import stage
from .steps.validate import check_staged, validate
from .steps.verify import verify

log = logging.getLogger("mailtls.batch")
VERIFY_THREADS = 4  # handshakes in flight at once during a batch's verify


@dataclass(frozen=True, repr=False)
class Member:
    """One certificate of a batch and the target it is for (``also``: a dual target's
    second certificate)."""

    target: str
    cert: bytes
    key: bytes
    chain: bytes | None = None
    also: tuple[tuple[bytes, bytes, bytes | None], ...] = ()
    # a batch through the workers: this member's own deploy id and fence (from its
    # sealed envelope) and its own --force; None: the batch's id, no fence
    deploy_id: str | None = None
    fence: int | None = None
    force: bool = False
    # its bundle was taken in by an earlier run of this batch (a redelivered message):
    # no bytes here; it goes on from its record, and is never staged from these
    taken: bool = False

    def __repr__(self) -> str:  # never the key
        return f"<Member {self.target} {self.deploy_id or ''}>"


def run_batch(cfg: HostConfig, members: list[Member], *, deploy_id: str | None = None, force: bool = False,
              lock_timeout: float = 300.0, journal: Journal | None = None, origin: Origin = "local",
              wait_for_owner: bool = True) -> list[DeployResult]:
    """Deploy every member in one run; one result per member, in the order given.
    Never raises for a batch that ran; TargetBusy (nothing touched) when another live
    deploy still owns a member's files after ``lock_timeout`` (at once, without
    ``wait_for_owner``: a worker's batch does not wait on a deploy whose next step may
    be queued behind it).

    ``deploy_id`` names the batch (its decision, its locks); a member gives its own
    (``Member.deploy_id``: a batch through the workers, one Redis record per member)
    or shares the batch's. ``origin`` "distributed": the members' endings go to the
    journal's outbox for Redis, as a worker's deploys do.

    Members whose targets share a real file (Postfix and Dovecot reading one pair)
    cannot both own it in one run: they go in rounds, each a batch of its own (the
    second finds the bytes in place, and reloads and verifies, as two deploys do)."""
    targets = [cfg.target(m.target) for m in members]
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"a batch names each target once; {', '.join(twice)} more than once")
    if not members:
        raise ConfigError("a batch of no certificates")
    deploy_id = check_deploy_id(deploy_id or new_deploy_id())
    given = [m.deploy_id for m in members if m.deploy_id is not None]
    if given and (len(given) != len(members) or len(set(given)) != len(given) or deploy_id in given):
        raise ConfigError("a batch's members share the batch's deploy id, or each has its own, distinct from "
                          "the batch's")
    ids = {t.name: check_deploy_id(m.deploy_id or deploy_id) for m, t in zip(members, targets, strict=True)}
    contexts = contexts_for(cfg, journal)
    j = contexts.journal
    if origin == "local":  # a worker's members: their ids were checked by their client and envelopes
        for m, t in zip(members, targets, strict=True):
            check_id_reuse(j, t.name, ids[t.name], [m.cert, *(c for c, _, _ in m.also)])
    recover(contexts, j)
    for k, chosen in enumerate(_rounds(members, targets)):
        round_id = deploy_id if k == 0 else f"{deploy_id[:58]}-r{k}"
        if k:
            log.info("batch %s: %s share files with earlier members: round %d (%s)", deploy_id,
                     ", ".join(t.name for _, t in chosen), k + 1, round_id)
        _run_round(contexts, chosen, ids, round_id, force=force, lock_timeout=lock_timeout, origin=origin,
                   wait_for_owner=wait_for_owner)
    results = [_result(j, t, ids[t.name]) for t in targets]
    if origin == "local":  # a worker's batch: its task sends each member's notice (mailtls.notify)
        from .notices import notify_local

        for t, res in zip(targets, results, strict=True):
            rec = j.load(t.name, ids[t.name])
            if rec is not None and rec.finished:
                res.notes += notify_local(cfg, rec)
    return results


def _rounds(members: list[Member], targets: list[Target]) -> list[list[tuple[Member, Target]]]:
    """Members in rounds whose own real files are disjoint, each member in the first
    round it fits (almost always one round: a host's domains have files of their own).
    An SNI table is not one of them: a batch builds each table once, for all of its
    members, and the member carrying it owns it."""
    rounds: list[tuple[set[str], list[tuple[Member, Target]]]] = []
    for m, t in zip(members, targets, strict=True):
        reals = set(target_reals(t, table=False))
        for taken, chosen in rounds:
            if not taken & reals:
                taken |= reals
                chosen.append((m, t))
                break
        else:
            rounds.append((reals, [(m, t)]))
    return [chosen for _, chosen in rounds]


def _run_round(contexts: HostContexts, chosen: list[tuple[Member, Target]], ids: dict[str, str], round_id: str, *,
               force: bool, lock_timeout: float, origin: Origin, wait_for_owner: bool) -> None:
    j = contexts.journal
    members = [m for m, _ in chosen]
    targets = [t for _, t in chosen]
    mine = {t.name: ids[t.name] for t in targets}
    own = {n: i for n, i in mine.items() if i != round_id}
    run = BatchRun(members=tuple(sorted(mine)), targets={t.name: t for t in targets}, ids=own,
                   batch_id=round_id if own else None)
    ctxs = {t.name: replace(contexts[t.name], batch=run) for t in targets}

    def take_over(owner: Owner) -> None:
        recover_deploy(contexts, j, owner.target, owner.deploy_id)

    reals = sorted({r for t in targets for r in target_reals(t)})
    signals = signals_as_exceptions() if origin == "local" else contextlib.nullcontext()
    with signals, holding(j, reals, round_id, timeout=lock_timeout, recover=take_over,
                          on_wait=lambda why: local_log.warning("waiting: %s", why), wait_for_owner=wait_for_owner):
        try:
            _start_validates(run, targets)
            _run(ctxs, members, mine, round_id, force, origin)
        except (MailTLSError, OSError) as err:
            _roll_back_all(ctxs, mine, round_id, str(err))
        except Exception as err:
            log.exception("batch %s: unexpected error; rolling every member back", round_id)
            _roll_back_all(ctxs, mine, round_id, f"internal error: {type(err).__name__}: {err}")
        except (KeyboardInterrupt, Terminated):
            _roll_back_all(ctxs, mine, round_id, "interrupted by a signal", reason="interrupted")
            raise
        finally:
            for started in run.early.values():
                started.cancel()  # a batch that ended before its validate: never left running behind us
            for n in ctxs:  # still holding every lock: nobody recovers them under us
                _hand_to_recovery(ctxs[n], mine[n])


def _result(j: Journal, t: Target, deploy_id: str) -> DeployResult:
    """A member's result from its record; one the run could not finish (its rollback
    failed: recovery has it now) reads ``failed``, one never staged (its bundle was
    taken in by an earlier run whose record is gone) ``rejected``: neither is a
    success to whoever reads the results."""
    rec = j.load(t.name, deploy_id)
    if rec is not None and rec.finished:
        return DeployResult.from_record(rec)
    if rec is None:
        return DeployResult(deploy_id=deploy_id, target=t.name, outcome="rejected",
                            error="not staged by this run: an earlier run of this batch took its bundle in, and "
                                  "its record is gone; nothing was touched")
    return DeployResult(deploy_id=deploy_id, target=t.name, host=rec.host, outcome="failed",
                        error=f"unfinished (phase {rec.phase}): {rec.error or 'its rollback did not complete'}; "
                              "recovery finishes it (`mailtls recover`)")


def _start_validates(run: BatchRun, targets: list[Target]) -> None:
    """Each distinct validate_command, started now: it checks the daemons' config, which
    a batch never changes, and runs while the members stage (``validate`` collects it)."""
    for t in targets:
        command = t.validate_command
        if command.strip() and command not in run.early:
            with contextlib.suppress(MailTLSError):  # cannot start: validate runs it and says why
                run.early[command] = Running(command, "validate_command")


def _run(ctxs: dict[str, StepContext], members: list[Member], ids: dict[str, str], batch_id: str, force: bool,
         origin: Origin) -> None:
    recs: dict[str, DeployRecord] = {}
    for m in members:
        n = ctxs[m.target].target.name
        if m.taken:
            rec = ctxs[n].journal.load(n, ids[n])
            if already_staged(rec):
                recs[n] = rec
            else:  # its record went (pruned) or is back at staging: never staged from no bytes
                log.warning("batch %s: %s was taken in by an earlier run and is not staged now", batch_id, n)
            continue
        try:
            recs[n] = stage(ctxs[n], ids[n], m.cert, m.key, m.chain, force=force or m.force, fence=m.fence,
                            origin=origin, also=list(m.also) or None)
        except Rejected:
            continue  # finished ``rejected`` by stage, alone
    live = [n for n in recs if not recs[n].finished]
    for n in list(live):
        try:
            check_staged(ctxs[n], recs[n])
        except Rejected:
            live.remove(n)
    carriers = _build_tables(ctxs, recs, live)
    rejected = set()
    for n in live:  # validate_command once per command; each table checked by its carrier
        try:
            recs[n] = validate(ctxs[n], ids[n])
        except Rejected:
            rejected.add(n)  # finished ``rejected`` by validate, its temps removed
    if rejected:
        gone = _reject_table_mates(ctxs, recs, carriers, rejected)
        live = [n for n in live if n not in gone]
        carriers -= gone
    order = [n for n in live if n not in carriers] + [n for n in live if n in carriers]
    for n in order:  # a table after every file it was built from
        recs[n] = commit(ctxs[n], ids[n])
    for n in live:
        recs[n] = reload(ctxs[n], ids[n])
    failed = _verify_all(ctxs, live, ids)
    if failed:
        _roll_back_alone(ctxs, ids, live, carriers, failed)
    if not live:
        return  # every member ended at stage or its own checks
    outcomes = {n: "rolled_back" if n in failed else "deployed" for n in live}
    ctxs[live[0]].journal.write_decision(batch_id, outcomes)
    for n in order:
        rec = ctxs[n].journal.load(n, ids[n])
        assert rec is not None
        _finish_as_decided(ctxs[n], rec, outcomes[n], failed.get(n))


def _reject_table_mates(ctxs: dict[str, StepContext], recs: dict[str, DeployRecord], carriers: set[str],
                        rejected: set[str]) -> set[str]:
    """Members rejected at validate (a validate_command that failed rejects every member
    naming it; a table check, its carrier) take the members of their SNI tables with
    them: such a table was built with all of their staged files and is not committed
    without one of them. The other members go on. Returns every member now ended."""
    gone = set(rejected)
    for carrier in sorted(carriers):
        ctx = ctxs[carrier]
        assert ctx.batch is not None
        group = [carrier, *ctx.batch.tables.get(carrier, ())]
        culprits = sorted(n for n in group if n in rejected)
        if not culprits:
            continue
        first = ctx.journal.load(culprits[0], recs[culprits[0]].deploy_id)
        why = (f"rejected with {', '.join(culprits)}, whose staged files its SNI table was built with: "
               f"{first.error if first is not None else 'rejected'}")
        for n in group:  # the carrier first: its record holds the table's temp
            if n in gone:
                continue
            rec = ctx.journal.load(n, recs[n].deploy_id)
            assert rec is not None
            remove_temps(rec)
            recs[n] = finish(ctxs[n], rec, "rejected", why)
            gone.add(n)
    return gone


def _verify_all(ctxs: dict[str, StepContext], live: list[str], ids: dict[str, str]) -> dict[str, str]:
    """Each member's verify, a few at a time: a verify waits on the daemons' handshakes
    (Dovecot starts a login process per connection), not on this process, and touches
    nothing but its own member's record. Returns the members whose names failed, with
    why; any other error is raised (the batch then rolls every member back), once the
    verifies in flight have ended."""

    def one(n: str) -> str | None:
        try:
            verify(ctxs[n], ids[n])
        except StepFailed as err:
            return str(err)
        return None

    with ThreadPoolExecutor(max_workers=max(1, min(VERIFY_THREADS, len(live))),
                            thread_name_prefix="mailtls-verify") as pool:
        results = list(pool.map(one, live))
    return {n: why for n, why in zip(live, results, strict=True) if why is not None}


def _finish_as_decided(ctx: StepContext, rec: DeployRecord, outcome: str, error: str | None) -> DeployRecord:
    if outcome == "rolled_back":
        return finish(ctx, rec, "rolled_back", error or rec.error)
    return finish(ctx, rec, "deployed")


def _groups(ctxs: dict[str, StepContext], live: list[str]) -> Iterator[tuple[str, list[str]]]:
    """(compiled table, the live members in it), per indexed SNI table."""
    by_table: dict[str, list[str]] = {}
    for n in live:
        table = sni.compiled_real(ctxs[n].target)
        if table is not None:
            by_table.setdefault(table, []).append(n)
    yield from by_table.items()


def _build_tables(ctxs: dict[str, StepContext], recs: dict[str, DeployRecord], live: list[str]) -> set[str]:
    """One build per SNI table, with every live member's staged files, carried (and
    owned) by the table's first member. Returns the carriers."""
    carriers = set()
    for table_real, group in _groups(ctxs, live):
        carrier = group[0]
        ctx = ctxs[carrier]
        plan = sni.plan(ctx.target, ctx.tables_read)
        assert plan is not None and ctx.batch is not None
        others = [n for n in group if n != carrier]
        temps = {e.real: e.temp for n in group for e in recs[n].files if not recs[n].files_already_live}
        group_plan = plan.with_ours(frozenset().union(*(sni.keys_of(ctxs[n].target, plan) for n in group)))
        if not temps and sni.holds_live(group_plan):
            continue  # nothing of theirs to write, and the table already holds their files
        rec = recs[carrier]
        key_entry = next(e for e in rec.files if e.role in ("key", "combined"))
        entry = sni.map_entry(group_plan, rec.deploy_id, key_entry)
        with timed(ctx, rec, "stage"):
            ctx.journal.set_owner(table_real, rec)
            rec.claimed = [*rec.claimed, table_real]
            rec.files = [*rec.files, entry]
            rec.files_already_live = False
            ctx.save(rec)  # owned and named before it is written: recovery can find it
            _, data = files.inspect(entry.real)
            if data is not None:
                ctx.journal.write_backup(rec.target, rec.deploy_id, entry.role, data)
            entry.new_sha256 = sni.build_beside(group_plan, entry, temps, ctx.target.command_timeout)
        ctx.batch.tables[carrier] = tuple(others)
        carriers.add(carrier)
    return carriers


def _roll_back_alone(ctxs: dict[str, StepContext], ids: dict[str, str], live: list[str], carriers: set[str],
                     failed: dict[str, str]) -> None:
    """The members whose names failed verify: their files back, each table they are
    in built again from the live files and renamed in, one more reload per daemon,
    their old pair served and every other member's new one. Raises if any of it
    fails (the caller then rolls every member back)."""
    j = ctxs[live[0]].journal
    for n in failed:
        ctx = ctxs[n]
        rec = j.load(n, ids[n])
        assert rec is not None
        own = [e for e in rec.files if e.role != sni.MAP_ROLE]
        with timed(ctx, rec, "rollback"):
            rec.rollback_from, rec.phase, rec.error = rec.phase, "rolling_back", failed[n]
            ctx.save(rec)
            _restore(ctx, rec.model_copy(update={"files": own}), {e.real: live_state(e) for e in own})
    for carrier in carriers:
        ctx = ctxs[carrier]
        assert ctx.batch is not None
        group = [carrier, *ctx.batch.tables.get(carrier, ())]
        if not any(n in failed for n in group):
            continue
        rec = j.load(carrier, ids[carrier])
        assert rec is not None
        plan = sni.plan(ctx.target)
        assert plan is not None
        entry = next(e for e in rec.files if e.role == sni.MAP_ROLE)
        with timed(ctx, rec, "rollback" if carrier in failed else "commit"):
            entry.also_new = [*entry.also_new, entry.new_sha256]  # the table live now is ours too
            ctx.save(rec)
            entry.new_sha256 = sni.build_beside(plan, entry, {}, ctx.target.command_timeout)
            ctx.save(rec)
            files.replace(entry.temp, entry.real)
            for path in entry.scratch:
                files.remove(path)
    done: set[tuple[str, str, str]] = set()
    for n in live:
        t = ctxs[n].target
        if t.reload_once in done or not any(ctxs[f].target.mode == t.mode for f in failed):
            continue
        res = t.reload()
        if not res.ok:
            raise StepFailed(f"reload after rolling back {', '.join(sorted(failed))} alone: {res.summary()}")
        done.add(t.reload_once)
    for n in live:
        target = ctxs[n].target
        rec = j.load(n, ids[n])
        assert rec is not None
        if not target.verify_endpoints():
            continue
        leaves = rec.previous_leaves if n in failed else rec.leaves
        if leaves:
            wait_served(target, leaves, None)


def _roll_back_all(ctxs: dict[str, StepContext], ids: dict[str, str], batch_id: str, error: str,
                   reason: str | None = None) -> None:
    """Every unfinished member back, carriers first: the table returns byte-exact to
    what it was before the batch, then each member's files and a check of its names."""
    with shielded():
        recs = [(n, ctxs[n].journal.load(n, ids[n])) for n in ctxs]
        pending = [(n, r) for n, r in recs if r is not None and not r.finished]
        pending.sort(key=lambda nr: not any(e.role == sni.MAP_ROLE for e in nr[1].files))
        for n, _ in pending:
            try:
                rollback(ctxs[n], ids[n], error=error, reason=reason)
            except Exception as err:  # noqa: BLE001 -- the others still go back; this one goes to recovery
                log.error("batch %s: rolling %s back failed: %s", batch_id, n, err)


def _hand_to_recovery(ctx: StepContext, deploy_id: str) -> None:
    """A member its run could not finish (a rollback on a full disk): no runner, no
    step. Recovery takes it as soon as the run lets go of its locks (a batch member is
    dead to whoever holds one of them, ``ownership.is_dead``), even while the process
    that ran it (a worker's pool process) lives on, and even when this save fails."""
    rec = ctx.journal.load(ctx.target.name, deploy_id)
    if rec is not None and not rec.finished:
        rec.runner, rec.in_step = None, None
        with contextlib.suppress(MailTLSError, OSError):
            ctx.save(rec)


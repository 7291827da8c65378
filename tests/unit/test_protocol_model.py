"""A stateful model of the deploy protocol (docs/protocol.md) over real files.

Hypothesis drives the real step functions -- the worker's ``HostRuntime`` path and
the ``--local`` runner -- against real temp files, interleaving deploys of targets
that share real files (through symlinks, and with an extra chain file), and batches
(``core.batch``: several targets under one deploy id, one process; or, as a worker
runs them, a deploy id and fence per member, and the batch sent again), redelivering
and reordering their messages, crashing them mid-step (an exception that no code may
catch, raised before the k-th file operation: what a SIGKILL leaves behind), letting
time pass beyond leases and running recovery. Only the clock and "is this process
still alive?" are the model's own: it owns the processes.

After every rule: each live cert/key pair matches, unless a deploy is inside its
commit or rollback window; it is byte-for-byte a set some deploy staged (or the set
from before); a set reported deployed is never replaced by one staged before it; no
deploy ever ends ``failed``; finished deploys leave no temps and have an outcome (and
an outbox entry, distributed). At the end every process dies, time runs past every
lease, recovery runs, and all of that must hold with nothing unfinished.

``MAILTLS_MODEL_EXAMPLES`` raises the number of examples (``make model``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mailtls_tasks.core import files
from mailtls_tasks.core.config import parse_config
from mailtls_tasks.core.host import HostRuntime
from mailtls_tasks.core.journal import DeployRecord, Journal
from mailtls_tasks.core.local import run_local
from mailtls_tasks.core.material import key_matches_cert
from mailtls_tasks.core.recovery import recover
from mailtls_tasks.core.steps.phases import ORDER
from mailtls_tasks.errors import MailTLSError, TargetBusy
from tests.support.pki import Issued, make_pki

LEASE = 100.0
EXAMPLES = int(os.environ.get("MAILTLS_MODEL_EXAMPLES", "40"))
STEPS = int(os.environ.get("MAILTLS_MODEL_STEPS", "30"))
NOT_BEFORE = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)  # equal: no leaf is "older" than another

_PKI = make_pki("ec")
_LEAVES: list[Issued] = []


def leaf(i: int) -> Issued:
    while len(_LEAVES) <= i:
        _LEAVES.append(_PKI.leaf(not_before=NOT_BEFORE))
    return _LEAVES[i]


class Crash(BaseException):
    """A process death: nothing in the code under test may catch it."""


@contextlib.contextmanager
def crash_before_op(k: int) -> Iterator[None]:
    """Raise Crash before the k-th durable file operation (write, rename, unlink, dir fsync)."""
    names = ("write_new", "replace", "remove", "fsync_dir")
    originals = {n: getattr(files, n) for n in names}
    count = itertools.count(1)

    def wrap(fn: Any) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            if next(count) == k:
                raise Crash()
            return fn(*a, **kw)
        return wrapper

    for n in names:
        setattr(files, n, wrap(originals[n]))
    try:
        yield
    finally:
        for n in names:
            setattr(files, n, originals[n])


@dataclass
class Deploy:
    deploy_id: str
    target: str
    leaf: Issued
    origin: str
    fence: int | None = None
    seq: int | None = None  # order in which it got staged
    next: str = "stage"     # the message Celery's chain would deliver next


STEP_NAMES = ["validate", "commit", "reload", "verify"]


class ProtocolModel(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mailtls-model-"))
        certs = self.root / "certs"
        certs.mkdir()
        self.c1, self.k1, self.ch1 = certs / "c1.pem", certs / "k1.pem", certs / "ch1.pem"
        self.c2, self.k2 = certs / "c2.pem", certs / "k2.pem"
        (certs / "links").mkdir()
        (certs / "links" / "c.pem").symlink_to(self.c1)
        (certs / "links" / "k.pem").symlink_to(self.k1)
        first, other = leaf(0), leaf(1)
        self.c1.write_bytes(first.fullchain_pem)
        self.k1.write_bytes(first.key_pem)
        self.ch1.write_bytes(first.chain_pem)
        self.c2.write_bytes(other.fullchain_pem)
        self.k2.write_bytes(other.key_pem)
        for k in (self.k1, self.k2):
            os.chmod(k, 0o600)
        # retention 1: records of finished deploys are pruned soon, so replays meet no record
        common = {"reload_command": "/bin/true", "validate_command": "", "backup_retention": 1}
        self.cfg = parse_config({
            "host": "model", "state_dir": str(self.root / "state"), "deploy_lease": LEASE,
            "targets": {
                "a": {"cert_path": str(self.c1), "key_path": str(self.k1), **common},
                "b": {"cert_path": str(certs / "links" / "c.pem"), "key_path": str(certs / "links" / "k.pem"),
                      **common},
                "c": {"cert_path": str(self.c1), "key_path": str(self.k1), "chain_path": str(self.ch1), **common},
                "d": {"cert_path": str(self.c2), "key_path": str(self.k2), **common},
            }})
        self.now = 1_000_000.0
        self.live: set[str] = set()
        self.pids = itertools.count(1)
        self.token = self._new_token()
        self.journal = Journal(self.cfg.state_dir, clock=lambda: self.now, alive=lambda t: t in self.live,
                               token=lambda: self.token)
        self.rt = HostRuntime(self.cfg, lock_wait=0.0, journal=self.journal)
        self.worker_child = self._new_token()
        self.deploys: list[Deploy] = []
        self.ids = itertools.count(1)
        self.leaves = itertools.count(2)
        self.fences = itertools.count(1)
        self.seqs = itertools.count(1)
        # (cert bytes, key bytes) -> seq of the deploy that staged them (0: the set before any)
        self.sets: dict[tuple[bytes, bytes], int] = {(first.fullchain_pem, first.key_pem): 0,
                                                     (other.fullchain_pem, other.key_pem): 0}
        self.floor = {"pair1": 0, "pair2": 0}
        self.hand_edited: set[str] = set()
        self.fences_staged = {"pair1": 0, "pair2": 0}
        self.ended_seen: set[str] = set()
        self.batches: list[tuple[str, list[Deploy]]] = []

    def teardown(self) -> None:
        if hasattr(self, "root"):
            shutil.rmtree(self.root, ignore_errors=True)

    # -- processes ----------------------------------------------------------------
    def _new_token(self) -> str:
        tok = f"proc-{next(self.pids)}"
        self.live.add(tok)
        return tok

    @contextlib.contextmanager
    def _process(self, token: str, crash_at: int | None) -> Iterator[None]:
        """Run as process ``token``; with ``crash_at``, that process dies at that op."""
        self.token = token
        try:
            if crash_at is None:
                yield
            else:
                with crash_before_op(crash_at):
                    yield
        except Crash:
            self.live.discard(token)
        except MailTLSError:
            pass  # a failed step: Celery fails the task, link_error sends rollback (a rule below)

    def _record(self, d: Deploy) -> DeployRecord | None:
        return self.journal.load(d.target, d.deploy_id)

    def _note_staged(self, d: Deploy) -> None:
        rec = self._record(d)
        stage = rec.steps.get("stage") if rec is not None else None
        if d.seq is None and rec is not None and rec.files and stage is not None and stage.status == "ok":
            d.seq = next(self.seqs)
            if d.fence is not None:  # fences are per real file: targets sharing files share them
                pair = "pair2" if d.target == "d" else "pair1"
                assert d.fence > self.fences_staged[pair], \
                    f"{d.deploy_id} staged with fence {d.fence} after fence {self.fences_staged[pair]}"
                self.fences_staged[pair] = d.fence
            cert = d.leaf.cert_pem if d.target == "c" else d.leaf.fullchain_pem
            self.sets[(cert, d.leaf.key_pem)] = d.seq

    def _new_deploy(self, target: str, origin: str) -> Deploy:
        d = Deploy(f"m-{next(self.ids)}", target, leaf(next(self.leaves)), origin)
        self.deploys.append(d)
        return d

    # -- distributed deploys: messages in any order, redelivered, late ----------------
    @rule(name=st.sampled_from(["a", "b", "c", "d"]))
    def enqueue(self, name: str) -> None:
        d = self._new_deploy(name, "distributed")
        d.fence = next(self.fences)  # taken at enqueue, in the signed envelope

    def _distributed(self) -> list[Deploy]:
        return [d for d in self.deploys if d.origin == "distributed"]

    def _deliver(self, d: Deploy, step: str, crash: int | None) -> str:
        """One message of ``d`` on the worker: 'ok', 'failed' (task failed: errback
        next), 'busy' (retried later) or 'crashed' (unacked: redelivered later)."""
        if step != "stage" and self._record(d) is None:
            return "ok"  # the worker answers "unknown on this host" and touches nothing
        child = self.worker_child
        self.token = child
        try:
            with crash_before_op(crash) if crash else contextlib.nullcontext():
                if step == "stage":
                    self.rt.stage(d.target, d.deploy_id, d.leaf.fullchain_pem, d.leaf.key_pem, None, force=False,
                                  fence=d.fence)
                elif step == "rollback":
                    self.rt.rollback(d.target, d.deploy_id)
                else:
                    self.rt.step(step, d.target, d.deploy_id)
            result = "ok"
        except Crash:
            self.live.discard(child)
            self.worker_child = self._new_token()  # the worker starts a new pool child
            result = "crashed"
        except TargetBusy:
            self._assert_busy_is_real(d.target)
            result = "busy"
        except MailTLSError:
            result = "failed"
        self._note_staged(d)
        return result

    def _in_flight(self) -> list[Deploy]:
        return [d for d in self.deploys if d.origin == "distributed" and d.next != "end"]

    @precondition(lambda self: self._in_flight())
    @rule(data=st.data(), messages=st.integers(1, 6), crash=st.none() | st.integers(1, 12))
    def deliver_next(self, data: st.DataObject, messages: int, crash: int | None) -> None:
        """The next ``messages`` messages of one deploy's chain, in order (errback after
        a failure); busy and crashed messages come back later. ``crash``: the last one dies."""
        d = data.draw(st.sampled_from(self._in_flight()))
        for i in range(messages):
            if d.next == "end":
                return
            result = self._deliver_next(d, crash if i == messages - 1 else None)
            if result in ("busy", "crashed"):
                return

    def _deliver_next(self, d: Deploy, crash: int | None) -> str:
        with self._no_live_deploy_recovered():
            result = self._deliver(d, d.next, crash)
        chain = ["stage", *STEP_NAMES, "end"]
        if result == "ok":
            rec = self._record(d)
            d.next = "end" if d.next == "rollback" or (rec is not None and rec.finished) \
                else chain[chain.index(d.next) + 1]
        elif result == "failed":
            d.next = "end" if d.next == "rollback" else "rollback"
        return result

    @precondition(lambda self: self._distributed())
    @rule(data=st.data(), step=st.sampled_from(["stage", *STEP_NAMES, "rollback"]),
          crash=st.none() | st.integers(1, 10))
    def redeliver(self, data: st.DataObject, step: str, crash: int | None) -> None:
        """Any message of any deploy, again or out of order: late, duplicated, replayed."""
        d = data.draw(st.sampled_from(self._distributed()))
        with self._no_live_deploy_recovered():
            self._deliver(d, step, crash)

    @precondition(lambda self: any(d.next == "end" for d in self._distributed()))
    @rule(data=st.data())
    def replay_chain(self, data: st.DataObject) -> None:
        """Every message of a deploy that already ended, again (Redis replays them, or
        a writer re-sends them within the envelope's age): nothing may change."""
        d = data.draw(st.sampled_from([d for d in self._distributed() if d.next == "end"]))
        with self._no_live_deploy_recovered():
            for step in ("stage", *STEP_NAMES):
                if self._deliver(d, step, None) != "ok":
                    break

    @rule(pair=st.sampled_from(["pair1", "pair2"]))
    def hand_edit(self, pair: str) -> None:
        """An operator copies a certificate into place by hand, behind every deploy's back."""
        new = leaf(next(self.leaves))
        cert_p, key_p = (self.c1, self.k1) if pair == "pair1" else (self.c2, self.k2)
        key_p.write_bytes(new.key_pem)
        cert_p.write_bytes(new.fullchain_pem)
        seq = next(self.seqs)
        self.sets[(new.fullchain_pem, new.key_pem)] = seq
        self.floor[pair] = seq  # the operator saw it live: nothing staged before may replace it
        self.hand_edited.add(pair)

    # -- local runs, recovery, time --------------------------------------------------
    @rule(name=st.sampled_from(["a", "b", "c", "d"]), crash=st.none() | st.integers(1, 25))
    def local_run(self, name: str, crash: int | None) -> None:
        target = name
        d = self._new_deploy(target, "local")
        tok = self._new_token()
        with self._no_live_deploy_recovered(), self._process(tok, crash):
            try:
                run_local(self.cfg, target, d.leaf.fullchain_pem, d.leaf.key_pem, deploy_id=d.deploy_id,
                          lock_timeout=0.0, journal=self.journal)
            except TargetBusy:
                self._assert_busy_is_real(target)
        self.live.discard(tok)  # the local process exits either way
        self._note_staged(d)

    @rule(first=st.sampled_from(["a", "b", "c"]), with_first=st.booleans(), with_d=st.booleans(),
          crash=st.none() | st.integers(1, 60))
    def local_batch(self, first: str, with_first: bool, with_d: bool, crash: int | None) -> None:
        """A batch (``core.batch``): one deploy id, a member per target, one process.
        Its members' files are disjoint (a, b and c share pair1: one of them at most)."""
        from mailtls_tasks.core.batch import Member, run_batch

        names = [first] * with_first + ["d"] * with_d
        if not names:
            return
        did = f"m-{next(self.ids)}"
        ds = self._members(names, "local", did)
        tok = self._new_token()
        with self._no_live_deploy_recovered(), self._process(tok, crash):
            try:
                run_batch(self.cfg, [Member(d.target, d.leaf.fullchain_pem, d.leaf.key_pem) for d in ds],
                          deploy_id=did, lock_timeout=0.0, journal=self.journal)
            except TargetBusy:
                assert any(self._busy_is_real(n) for n in names), f"batch {names} refused as busy, nothing owns"
        self.live.discard(tok)
        for d in ds:
            self._note_staged(d)

    @rule(first=st.sampled_from(["a", "b", "c"]), with_first=st.booleans(), with_d=st.booleans(),
          crash=st.none() | st.integers(1, 60))
    def worker_batch(self, first: str, with_first: bool, with_d: bool, crash: int | None) -> None:
        """A batch through the workers (``deploy_many``; ``HostRuntime.open_batch`` and
        ``run_batch``): a deploy id, envelope and fence per member, one more id for the
        batch, one task on the worker's pool child; a crash kills that child, and the
        batch may come again."""
        names = [first] * with_first + ["d"] * with_d
        if not names:
            return
        bid = f"m-{next(self.ids)}"
        ds = self._members(names, "worker_batch")
        self.batches.append((bid, ds))
        self._run_worker_batch(bid, ds, crash)

    @precondition(lambda self: self.batches)
    @rule(data=st.data(), crash=st.none() | st.integers(1, 60))
    def redeliver_batch(self, data: st.DataObject, crash: int | None) -> None:
        """A worker batch's message again: taken back after a lost worker, or replayed."""
        bid, ds = data.draw(st.sampled_from(self.batches))
        self._run_worker_batch(bid, ds, crash)

    def _members(self, names: list[str], origin: str, shared_id: str | None = None) -> list[Deploy]:
        """A batch's members: the batch's id each (``shared_id``), or an id and a fence
        of their own (taken at enqueue, as ``deploy_many`` seals them)."""
        ds = []
        for n in names:
            own = shared_id is None
            d = Deploy(shared_id or f"m-{next(self.ids)}", n, leaf(next(self.leaves)), origin,
                       fence=next(self.fences) if own else None)
            self.deploys.append(d)
            ds.append(d)
        return ds

    def _run_worker_batch(self, bid: str, ds: list[Deploy], crash: int | None) -> None:
        from mailtls_tasks.core.batch import Member, run_batch

        child = self.worker_child
        self.token = child
        with self._no_live_deploy_recovered():
            try:
                with crash_before_op(crash) if crash else contextlib.nullcontext():
                    run_batch(self.cfg, [Member(d.target, d.leaf.fullchain_pem, d.leaf.key_pem, deploy_id=d.deploy_id,
                                                fence=d.fence) for d in ds],
                              deploy_id=bid, lock_timeout=0.0, journal=self.journal, origin="distributed",
                              wait_for_owner=False)
            except Crash:
                self.live.discard(child)
                self.worker_child = self._new_token()
            except TargetBusy:
                assert any(self._busy_is_real(d.target) for d in ds), f"batch {bid} refused as busy, nothing owns"
            except MailTLSError:
                pass
        for d in ds:
            self._note_staged(d)

    @rule(crash=st.none() | st.integers(1, 10))
    def recovery(self, crash: int | None) -> None:
        with self._no_live_deploy_recovered(), self._process(self._new_token(), crash):
            recover(self.rt.contexts, self.journal)

    @rule(seconds=st.floats(1, LEASE * 1.5))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def worker_restarts(self) -> None:
        """The whole worker dies (its pool child too) and comes back with a full scan."""
        self.live.discard(self.worker_child)
        self.worker_child = self._new_token()
        with self._no_live_deploy_recovered(), self._process(self._new_token(), None):
            self.rt.recover(full_scan=True)

    def _alive_by_model(self) -> set[str]:
        """Unfinished deploys the protocol says are alive: a local run whose process lives;
        a distributed deploy inside its lease, unless it died inside a step."""
        alive = set()
        for d in self.deploys:
            rec = self._record(d)
            if rec is None or rec.finished:
                continue
            if rec.batch:  # a batch is alive only inside its run: no rule runs beside one
                ok = False
            elif rec.origin == "local":
                ok = rec.runner in self.live
            else:
                ok = rec.lease_until is not None and self.now < rec.lease_until \
                    and not (rec.in_step and rec.runner not in self.live)
            if ok:
                alive.add(d.deploy_id)
        return alive

    @contextlib.contextmanager
    def _no_live_deploy_recovered(self) -> Iterator[None]:
        alive = self._alive_by_model()
        yield
        for d in self.deploys:
            rec = self._record(d)
            if d.deploy_id in alive and rec is not None and rec.finished:
                assert rec.reason not in ("interrupted", "recovered"), \
                    f"recovery ended {d.deploy_id}, which was alive ({rec.outcome}, {rec.reason})"

    def _assert_busy_is_real(self, target: str) -> None:
        """Refused as busy: some unfinished deploy that is not dead owns one of its files."""
        assert self._busy_is_real(target), f"{target} refused as busy, but no live deploy owns its files"

    def _busy_is_real(self, target: str) -> bool:
        from mailtls_tasks.core.ownership import is_dead
        from mailtls_tasks.core.steps.context import target_reals

        reals = set(target_reals(self.cfg.targets[target]))
        owners = [self.journal.owner_of(r) for r in reals]
        recs = [self.journal.load(o.target, o.deploy_id) for o in owners if o]
        return any(r is not None and not r.finished and not is_dead(self.journal, r) for r in recs)

    # -- invariants ------------------------------------------------------------------------
    def _window(self, reals: set[str]) -> bool:
        """A deploy owning these files is inside its commit or rollback: the pair may be mixed."""
        for d in self.deploys:
            rec = self._record(d)
            if rec is None or rec.finished or not reals & set(rec.reals):
                continue
            if rec.phase == "committing":
                return True
            if rec.phase == "rolling_back" and ORDER[rec.rollback_from or "staging"] >= ORDER["committing"]:
                return True
        return False

    def _check_pair(self, name: str, cert_p: Path, key_p: Path) -> None:
        if self._window({os.path.realpath(cert_p), os.path.realpath(key_p)}):
            return
        cert, key = cert_p.read_bytes(), key_p.read_bytes()
        assert key_matches_cert(key, cert), f"{name}: live key does not match live cert"
        assert (cert, key) in self.sets, f"{name}: the live pair is a set no deploy staged"
        seq = self.sets[(cert, key)]
        assert seq >= self.floor[name], \
            f"{name}: a set staged at {seq} replaced one reported deployed at {self.floor[name]}"

    @invariant()
    def protocol_holds(self) -> None:
        if not hasattr(self, "cfg"):
            return
        for d in self.deploys:
            rec = self._record(d)
            if rec is None:
                continue
            assert rec.rollback_from in (None, "staging", "staged", "validated", "committing", "committed",
                                         "reloaded", "verified"), f"{d.deploy_id}: rollback_from {rec.rollback_from}"
            if rec.finished:
                assert rec.phase == "done" and rec.outcome is not None
                pair = "pair2" if d.target == "d" else "pair1"
                if rec.outcome == "failed":
                    assert rec.reason == "conflict" and pair in self.hand_edited, \
                        f"{d.deploy_id} ended failed: {rec.error}"
                assert rec.in_step is None
                for e in rec.files:
                    assert not os.path.exists(e.temp), f"{d.deploy_id} finished but left {e.temp}"
                if d.origin in ("distributed", "worker_batch"):  # Redis hears of every worker's ending
                    assert (d.target, d.deploy_id) in self.journal.outbox()
                if rec.outcome == "deployed" and d.deploy_id not in self.ended_seen:
                    self.ended_seen.add(d.deploy_id)
                    assert d.seq is not None, f"{d.deploy_id} deployed but was never seen staged"
                    self.floor[pair] = max(self.floor[pair], d.seq)
            else:
                assert rec.phase != "done"
        self._check_pair("pair1", self.c1, self.k1)
        self._check_pair("pair2", self.c2, self.k2)
        if not self._window({os.path.realpath(self.ch1)}):
            assert self.ch1.read_bytes() == leaf(0).chain_pem

    def check_end(self) -> None:
        """Everyone dies, every lease runs out, recovery runs: nothing may stay unfinished."""
        self.live.clear()
        self.now += LEASE * 10
        with self._process(self._new_token(), None):
            recover(self.rt.contexts, self.journal, full_scan=True)
        for d in self.deploys:
            rec = self._record(d)
            assert rec is None or rec.finished, f"{d.deploy_id} still unfinished after recovery: {rec.phase}"
            event(f"{d.origin}: {rec.outcome if rec else 'never staged'} ({rec.reason if rec else '-'})")
        assert self.journal.owners() == []
        self.protocol_holds()
        strays = [p for p in (self.root / "certs").rglob("*") if ".mailtls-" in p.name]
        assert strays == []


class _Final(ProtocolModel):
    def teardown(self) -> None:
        try:
            if hasattr(self, "cfg"):
                self.check_end()
        finally:
            super().teardown()


TestProtocolModel = _Final.TestCase
TestProtocolModel.settings = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


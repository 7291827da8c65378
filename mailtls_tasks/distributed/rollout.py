"""One certificate to every daemon that serves it, in waves: ``mailtls rollout``.

    result = mailtls_tasks.rollout(cert_pem, key_pem, covers=["mail.example.com"],
                                   waves="1,25%,100%")
    if not result.ok: ...

Targets are chosen by address, by label, or by the names they serve (``covers``: every
target with one of these names among its ``names``, provided the new certificate
covers all of its names). They are deployed in waves, each wave a Celery group of
deploys sent at once; the first wave is the canary. A target that ends
``rolled_back`` or ``failed`` halts the rollout: later waves are not sent, their
targets are reported ``skipped`` (unless ``continue_on_error``). The rollout record in
Redis (``mailtls:rollout:ID``) holds every target's wave, outcome and timings;
``mailtls rollout-status ID`` shows it. Running the same rollout again (same id: by
default derived from the certificate and the selection) resumes it: targets that
already serve the certificate end ``unchanged`` at once, the rest are deployed.

The orchestration runs where the pipeline runs (it waits anyway); every deploy it
sends is an ordinary deploy, run, fenced and recovered by its host as any other.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import math
import time
from typing import Any, Literal

import redis
from celery import group
from pydantic import BaseModel, Field

from ..core import material
from ..core.names import leaf_names, name_covered, uncovered
from ..core.result import EXIT_CODES, NEVER_STARTED
from ..errors import BrokerError, MailTLSError, Rejected
from .app import url_of

Verdict = Literal["deployed", "unchanged", "rejected", "rolled_back", "failed", "skipped", "timeout", "pending"]
HALTING = frozenset({"rolled_back", "failed", "timeout"})
RANK = {"pending": 0, "deployed": 0, "unchanged": 0, "skipped": 1, "rejected": 2, "timeout": 3, "rolled_back": 4,
        "failed": 5}


class RolloutError(MailTLSError):
    """The rollout could not be planned (nothing selected, bad waves): exit 1."""

    exit_code = 1


class NothingSelected(RolloutError):
    """No registered target serves what the certificate is for: nothing to do here
    (a certbot hook on a host with lineages for other servers exits 0 on it)."""


class TargetRun(BaseModel):
    wave: int
    deploy_id: str | None = None
    fingerprint: str | None = None  # the leaf this target gets (a rollout of several certificates)
    outcome: Verdict = "pending"
    reason: str | None = None
    error: str | None = None
    started: str | None = None
    ended: str | None = None
    ms: int | None = None


class RolloutResult(BaseModel):
    rollout_id: str
    fingerprint: str
    selection: dict[str, Any] = Field(default_factory=dict)
    state: Literal["running", "done", "halted"] = "running"
    waves: list[list[str]] = Field(default_factory=list)
    targets: dict[str, TargetRun] = Field(default_factory=dict)
    not_covered: dict[str, list[str]] = Field(default_factory=dict)
    # a rollout of several certificates: those no target took (leaf -> why)
    unused: dict[str, str] = Field(default_factory=dict)
    # selected, but no live worker to take them (skipped on request): address -> why
    unreachable: dict[str, str] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    created: str = Field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    updated: str | None = None

    @property
    def worst(self) -> Verdict:
        return max((t.outcome for t in self.targets.values()), key=lambda o: RANK[o], default="deployed")

    @property
    def ok(self) -> bool:
        return self.state == "done" and all(t.outcome in ("deployed", "unchanged") for t in self.targets.values())

    @property
    def exit_code(self) -> int:
        worst = self.worst
        if worst in EXIT_CODES:
            return EXIT_CODES[worst]
        return 1 if worst in ("timeout", "skipped", "pending") else 0

    def human(self) -> str:
        leaves = {t.fingerprint for t in self.targets.values() if t.fingerprint}
        many = len(leaves) > 1
        what = f"{len(leaves)} certificates" if many else f"leaf {self.fingerprint[:16]}…"
        lines = [f"rollout {self.rollout_id}: {self.state.upper()}  {what}  worst {self.worst}"
                 + (f"  ({len(self.unreachable)} unreachable, skipped)" if self.unreachable else "")]
        leaf_column = f"{'LEAF':<13}" if many else ""
        lines.append(f"  {'WAVE':<5} {'TARGET':<32} {'OUTCOME':<12} {'MS':>7}  {leaf_column}DEPLOY / WHY")
        for addr, run in sorted(self.targets.items(), key=lambda kv: (kv[1].wave, kv[0])):
            why = run.error or run.reason or ("already deployed there" if run.outcome == "unchanged" else "")
            leaf = f"{(run.fingerprint or '-')[:12]:<13}" if many else ""
            lines.append(f"  {run.wave + 1:<5} {addr:<32} {run.outcome:<12} {run.ms if run.ms is not None else '-':>7}"
                         f"  {leaf}{run.deploy_id or '-'}{'  ' + why[:100] if why else ''}")
        for fp, why in sorted(self.unused.items()):
            lines.append(f"  {'-':<5} {'leaf ' + fp[:16] + '…':<32} {'unused':<12} {'':>7}  {why[:160]}")
        for addr, why in sorted(self.unreachable.items()):
            lines.append(f"  {'-':<5} {addr:<32} {'skipped':<12} {'':>7}  unreachable: {why[:150]}")
        lines += [f"  note: {n}" for n in self.notes]
        for addr, names in sorted(self.not_covered.items()):
            lines.append(f"  {'-':<5} {addr:<32} {'not covered':<12} {'':>7}  the certificate does not cover "
                         f"{', '.join(names)}")
        return "\n".join(lines)


def plan_waves(n: int, spec: str) -> list[int]:
    """Wave sizes for ``n`` targets from a spec like ``"1,25%,100%"`` (cumulative: a
    count or a share of all targets). Empty waves are dropped; the last wave always
    takes whatever is left."""
    sizes: list[int] = []
    done = 0
    for raw in [p.strip() for p in spec.split(",") if p.strip()]:
        try:
            share = float(raw[:-1]) if raw.endswith("%") else None
            count = int(raw) if share is None else 0
        except ValueError:
            raise RolloutError(f"waves: {raw!r} is neither a count nor a percentage") from None
        if (share is not None and not 0 < share <= 100) or count < 0:  # (also refuses nan and inf)
            raise RolloutError(f"waves: {raw!r} is out of range")
        upto = math.ceil(n * share / 100) if share is not None else count
        upto = min(upto, n)
        if upto > done:
            sizes.append(upto - done)
            done = upto
    if done < n:
        sizes.append(n - done)
    return sizes


def default_rollout_id(fingerprint: str, selected: list[str]) -> str:
    digest = hashlib.sha256("\n".join(sorted(selected)).encode()).hexdigest()[:8]
    return f"r-{fingerprint[:12]}-{digest}"


def select(entries: list[dict[str, Any]], *, targets: list[str] | None, label: str | None,
           covers: list[str] | None, leaf: Any) -> tuple[list[str], dict[str, list[str]], dict[str, str]]:
    """(addresses to deploy, {address: names the certificate does not cover},
    {address: why it cannot be reached}) from the registry's entries. Exactly one way
    of choosing must be given.

    Every target the registry knows is considered, live worker or not: a target left
    out because its worker is down would keep its old certificate while the rollout
    reported done. Unreachable ones are returned apart; the caller halts on them (or,
    asked to, skips them and says so)."""
    if sum(x is not None for x in (targets, label, covers)) != 1:
        raise RolloutError("choose the targets one way: --targets, --label or --covers")
    by_addr = {f"{e['host']}/{e['target']}": e for e in entries}
    if targets is not None:
        missing = [t for t in targets if t not in by_addr]
        if missing:
            raise RolloutError(f"not registered by any worker: {', '.join(missing)}")
        chosen = list(dict.fromkeys(targets))
    elif label is not None:
        chosen = sorted(a for a, e in by_addr.items() if label in (e.get("labels") or []))
    else:
        assert covers is not None
        wanted = [c.lower().rstrip(".") for c in covers]  # certbot's domains: a wildcard covers a label
        chosen = sorted(a for a, e in by_addr.items() if any(name_covered(n, wanted) for n in e.get("names") or []))
    not_covered: dict[str, list[str]] = {}
    if covers is not None:
        for addr in list(chosen):
            missing_names = uncovered(by_addr[addr].get("names") or [], leaf)
            if missing_names:
                not_covered[addr] = missing_names
                chosen.remove(addr)
    if not chosen:
        how = f"label {label!r}" if label is not None else f"names {', '.join(covers or [])}" \
            if covers is not None else "targets"
        sans = ", ".join(leaf_names(leaf)) or "no DNS name"
        skipped = "; ".join(f"{a} also serves {', '.join(n)}" for a, n in sorted(not_covered.items()))
        raise NothingSelected(f"no target selected by {how}: the certificate covers {sans}"
                           + (f" ({skipped})" if skipped else ""))
    unreachable = {a: f"no live worker on host {by_addr[a]['host']}" for a in chosen
                   if not by_addr[a].get("worker_alive", True)}
    return [a for a in chosen if a not in unreachable], not_covered, unreachable


def unregistered(entries: list[dict[str, Any]], keys: Any) -> dict[str, str]:
    """Hosts the pipeline's keys name that have registered no target: the registry
    cannot say what they serve (their worker never ran, or Redis lost its data and
    the worker is not running to register again), so a rollout by label or names
    cannot claim to cover them."""
    known = {e["host"] for e in entries}
    return {f"{h}/*": f"host {h} is in {keys.source or 'the pipeline keys'} but has registered no target "
                      "(worker not running, or Redis lost the registry)"
            for h in sorted(getattr(keys, "hosts", {}) or {}) if h not in known}


def _reachable(fleet: list[dict[str, Any]], keys: Any, targets: list[str] | None, label: str | None,
               covers: list[str] | None, leaf: Any,
               skip_unreachable: bool) -> tuple[list[str], dict[str, list[str]], dict[str, str]]:
    """``select``, with the hosts the pipeline keys pin but the registry lacks (by label
    or names), halting on what cannot be reached unless told to skip it; refuses a
    selection left empty by the skipping."""
    chosen, not_covered, unreachable = select(fleet, targets=targets, label=label, covers=covers, leaf=leaf)
    if targets is None:
        unreachable.update(unregistered(fleet, keys))
    check_reachable(unreachable, skip_unreachable)
    if not chosen:
        raise RolloutError("no selected target is reachable: " + "; ".join(unreachable.values()))
    return chosen, not_covered, unreachable


def check_reachable(unreachable: dict[str, str], skip_unreachable: bool) -> None:
    """Halt before anything is sent when a selected target cannot be reached, unless
    the caller chose to go on without it (it is then listed, skipped)."""
    if unreachable and not skip_unreachable:
        raise RolloutError("nothing sent: the rollout cannot reach "
                           + "; ".join(f"{a} ({why})" for a, why in sorted(unreachable.items()))
                           + ". Start those workers, `mailtls forget HOST` a host gone for good (and drop it from "
                             "the pipeline keys), or give --skip-unreachable to roll out to the rest")


def rollout(cert_pem: bytes, key_pem: bytes, chain_pem: bytes | None = None, *,
            targets: list[str] | None = None, label: str | None = None, covers: list[str] | None = None,
            waves: str = "1,25%,100%", continue_on_error: bool = False, force: bool = False,
            broker_url: str | None = None, pipeline: Any = None, rollout_id: str | None = None,
            timeout: float = 600.0, also: list[tuple[bytes, bytes, bytes | None]] | None = None,
            skip_unreachable: bool = False) -> RolloutResult:
    """Roll one certificate out to the selected targets, wave by wave; see the module doc.
    A selected target whose host has no live worker (or, selecting by label or names, a
    host of the pipeline keys that has registered nothing) halts the rollout before
    anything is sent, unless ``skip_unreachable``: then it is listed, skipped."""
    from .coordination import Coordinator
    from .workflow import Certificate

    keys, app = _keys_and_app(pipeline, broker_url)
    co = Coordinator.for_url(url_of(app))
    leaf = _leaf(cert_pem, "cert")
    fleet = co.fleet()
    chosen, not_covered, unreachable = _reachable(fleet, keys, targets, label, covers, leaf, skip_unreachable)
    bundle = Certificate(None, cert_pem, key_pem, chain_pem, tuple(also or ()))
    fp = material.fingerprint(leaf)
    return _rollout(co, app, keys, {a: (bundle, fp) for a in chosen}, not_covered, fp,
                    {"targets": targets, "label": label, "covers": covers, "waves": waves}, rollout_id, waves,
                    force=force, timeout=timeout, continue_on_error=continue_on_error, unreachable=unreachable)


def rollout_check(cert_pem: bytes, key_pem: bytes, chain_pem: bytes | None = None, *,
                  targets: list[str] | None = None, label: str | None = None, covers: list[str] | None = None,
                  force: bool = False, broker_url: str | None = None, pipeline: Any = None,
                  timeout: float = 120.0, also: list[tuple[bytes, bytes, bytes | None]] | None = None,
                  skip_unreachable: bool = False) -> list[Any]:
    """``rollout --check``: the targets a rollout would select (unreachable ones
    refused as it refuses them), each checked by its worker (``workflow.check``):
    one report per target, nothing changed anywhere, no waves."""
    from .coordination import Coordinator
    from .workflow import check

    keys, app = _keys_and_app(pipeline, broker_url)
    co = Coordinator.for_url(url_of(app))
    fleet = co.fleet()
    leaf = _leaf(cert_pem, "cert")
    chosen, _, _ = _reachable(fleet, keys, targets, label, covers, leaf, skip_unreachable)
    return [check(addr, cert_pem, key_pem, chain_pem, force=force, broker_url=url_of(app),
                  pipeline=keys, also=also, timeout=timeout) for addr in chosen]


def rollout_many(certificates: list[Any], *, waves: str = "1,25%,100%", continue_on_error: bool = False,
                 force: bool = False, broker_url: str | None = None, pipeline: Any = None,
                 rollout_id: str | None = None, timeout: float = 600.0,
                 overlap: Literal["refuse", "newer"] = "refuse", skip_unreachable: bool = False) -> RolloutResult:
    """Roll several certificates out at once (``workflow.Certificate``s: renewals of
    several domains), wave by wave over all their targets. A certificate that names
    its target goes there; one that does not goes to every target whose names it all
    covers (``covers`` with the leaf's own names). In each wave, the certificates of
    one host go as one batch (``deploy_many``): one validate, one reload per daemon.
    A target chosen by two certificates is refused before anything is sent, or
    (``overlap="newer"``, as certbot's spool: a wildcard and a single-name lineage
    both renewed) gets the one issued last. Unreachable targets halt it before anything
    is sent, or are skipped and listed (``skip_unreachable``), as in ``rollout``."""
    from .coordination import Coordinator

    if not certificates:
        raise RolloutError("no certificate to roll out")
    keys, app = _keys_and_app(pipeline, broker_url)
    co = Coordinator.for_url(url_of(app))
    fleet = co.fleet()
    bundles: dict[str, tuple[Any, str]] = {}
    issued: dict[str, Any] = {}
    unused: dict[str, str] = {}
    not_covered: dict[str, list[str]] = {}
    unreachable: dict[str, str] = {}
    for i, c in enumerate(certificates, 1):
        leaf = _leaf(c.cert, f"certificate {i}")
        fp = material.fingerprint(leaf)
        if c.target is not None and "/" in c.target:
            host, name = co.resolve(c.target)
            chosen, _, down = select(fleet, targets=[f"{host}/{name}"], label=None, covers=None, leaf=leaf)
        elif c.target is not None:  # a bare NAME: that target on every host that defines it
            chosen = sorted(f"{e['host']}/{e['target']}" for e in fleet if e["target"] == c.target)
            if not chosen:
                raise RolloutError(f"certificate {i}: no host has registered a target {c.target!r}")
            chosen, _, down = select(fleet, targets=chosen, label=None, covers=None, leaf=leaf)
            down.update(unregistered(fleet, keys))
        else:  # the names it was renewed for (certbot's RENEWED_DOMAINS), else its own
            try:
                chosen, missed, down = select(fleet, targets=None, label=None,
                                              covers=list(c.covers) or leaf_names(leaf), leaf=leaf)
            except RolloutError as err:  # one lineage for a web server: the others still go out
                unused[fp] = str(err)
                continue
            not_covered.update(missed)
            down.update(unregistered(fleet, keys))
        unreachable.update(down)
        for addr in chosen:
            if addr in bundles and overlap == "refuse":
                raise RolloutError(f"{addr} is chosen by two certificates (leaf {bundles[addr][1][:16]}… and "
                                   f"{fp[:16]}…): give each target one certificate")
            if addr in bundles and issued[addr].not_valid_before_utc >= leaf.not_valid_before_utc:
                continue  # it keeps the one issued last
            bundles[addr], issued[addr] = (c, fp), leaf
    check_reachable(unreachable, skip_unreachable)
    if not bundles:
        raise NothingSelected("no target selected by any certificate: "
                           + "; ".join([*unused.values(), *unreachable.values()]))
    fps = sorted({fp for _, fp in bundles.values()})
    fingerprint = fps[0] if len(fps) == 1 else "set-" + hashlib.sha256("\n".join(fps).encode()).hexdigest()
    return _rollout(co, app, keys, bundles, {a: n for a, n in not_covered.items() if a not in bundles},
                    fingerprint, {"certificates": len(certificates), "waves": waves}, rollout_id, waves,
                    force=force, timeout=timeout, continue_on_error=continue_on_error, batches=True, unused=unused,
                    unreachable=unreachable)


def _keys_and_app(pipeline: Any, broker_url: str | None) -> tuple[Any, Any]:
    from ..security.keys import PipelineKeys, load_pipeline
    from .app import client_app

    keys = pipeline if isinstance(pipeline, PipelineKeys) else load_pipeline(pipeline)
    return keys, client_app(broker_url)


def _leaf(cert_pem: bytes, what: str) -> Any:
    leaf = material.leaf_of_file(cert_pem)
    if leaf is None:
        raise Rejected(f"{what}: no certificate to roll out")
    return leaf


def _rollout(co: Any, app: Any, keys: Any, bundles: dict[str, tuple[Any, str]], not_covered: dict[str, list[str]],
             fingerprint: str, selection: dict[str, Any], rollout_id: str | None, waves: str, *, force: bool,
             timeout: float, continue_on_error: bool, batches: bool = False,
             unused: dict[str, str] | None = None, unreachable: dict[str, str] | None = None) -> RolloutResult:
    chosen = sorted(bundles) if "certificates" in selection else list(bundles)
    rid = rollout_id or default_rollout_id(fingerprint, chosen)
    sizes = plan_waves(len(chosen), waves)
    plan: list[list[str]] = []
    i = 0
    for size in sizes:
        plan.append(chosen[i:i + size])
        i += size
    previous = co.get_rollout(rid)
    result = RolloutResult(rollout_id=rid, fingerprint=fingerprint, waves=plan, not_covered=not_covered,
                           selection=selection, unused=unused or {}, unreachable=unreachable or {},
                           created=(previous or {}).get("created") or dt.datetime.now(dt.UTC).isoformat(
                               timespec="seconds"))
    before = (previous or {}).get("targets") or {}
    result.targets = {}
    for w, wave in enumerate(plan):
        for addr in wave:  # a resumed rollout shows what the last run got until this one redoes it
            try:
                result.targets[addr] = TargetRun.model_validate({**before[addr], "wave": w}) if addr in before \
                    else TargetRun(wave=w)
            except ValueError:
                result.targets[addr] = TargetRun(wave=w)
            result.targets[addr].fingerprint = bundles[addr][1]
    if result.unreachable:
        _show_skipped(app, result)
    if keys.notify:  # a typo in the pipeline file's URLs is found before anything is sent
        from ..notify import check_urls

        check_urls(keys.notify, f"{keys.source}: notify")
    co.put_rollout(result.model_dump(mode="json"))
    try:
        _run_waves(co, app, keys, result, plan, {a: b for a, (b, _) in bundles.items()}, force=force,
                   timeout=timeout, continue_on_error=continue_on_error, batches=batches)
    except redis.RedisError as err:  # past what a failover's retries ride out
        raise BrokerError(f"lost Redis during rollout {rid}: {err}. The deploys already sent finish on their hosts "
                          f"either way (`mailtls rollout-status {rid}`); it is safe to retry: the same rollout run "
                          "again resumes, and a target already serving the certificate ends unchanged") from None
    finally:  # whatever escaped, the record says where the rollout stopped
        if result.state == "running":
            result.state = "halted"
        result.updated = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        if result.state == "halted" and keys.notify:
            result.notes += _announce(result, keys.notify)
        with contextlib.suppress(redis.RedisError):  # Redis gone: the error above says so
            co.put_rollout(result.model_dump(mode="json"))
    return result


def _show_skipped(app: Any, result: RolloutResult) -> None:
    """A row in Flower for each target skipped as unreachable (no task runs for it:
    no worker would take it). Celery's monitoring events, as a worker sends them for a
    task it received and failed: ``mailtls.rollout.skipped``, the target and rollout in
    its args, why in its exception. Best effort: the rollout record has them anyway."""
    import uuid

    try:
        with app.events.default_dispatcher(hostname=f"mailtls-rollout@{result.rollout_id}") as d:
            for addr, why in sorted(result.unreachable.items()):
                task_id = str(uuid.uuid4())
                d.send("task-received", uuid=task_id, name="mailtls.rollout.skipped",
                       args=f"{addr} · rollout {result.rollout_id}", kwargs="", retries=0, eta=None,
                       root_id=task_id, parent_id=None, retry=False)
                d.send("task-failed", uuid=task_id, exception=f"skipped, unreachable: {why}", traceback="",
                       retry=False)
    except Exception as err:  # noqa: BLE001 -- a view; the record and the summary list them
        import logging

        logging.getLogger(__name__).debug("could not show the skipped targets in Flower: %s", err)


def _announce(result: RolloutResult, urls: list[str]) -> list[str]:
    """A halted rollout, announced by its client from the pipeline file's URLs."""
    from ..core.notices import for_rollout
    from ..notify import deliver_bounded

    got = deliver_bounded(urls, for_rollout(result))
    return ([f"notified {', '.join(got.sent)}"] if got.sent else []) + (
        [f"notification failed: {', '.join(got.shown_failed)}"] if got.failed else [])


def _run_waves(co: Any, app: Any, keys: Any, result: RolloutResult, plan: list[list[str]], bundles: dict[str, Any],
               *, force: bool, timeout: float, continue_on_error: bool, batches: bool) -> None:
    """Each wave: a deploy per target, sent as one Celery group; with ``batches``
    (several certificates), a host with several targets in the wave gets one batch of
    them instead. (One certificate to a host's Postfix and Dovecot stays two deploys:
    they usually share its files, and one's failure is not the other's.)"""
    from .workflow import DeployTimeout, enqueue_batch, prepare, seal_one

    rid = result.rollout_id
    halted = False
    for wave in plan:
        if halted:
            for addr in wave:
                result.targets[addr].outcome = "skipped"
                result.targets[addr].reason = "an earlier wave failed"
            continue
        handles = []
        signatures = []
        by_host: dict[str, list[str]] = {}
        for addr in wave:
            by_host.setdefault(addr.split("/", 1)[0] if batches else addr, []).append(addr)
        for addrs in by_host.values():
            sealed = []
            for addr in addrs:
                run, c = result.targets[addr], bundles[addr]
                run.outcome, run.reason, run.error, run.ended, run.ms = "pending", None, None, None, None
                try:
                    if len(addrs) == 1:
                        handle, signature = prepare(co, app, keys, addr, c.cert, c.key, c.chain, force=force,
                                                    rollout_id=rid, also=list(c.also) or None)
                        handles.append((addr, handle, time.monotonic()))
                        signatures.append(signature)
                        run.deploy_id = handle.deploy_id
                    else:
                        sealed.append((addr, seal_one(co, keys, addr, c, force=force)))
                except MailTLSError as err:  # e.g. the host's key is not in pipeline.toml: nothing sent
                    run.outcome, run.error = ("failed" if isinstance(err, BrokerError) else "rejected"), str(err)
                    continue
                run.started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            if sealed:
                try:
                    for (addr, _), handle in zip(sealed, enqueue_batch(co, [e for _, e in sealed], rid),
                                                 strict=True):
                        handles.append((addr, handle, time.monotonic()))
                        result.targets[addr].deploy_id = handle.deploy_id
                except MailTLSError as err:
                    for addr, _ in sealed:
                        result.targets[addr].outcome, result.targets[addr].error = "failed", f"not sent: {err}"
        co.put_rollout(result.model_dump(mode="json"))
        if signatures:
            try:
                group(signatures, app=app).apply_async(ignore_result=True)
            except Exception as err:  # noqa: BLE001 -- recorded per target, below
                sent = {s.kwargs.get("deploy_id") for s in signatures}
                for addr, h, _ in handles:
                    if h.deploy_id in sent:
                        result.targets[addr].outcome, result.targets[addr].error = "failed", f"not sent: {err}"
                handles = [(a, h, t) for a, h, t in handles if h.deploy_id not in sent]
        for addr, handle, t0 in handles:
            run = result.targets[addr]
            try:
                res = handle.get(timeout=timeout)
                run.outcome, run.reason, run.error = res.outcome, res.reason, res.error
                if res.outcome == "rejected" and res.reason in NEVER_STARTED:
                    run.outcome = "timeout"
            except DeployTimeout as err:
                run.outcome, run.error = "timeout", str(err)
            except MailTLSError as err:  # lost Redis while waiting: the host finishes it either way
                run.outcome, run.error = "timeout", f"{err}; follow it with: mailtls status {handle.deploy_id}"
            run.ended = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            run.ms = int((time.monotonic() - t0) * 1000)
            co.put_rollout(result.model_dump(mode="json"))
        if any(result.targets[a].outcome in HALTING for a in wave) and not continue_on_error:
            halted = True
    result.state = "halted" if halted else "done"

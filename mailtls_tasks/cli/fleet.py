"""Reading the fleet from Redis: ``status`` of a deploy, a target's ``history``,
the registered ``targets``, the drift ``audit``, and ``forget`` for a host gone
for good."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from ..errors import BrokerError, MailTLSError
from .common import broker_option, config_option, coordinator, emit, fail, load_config


@click.command()
@click.argument("deploy_id")
@broker_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--wait", "wait_s", default=0.0, metavar="SECONDS", help="wait this long for an outcome")
def status(deploy_id: str, broker: str | None, as_json: bool, wait_s: float) -> None:
    """Show a deploy's record (exit code as for deploy once it has ended)."""
    try:
        co = coordinator(broker)
        rec = co.wait_record(deploy_id, wait_s) if wait_s else co.get_record(deploy_id)
    except MailTLSError as err:
        fail(str(err), err.exit_code, as_json)
    if rec is None:
        fail(f"no record of deploy {deploy_id}", 1, as_json)
    if rec.get("outcome"):
        from ..core.result import DeployResult

        emit(DeployResult.from_public(rec), as_json)
    click.echo(json.dumps(rec) if as_json else f"{rec.get('target')}: {rec.get('phase')} (not finished)")


@click.command()
@click.argument("target")
@broker_option
@config_option
@click.option("--local", is_flag=True, help="from this host's journal (the targets file's state_dir), not Redis")
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def history(target: str, broker: str | None, config_path: str | None, local: bool, limit: int,
            as_json: bool) -> None:
    """The last deploys of TARGET (HOST/NAME, or a NAME one host defines), newest first.

    On a mail host the journal has them all, Redis or not (``--local`` deploys and
    certbot hooks publish nothing): with --local, or when Redis cannot be reached and
    a targets file can be read, they are read from there."""
    try:
        if local:
            rows = _journal_history(config_path, target, limit)
        else:
            try:
                co = coordinator(broker)
            except BrokerError as err:
                rows = _journal_history(config_path, target, limit, because=err)
            else:
                host, name = co.resolve(target)
                rows = co.history(f"{host}/{name}", limit)
    except MailTLSError as err:
        fail(str(err), err.exit_code, as_json)
    if as_json:
        click.echo(json.dumps(rows))
        return
    for r in rows:
        fp = (r.get("fingerprint") or "-")[:16]
        click.echo(f"{r.get('created', '?'):<30} {r['deploy_id']:<28} {r.get('outcome') or r.get('phase'):<12} {fp}"
                   + (f"  {r['error']}" if r.get("error") else ""))


def _journal_history(config_path: str | None, target: str, limit: int,
                     because: MailTLSError | None = None) -> list[dict[str, Any]]:
    """This host's journal, as ``history`` rows; raises ``because`` (the broker's
    error) when there is no targets file to read it from."""
    from ..core.journal import Journal

    try:
        cfg = load_config(config_path)
    except MailTLSError:
        if because is not None:
            raise because from None
        raise
    name = target.split("/", 1)[1] if target.startswith(f"{cfg.host}/") else target
    t = cfg.target(name)
    if because is not None:
        click.echo(f"mailtls: {because}; reading this host's journal ({cfg.state_dir}) instead", err=True)
    recs = Journal(cfg.state_dir).records(t.name)[::-1][:limit]
    return [{"deploy_id": r.deploy_id, "target": f"{cfg.host}/{t.name}", "host": cfg.host, "created": r.created,
             "phase": r.phase, "outcome": r.outcome, "reason": r.reason, "fingerprint": r.fingerprint,
             "error": r.error, "origin": r.origin} for r in recs]


@click.command()
@click.argument("host")
@broker_option
def forget(host: str, broker: str | None) -> None:
    """Remove a host that is gone for good from the fleet registry (its targets, names,
    labels and audits). Refused while its worker is alive; a worker that starts again
    registers anew."""
    try:
        removed = coordinator(broker).forget_host(host)
    except MailTLSError as err:
        fail(str(err), err.exit_code)
    click.echo(f"forgot host {host}: {removed} target(s)")


@click.command()
@broker_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def targets(broker: str | None, as_json: bool) -> None:
    """The fleet: every registered target, its host, what it serves and whether its worker is alive."""
    try:
        rows = coordinator(broker).fleet()
    except MailTLSError as err:
        fail(str(err), err.exit_code, as_json)
    if as_json:
        click.echo(json.dumps(rows))
        return
    host = None
    for r in rows:
        if r["host"] != host:
            if host is not None:
                click.echo("")
            host = r["host"]
            click.echo(f"{host}  (worker {'alive' if r['worker_alive'] else 'DOWN'})")
            click.echo(f"  {'TARGET':<24} {'MODE':<8} {'FINGERPRINT':<18} {'NOT AFTER':<26} {'LAST':<22} "
                       "LABELS / NAMES")
        last = r.get("last_outcome") or "-"
        tags = ",".join(r.get("labels") or []) + (" " if r.get("labels") else "") + ",".join(r.get("names") or [])
        fp = (r.get("fingerprint_sha256") or "-")[:16]
        click.echo(f"  {r['host'] + '/' + r['target']:<24} {r['mode']:<8} {fp:<18} {r.get('not_after') or '-':<26} "
                   f"{last:<22} {tags}")
        if r.get("last_reason"):
            click.echo(f"  {'':<24} why: {r['last_reason']}")


@click.command()
@broker_option
@config_option
@click.option("--local", is_flag=True, help="audit this host's targets now, from its targets file (no broker)")
@click.option("--now", "refresh", is_flag=True, help="ask every live worker to audit now, and wait for it")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def audit(broker: str | None, config_path: str | None, local: bool, refresh: bool, as_json: bool) -> None:
    """What every target serves, against what is on disk and what was deployed.

    Exit like a monitoring check: 0 ok, 1 warning (expires within warn_days), 2
    critical (drift, a chain that does not verify, expired, a listener down), 3
    unknown (Redis unreachable, a host's worker not running or not answering --now:
    its last audit is shown, marked stale)."""
    from ..core.audit import SEVERITY, TargetAudit

    stale: set[str] = set()
    try:
        if local:
            from ..core.host import HostRuntime

            audits = HostRuntime(load_config(config_path)).audit()
        else:
            co = coordinator(broker)
            silent = _audit_now(co) if refresh else set()
            alive = {r["host"]: r["worker_alive"] for r in co.fleet()}
            audits = [TargetAudit.model_validate(d) for d in co.audits()]
            for a in audits:
                host = a.target.split("/", 1)[0]
                if not alive.get(host) or host in silent:
                    stale.add(a.target)
                    a.issues.append(f"stale: the worker of host {host} is "
                                    f"{'not answering' if host in silent else 'not running'}; this audit is "
                                    f"from {a.at[:19]}")
    except MailTLSError as err:
        fail(str(err), 3, as_json)
    audits.sort(key=lambda a: a.target)
    worst = max((SEVERITY[a.status] for a in audits), default=0)
    code = 2 if worst == 2 else 3 if stale else worst
    if as_json:
        click.echo(json.dumps([{**a.model_dump(mode="json"), "stale": a.target in stale} for a in audits]))
        sys.exit(code)
    click.echo(f"{'TARGET':<26} {'STATUS':<9} {'DAYS':>6} {'ON DISK':<14} {'SERVED':<14} {'DEPLOYED':<14} "
               f"{'CHAIN':<6} AUDITED")
    for a in audits:
        served = ",".join(sorted({(la.served_fingerprint or "down")[:12] for la in a.listeners})) or "-"
        chain_ok = all(v == "ok" for la in a.listeners for v in la.chain.values())
        chain = "-" if not any(la.chain for la in a.listeners) else ("ok" if chain_ok else "BROKEN")
        days = f"{a.days_left:.1f}" if a.days_left is not None else "-"
        status = a.status.upper() + ("?" if a.target in stale else "")
        click.echo(f"{a.target:<26} {status:<9} {days:>6} {(a.on_disk_fingerprint or '-')[:12]:<14} "
                   f"{served:<14} {(a.last_deployed_fingerprint or '-')[:12]:<14} {chain:<6} {a.at[:19]}")
        for issue in a.issues:
            click.echo(f"    {issue}")
    if not audits:
        click.echo("no audit results yet (workers audit every audit_interval; `mailtls audit --now` asks them)")
    sys.exit(code)


AUDIT_NOW_WAIT = 120.0


def _audit_now(co: Any) -> set[str]:
    """Ask every live worker to audit now; wait for them all together (one budget, not
    one per host). Returns the hosts that did not answer in time."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    from ..distributed.app import queue_for, use_broker

    app = use_broker(co.url)
    hosts = sorted({r["host"] for r in co.fleet() if r["worker_alive"]})
    pending = {h: app.send_task("mailtls.audit", kwargs={"host": h}, queue=queue_for(h), argsrepr=h,
                                ignore_result=False) for h in hosts}
    deadline = time.monotonic() + AUDIT_NOW_WAIT
    silent = set()
    for host, result in pending.items():
        try:
            result.get(timeout=max(0.1, deadline - time.monotonic()))
        except CeleryTimeout:
            silent.add(host)
            click.echo(f"mailtls: host {host} did not answer the audit within {AUDIT_NOW_WAIT:g}s", err=True)
    return silent

"""``mailtls certbot-hook``: certbot's --deploy-hook, on this host or as a rollout."""

from __future__ import annotations

import contextlib
import sys
from typing import Any, NoReturn, overload

import click

from ..errors import MailTLSError, Rejected
from .common import broker_option, config_option, env_file_option, fail, load_config, read_input
from .deploy import deploy_local

DISTRIBUTED_SPOOL = "/var/lib/mailtls/certbot-spool"


@click.command("certbot-hook")
@config_option
@click.option("--distributed", is_flag=True, help="deploy through the pipeline (a rollout) instead of on this host")
@click.option("--spool", is_flag=True,
              help="as --deploy-hook: note the renewed lineage; --deploy-spool then deploys every one noted")
@click.option("--deploy-spool", is_flag=True,
              help="as --post-hook: deploy every lineage --spool noted since, as one batch (one check and one "
                   "reload per daemon)")
@click.option("--spool-dir", metavar="DIR",
              help="where --spool notes lineages (default: certbot-spool under the targets file's state_dir; "
                   f"with --distributed and no targets file, {DISTRIBUTED_SPOOL})")
@click.option("--waves", default="1,100%", show_default=True, help="with --distributed")
@click.option("--skip-unreachable", is_flag=True,
              help="with --distributed: go on without a target whose host has no live worker (listed)")
@broker_option
@click.option("--pipeline", "pipeline_path", metavar="FILE", envvar="MAILTLS_PIPELINE", help="pipeline keys")
@click.option("--check", "check_only", is_flag=True,
              help="run by hand with RENEWED_LINEAGE set (certbot's --dry-run calls no deploy hook): check the "
                   "lineage on every target it is for and say what would change; change nothing")
@env_file_option
def certbot_hook(config_path: str | None, distributed: bool, spool: bool, deploy_spool: bool, spool_dir: str | None,
                 waves: str, skip_unreachable: bool, broker: str | None, pipeline_path: str | None,
                 check_only: bool) -> None:
    """certbot's --deploy-hook: deploy the renewed lineage to every target whose names it covers.

    Reads RENEWED_LINEAGE (the live/ directory: fullchain.pem, privkey.pem) and
    RENEWED_DOMAINS. One line per target; exit by the worst outcome (certbot ignores
    a hook's exit code: watch the log, `mailtls history`, or the audit).

    Many lineages renewed in one certbot run: `--deploy-hook "mailtls certbot-hook
    --spool" --post-hook "mailtls certbot-hook --deploy-spool"` deploys them all as one
    batch (the spool under state_dir holds lineage paths and names, never a key). With
    --distributed, the post-hook rolls them out together: each to the targets whose
    names it covers, the certificates of one host as one batch per wave.

    A lineage no target is for (a host may have certificates for other servers) is
    said so, and exits 0."""
    import os

    if check_only and (spool or deploy_spool):
        raise click.UsageError("--check takes one lineage (RENEWED_LINEAGE), not the spool")
    if deploy_spool:
        d = _spool_dir(config_path, spool_dir, distributed)
        if distributed:
            _roll_out_spool(d, waves, broker, pipeline_path, skip_unreachable)
        _deploy_spool(config_path, d)
    lineage = os.environ.get("RENEWED_LINEAGE")
    if not lineage:
        fail("RENEWED_LINEAGE is not set: run me as certbot's --deploy-hook", 1)
    domains = (os.environ.get("RENEWED_DOMAINS") or "").split()
    if spool:
        _spool(_spool_dir(config_path, spool_dir, distributed), lineage, domains)
    cert, key, leaf = _read_lineage(lineage)
    if check_only:
        _check_lineage(config_path, distributed, lineage, cert, key, leaf, domains, skip_unreachable, broker,
                       pipeline_path)
    if distributed:
        from ..distributed.rollout import NothingSelected
        from ..distributed.rollout import rollout as run_rollout

        try:
            result = run_rollout(cert, key, None, covers=domains or None, waves=waves, broker_url=broker,
                                 pipeline=pipeline_path, skip_unreachable=skip_unreachable)
        except NothingSelected as err:
            click.echo(f"mailtls: {lineage}: not deployed, no target is for it ({err})")
            sys.exit(0)
        except MailTLSError as err:
            fail(str(err), err.exit_code)
        _say_rollout(result)
        sys.exit(result.exit_code)
    try:
        cfg = load_config(config_path)
    except MailTLSError as err:
        fail(str(err), err.exit_code)
    chosen = _targets_for(cfg, leaf, domains)
    if not chosen:
        click.echo(f"mailtls: {lineage}: not deployed, no target on host {cfg.host} serves names it covers "
                   f"({', '.join(domains) or '?'}); if one should, set `names` on it")
        sys.exit(0)
    worst = 0
    for t in chosen:
        try:
            res = deploy_local(cfg, t.name, cert, key, None, False, None, 300.0)
        except MailTLSError as err:
            click.echo(f"mailtls: {cfg.host}/{t.name}: error: {err}")
            worst = max(worst, err.exit_code)
            continue
        _say(res)
        worst = max(worst, res.exit_code)
    sys.exit(worst)


def _check_lineage(config_path: str | None, distributed: bool, lineage: str, cert: bytes, key: bytes, leaf: Any,
                   domains: list[str], skip_unreachable: bool, broker: str | None,
                   pipeline_path: str | None) -> NoReturn:
    """--check: the report (``core.check``) of every target this lineage is for, on
    this host or (--distributed) across the fleet by each target's worker."""
    reports: list[Any] = []
    try:
        if distributed:
            from ..distributed.rollout import NothingSelected, rollout_check

            try:
                reports = rollout_check(cert, key, None, covers=domains or None, broker_url=broker,
                                        pipeline=pipeline_path, skip_unreachable=skip_unreachable)
            except NothingSelected as err:
                click.echo(f"mailtls: {lineage}: no target is for it ({err})")
                sys.exit(0)
        else:
            from ..core.check import check

            cfg = load_config(config_path)
            reports = [check(cfg, t.name, cert, key, None) for t in _targets_for(cfg, leaf, domains)]
    except MailTLSError as err:
        fail(str(err), err.exit_code)
    if not reports:
        click.echo(f"mailtls: {lineage}: no target on this host serves names it covers ({', '.join(domains) or '?'})")
        sys.exit(0)
    click.echo("\n".join(r.human() for r in reports))
    sys.exit(max(r.exit_code for r in reports))


def _say_rollout(result: Any) -> None:
    for addr, run in sorted(result.targets.items()):
        click.echo(f"mailtls: {addr}: {run.outcome}" + (f" ({run.reason})" if run.reason else "")
                   + f" deploy {run.deploy_id or '-'}" + (f": {run.error}" if run.error else ""))
    for addr, why in sorted(result.unreachable.items()):
        click.echo(f"mailtls: {addr}: skipped, unreachable: {why}")


def _say(res: Any) -> None:
    click.echo(f"mailtls: {res.target}: {res.outcome}" + (f" ({res.reason})" if res.reason else "")
               + f" deploy {res.deploy_id}" + (f": {res.error}" if res.error else ""))


@overload
def _read_lineage(lineage: str) -> tuple[bytes, bytes, Any]: ...
@overload
def _read_lineage(lineage: str, keep_going: bool) -> tuple[bytes, bytes, Any] | None: ...


def _read_lineage(lineage: str, keep_going: bool = False) -> tuple[bytes, bytes, Any] | None:
    """(fullchain, key, leaf) of a live/ lineage; unreadable: exit 2, or (``keep_going``:
    a spooled lineage deleted since) say so and return None."""
    import os

    from ..core.material import leaf_of_file

    try:
        cert = read_input(os.path.join(lineage, "fullchain.pem"), "cert")
        key = read_input(os.path.join(lineage, "privkey.pem"), "key")
        assert cert is not None and key is not None
        leaf = leaf_of_file(cert)
        if leaf is None:
            raise Rejected(f"{lineage}/fullchain.pem holds no certificate")
    except MailTLSError as err:
        if not keep_going:
            fail(str(err), 2)
        click.echo(f"mailtls: spooled lineage {lineage} is unreadable ({err}): skipped")
        return None
    return cert, key, leaf


def _targets_for(cfg: Any, leaf: Any, domains: list[str]) -> list[Any]:
    """The targets a lineage is for: names it all covers, one of them renewed now."""
    from ..core.names import name_covered, uncovered

    wanted = [d.lower().rstrip(".") for d in domains]  # a wildcard lineage covers one label under it
    return [t for t in cfg.targets.values() if t.names and not uncovered(t.names, leaf)
            and (not wanted or any(name_covered(n, wanted) for n in t.names)) and t.alt is None]


def _spool_dir(config_path: str | None, given: str | None, distributed: bool) -> str:
    """The spool: ``given``, else certbot-spool under the targets file's state_dir (a
    mail host's certbot), else, for --distributed on a machine with no targets file
    (the pipeline's certbot), DISTRIBUTED_SPOOL."""
    import os

    from ..core.configfile import config_path as resolve_config

    if given:
        return os.path.abspath(given)
    if distributed and not os.path.exists(resolve_config(config_path)):
        return DISTRIBUTED_SPOOL  # only when there is no file: a broken one is an error, not another spool
    try:
        return os.path.join(load_config(config_path).state_dir, "certbot-spool")
    except MailTLSError as err:
        fail(str(err), err.exit_code)


def _spool(d: str, lineage: str, domains: list[str]) -> NoReturn:
    """Note one renewed lineage (its path and names: certbot runs the deploy hook once
    per lineage) for the post-hook; its files are read then, from live/."""
    import json
    import os

    from ..core import files

    try:
        files.private_dirs(os.path.dirname(d), d)
        name = os.path.basename(os.path.normpath(lineage)) or "lineage"
        files.atomic_write(os.path.join(d, f"{name}.json"),
                           json.dumps({"lineage": lineage, "domains": domains}).encode(), 0o600)
    except (MailTLSError, OSError) as err:
        fail(f"cannot spool {lineage}: {err}", 1)
    click.echo(f"mailtls: spooled {lineage} for the post-hook (`certbot-hook --deploy-spool`)")
    sys.exit(0)


def _spooled(d: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(the spool's entries, (lineage, domains) of each readable one)."""
    import json
    import os

    entries = sorted(n for n in os.listdir(d) if n.endswith(".json")) if os.path.isdir(d) else []
    out = []
    for name in entries:
        try:
            with open(os.path.join(d, name)) as f:
                noted = json.load(f)
            out.append((str(noted["lineage"]), [str(x) for x in noted.get("domains", [])]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            click.echo(f"mailtls: spool entry {name} is unreadable ({err}): skipped")
    if not entries:
        click.echo("mailtls: nothing spooled: no lineage was renewed")
        sys.exit(0)
    return entries, out


def _empty(d: str, entries: list[str]) -> None:
    import os

    for name in entries:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(d, name))


def _roll_out_spool(d: str, waves: str, broker: str | None, pipeline_path: str | None,
                    skip_unreachable: bool) -> NoReturn:
    """Every spooled lineage, as one rollout (``rollout_many``): each to the targets
    whose names it all covers, a target two lineages cover taking the one issued
    last. The spool is kept when nothing was sent (Redis down, no target covered)."""
    from ..distributed.rollout import NothingSelected, rollout_many
    from ..distributed.workflow import Certificate

    entries, noted = _spooled(d)
    certificates = []
    for lineage, domains in noted:
        read = _read_lineage(lineage, keep_going=True)
        if read is not None:
            certificates.append(Certificate(None, read[0], read[1], covers=tuple(domains)))
    if not certificates:
        _empty(d, entries)
        fail("no spooled lineage could be read (see above): nothing to roll out", 2)
    try:
        result = rollout_many(certificates, waves=waves, broker_url=broker, pipeline=pipeline_path,
                              overlap="newer", skip_unreachable=skip_unreachable)
    except NothingSelected as err:
        click.echo(f"mailtls: not deployed, no target is for the spooled lineages ({err})")
        _empty(d, entries)
        sys.exit(0)
    except MailTLSError as err:
        fail(f"{err} (the spool is kept: run `mailtls certbot-hook --deploy-spool --distributed` again)",
             err.exit_code)
    _say_rollout(result)
    for fp, why in sorted(result.unused.items()):
        click.echo(f"mailtls: lineage with no target: leaf {fp[:16]}…: {why}")
    _empty(d, entries)
    sys.exit(result.exit_code)


def _deploy_spool(config_path: str | None, d: str) -> NoReturn:
    """Every spooled lineage to the targets it is for, as one batch; a target two
    lineages are for takes the newer certificate. The spool is emptied of what was
    read, whatever the outcome (a rejected member would be rejected again)."""
    from ..core.batch import Member, run_batch

    try:
        cfg = load_config(config_path)
    except MailTLSError as err:
        fail(str(err), err.exit_code)
    entries, noted = _spooled(d)
    chosen: dict[str, tuple[Any, bytes, bytes, str]] = {}
    for lineage, domains in noted:
        read = _read_lineage(lineage, keep_going=True)
        if read is None:
            continue
        cert, key, leaf = read
        for t in _targets_for(cfg, leaf, domains):
            held = chosen.get(t.name)
            if held is None or held[0].not_valid_before_utc < leaf.not_valid_before_utc:
                if held is not None:
                    click.echo(f"mailtls: {t.name}: {lineage} is newer than {held[3]}: deploying it")
                chosen[t.name] = (leaf, cert, key, lineage)
    worst = 0
    if chosen:
        try:
            results = run_batch(cfg, [Member(n, cert, key) for n, (_, cert, key, _) in sorted(chosen.items())])
        except MailTLSError as err:
            fail(str(err), err.exit_code)  # nothing touched (a target busy past the wait): the spool is kept
        for res in results:
            _say(res)
            worst = max(worst, res.exit_code)
    else:
        click.echo("mailtls: not deployed, no target on this host serves names the spooled certificates cover; "
                   "if one should, set `names` on it")
    _empty(d, entries)
    sys.exit(worst)

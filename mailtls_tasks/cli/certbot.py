"""``mailtls certbot-hook``: certbot's --deploy-hook, on this host or as a rollout."""

from __future__ import annotations

import sys

import click

from ..errors import MailTLSError
from .common import broker_option, config_option, fail, load_config, read_input
from .deploy import deploy_local


@click.command("certbot-hook")
@config_option
@click.option("--distributed", is_flag=True, help="deploy through the pipeline (a rollout) instead of on this host")
@click.option("--waves", default="1,100%", show_default=True, help="with --distributed")
@broker_option
@click.option("--pipeline", "pipeline_path", metavar="FILE", envvar="MAILTLS_PIPELINE", help="pipeline keys")
def certbot_hook(config_path: str | None, distributed: bool, waves: str, broker: str | None,
                 pipeline_path: str | None) -> None:
    """certbot's --deploy-hook: deploy the renewed lineage to every target whose names it covers.

    Reads RENEWED_LINEAGE (the live/ directory: fullchain.pem, privkey.pem) and
    RENEWED_DOMAINS. One line per target; exit by the worst outcome (certbot ignores
    a hook's exit code: watch the log, `mailtls history`, or the audit)."""
    import os

    from ..core.material import leaf_of_file
    from ..core.names import name_covered, uncovered

    lineage = os.environ.get("RENEWED_LINEAGE")
    if not lineage:
        fail("RENEWED_LINEAGE is not set: run me as certbot's --deploy-hook", 1)
    domains = (os.environ.get("RENEWED_DOMAINS") or "").split()
    try:
        cert = read_input(os.path.join(lineage, "fullchain.pem"), "cert")
        key = read_input(os.path.join(lineage, "privkey.pem"), "key")
    except MailTLSError as err:
        fail(str(err), 2)
    assert cert is not None and key is not None
    leaf = leaf_of_file(cert)
    if leaf is None:
        fail(f"{lineage}/fullchain.pem holds no certificate", 2)
    if distributed:
        from ..distributed.rollout import rollout as run_rollout

        try:
            result = run_rollout(cert, key, None, covers=domains or None, waves=waves, broker_url=broker,
                                 pipeline=pipeline_path)
        except MailTLSError as err:
            fail(str(err), err.exit_code)
        for addr, run in sorted(result.targets.items()):
            click.echo(f"mailtls: {addr}: {run.outcome}" + (f" ({run.reason})" if run.reason else "")
                       + f" deploy {run.deploy_id or '-'}" + (f": {run.error}" if run.error else ""))
        sys.exit(result.exit_code)
    try:
        cfg = load_config(config_path)
    except MailTLSError as err:
        fail(str(err), err.exit_code)
    wanted = [d.lower().rstrip(".") for d in domains]  # a wildcard lineage covers one label under it
    chosen = [t for t in cfg.targets.values() if t.names and not uncovered(t.names, leaf)
              and (not wanted or any(name_covered(n, wanted) for n in t.names)) and t.alt is None]
    if not chosen:
        fail(f"no target on host {cfg.host} serves names this certificate covers ({', '.join(domains) or '?'}); "
              "set `names` on the targets it is for", 1)
    worst = 0
    for t in chosen:
        try:
            res = deploy_local(cfg, t.name, cert, key, None, False, None, 300.0)
        except MailTLSError as err:
            click.echo(f"mailtls: {cfg.host}/{t.name}: error: {err}")
            worst = max(worst, err.exit_code)
            continue
        click.echo(f"mailtls: {res.target}: {res.outcome}" + (f" ({res.reason})" if res.reason else "")
                   + f" deploy {res.deploy_id}" + (f": {res.error}" if res.error else ""))
        worst = max(worst, res.exit_code)
    sys.exit(worst)

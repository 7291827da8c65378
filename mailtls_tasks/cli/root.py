"""The ``mailtls`` click group, with every command group attached, and ``main``:
click's exit codes mapped to ours (usage errors are 1; 2 means "rejected"), and the
fast exit of a deploy."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

import click

from .certbot import certbot_hook
from .common import exit_fast, exiting_fast
from .dane import dane
from .deploy import deploy, rollout, rollout_status
from .discover import discover
from .fleet import audit, forget, history, status, targets
from .keys import keys
from .services import check_config, flower, recover, worker


@click.group()
@click.version_option(package_name="mailtls-tasks", prog_name="mailtls", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="log progress to stderr")
def cli(verbose: bool) -> None:
    """Rotate TLS certificates on Postfix and Dovecot, verified on the wire."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


for command in (deploy, rollout, rollout_status, check_config, discover, recover, worker, flower, status, history,
                forget, targets, audit, dane, certbot_hook, keys):
    cli.add_command(command)


def main() -> None:
    exit_fast(False)
    try:
        try:
            cli.main(standalone_mode=False)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        except click.exceptions.ClickException as err:
            err.show()
            sys.exit(1)  # usage errors are 1; 2 means "rejected"
    except SystemExit as done:
        if exiting_fast():
            _hard_exit(done.code)
        raise
    if exiting_fast():
        _hard_exit(0)


def _hard_exit(code: object) -> NoReturn:
    import os

    from .early import cancel_early

    cancel_early()
    if isinstance(code, str):
        print(code, file=sys.stderr)
    logging.shutdown()
    status = code if isinstance(code, int) else 0 if code is None else 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the reader went away: output was lost, as Python says with 120
            status = status or 120
    os._exit(status)


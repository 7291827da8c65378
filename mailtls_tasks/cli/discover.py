"""``mailtls discover``: a targets file proposed from the daemons' own configuration,
the first step of setting up a host."""

from __future__ import annotations

import datetime as dt
import socket
import sys

import click

from ..errors import MailTLSError
from .common import fail


@click.command()
@click.option("--postfix-config", "postfix_dirs", multiple=True, metavar="DIR",
              help="a Postfix instance's config directory (what `postconf -c` takes); repeatable")
@click.option("--dovecot-config", "dovecot_files", multiple=True, metavar="FILE",
              help="a Dovecot instance's config file (what `doveconf -c` takes); repeatable")
@click.option("--exim-config", "exim_files", multiple=True, metavar="FILE",
              help="an Exim configuration file (what `exim -C` takes); repeatable")
@click.option("--host", metavar="NAME", help="this host's routing name in the file (default: the hostname)")
def discover(postfix_dirs: tuple[str, ...], dovecot_files: tuple[str, ...], exim_files: tuple[str, ...],
             host: str | None) -> None:
    """Print a targets file (TOML, what check-config reads) from what Postfix,
    Dovecot and Exim are configured to serve: one target per instance per set of
    files, every TLS listener a verify endpoint. Review it before use.

    Without options it reads the system's own daemons (Postfix's postmulti instances,
    and for Exim Debian's /etc/default/exim4 too); a daemon that is not installed is
    left out, saying so."""
    from ..core.discover import read, render
    from ..daemons.found import Found

    wanted: list[tuple[str, str | None]] = [("postfix", d) for d in postfix_dirs]
    wanted += [("dovecot", f) for f in dovecot_files]
    wanted += [("exim", f) for f in exim_files]
    explicit = bool(wanted)
    if not explicit:
        wanted = [("postfix", None), ("dovecot", None), ("exim", None)]
    found: list[Found] = []
    header = [f"mailtls targets proposed by `mailtls discover` on {socket.gethostname()} at "
              f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, from each daemon's own configuration.",
              "Review it: names, labels and `names = [...]` (the DNS names a certificate must cover) are yours",
              "to add; `mailtls check-config --config FILE` checks it, and the daemons, again.", ""]
    for mode, instance in wanted:
        try:
            found += read(mode, instance)
        except MailTLSError as err:
            if explicit:
                fail(str(err), err.exit_code)
            header.append(f"{mode}: not read ({err})")
    if not any(f.served for f in found):
        click.echo("mailtls: no TLS files found in the daemons' configuration" + (
            "" if found else " (no daemon could be read)"), err=True)
    name = host or socket.gethostname().split(".")[0] or "localhost"
    sys.stdout.write(render(found, name, header=header))

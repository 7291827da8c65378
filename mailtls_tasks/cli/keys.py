"""``mailtls keys``: the host's and the pipeline's keys of distributed mode."""

from __future__ import annotations

from typing import Any

import click

from ..errors import MailTLSError
from .common import config_option, fail, load_config


@click.group()
def keys() -> None:
    """Create and show the host and pipeline keys of distributed mode."""


def _create_key(create: Any, out: str, where: str) -> None:
    import os

    out = os.path.abspath(out)  # the targets file takes absolute paths only: print what it will accept
    try:
        pub = create(out)
    except MailTLSError as err:
        fail(str(err), err.exit_code)
    click.echo(f"created {out} (0600)\npublic: {pub}\n\n" + where.format(out=out, pub=pub))


@keys.command("init-host")
@click.option("--out", default="/etc/mailtls/host.key", show_default=True, metavar="FILE")
def keys_init_host(out: str) -> None:
    """Create this mail host's X25519 key (0600); prints the public half for the pipeline."""
    from ..security.keys import create_host_key

    _create_key(create_host_key, out, 'On this host, in the targets file:\n  [security]\n  host_keys = ["{out}"]\n\n'
                'In the pipeline\'s pipeline.toml, under [hosts]:\n  <host> = "{pub}"')


@keys.command("init-pipeline")
@click.option("--out", default="/etc/mailtls/pipeline.key", show_default=True, metavar="FILE")
def keys_init_pipeline(out: str) -> None:
    """Create the pipeline's Ed25519 signing key (0600); prints the public half for workers."""
    from ..security.keys import create_signing_key

    _create_key(create_signing_key, out, 'In the pipeline\'s pipeline.toml:\n  signing_key = "{out}"\n\n'
                'On every worker host, in the targets file\'s [security]:\n  trusted_signers = ["{pub}"]')


@keys.command("public")
@click.argument("key_file")
def keys_public(key_file: str) -> None:
    """Print the public half of a host or pipeline key file."""
    from ..security.keys import public_of

    try:
        click.echo(public_of(key_file))
    except MailTLSError as err:
        fail(str(err), err.exit_code)


@keys.command("trusted")
@config_option
def keys_trusted(config_path: str | None) -> None:
    """What this worker trusts: its host keys and the pipeline keys it accepts."""
    from ..security.keys import key_id, public_of

    try:
        cfg = load_config(config_path)
    except MailTLSError as err:
        fail(str(err), err.exit_code)
    if cfg.security is None:
        fail(f"{cfg.source}: no [security] section: this host accepts no distributed deploys", 1)
    for path in cfg.security.host_keys:
        try:
            pub = public_of(path)
            click.echo(f"host key         {pub}  id {key_id(pub)}  ({path})")
        except MailTLSError as err:
            click.echo(f"host key         UNUSABLE: {err}")
    for signer in cfg.security.trusted_signers:
        click.echo(f"trusted signer   {signer}  id {key_id(signer)}")
    click.echo(f"max envelope age {cfg.security.max_envelope_age:g}s")

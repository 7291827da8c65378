"""The ``mailtls`` command.

Exit codes: 0 deployed/unchanged, 2 rejected, 3 rolled_back, 4 failed, 1 usage or
infrastructure error (config unreadable, broker down, target busy too long).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, NoReturn

import click

from .config import load_config
from .errors import MailTLSError, Rejected, UnknownTarget
from .material import MAX_INPUT_BYTES
from .result import DeployResult


def _fail(message: str, code: int, as_json: bool = False, **extra: Any) -> NoReturn:
    if as_json:
        click.echo(json.dumps({"outcome": extra.pop("outcome", None), "error": message, **extra}))
    else:
        click.echo(f"mailtls: {message}", err=True)
    sys.exit(code)


def _read_input(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_INPUT_BYTES + 1)
    except OSError as err:
        raise Rejected(f"{what}: cannot read {path}: {err.strerror or err}") from None
    if len(data) > MAX_INPUT_BYTES:
        raise Rejected(f"{what}: {path} is over the {MAX_INPUT_BYTES}-byte limit")
    return data


def _emit(result: DeployResult, as_json: bool) -> NoReturn:
    if as_json:
        click.echo(json.dumps(result.as_json(), indent=None))
    else:
        click.echo(result.human())
    sys.exit(result.exit_code)


config_option = click.option("--config", "config_path", metavar="FILE",
                             help="targets file (default: $MAILTLS_CONFIG or /etc/mailtls/targets.toml)")


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="log progress to stderr")
def cli(verbose: bool) -> None:
    """Rotate TLS certificates on Postfix and Dovecot, verified on the wire."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("target")
@click.option("--cert", "cert_file", required=True, metavar="FILE", help="leaf certificate (or full chain), PEM")
@click.option("--key", "key_file", required=True, metavar="FILE", help="private key, PEM, unencrypted")
@click.option("--chain", "chain_file", metavar="FILE", help="intermediate certificates, PEM, leaf's issuer first")
@config_option
@click.option("--local", is_flag=True, help="run in-process on this host (no broker)")
@click.option("--force", is_flag=True, help="allow a leaf older than the deployed one")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--deploy-id", metavar="ID", help="idempotency key (default: generated)")
def deploy(target: str, cert_file: str, key_file: str, chain_file: str | None, config_path: str | None,
           local: bool, force: bool, as_json: bool, deploy_id: str | None) -> None:
    """Deploy a certificate, key and chain to TARGET."""
    try:
        cert = _read_input(cert_file, "cert")
        key = _read_input(key_file, "key")
        chain = _read_input(chain_file, "chain")
        assert cert is not None and key is not None
        if not local:
            _fail("distributed mode needs the Celery workflow; use --local on the mail host", 1, as_json)
        from .local import run_local

        cfg = load_config(config_path)
        result = run_local(cfg, target, cert, key, chain, force=force, deploy_id=deploy_id)
    except (UnknownTarget, Rejected) as err:
        _fail(str(err), 2, as_json, outcome="rejected", target=target)
    except MailTLSError as err:
        _fail(str(err), err.exit_code, as_json, target=target)
    _emit(result, as_json)


@cli.command("check-config")
@config_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def check_config(config_path: str | None, as_json: bool) -> None:
    """Validate the targets file and print every target with its defaults resolved."""
    try:
        cfg = load_config(config_path)
    except MailTLSError as err:
        _fail(str(err), err.exit_code)
    data = {"source": cfg.source, "host": cfg.host, "state_dir": cfg.state_dir,
            "targets": {n: t.public_view() for n, t in cfg.targets.items()}}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"config    {cfg.source}\nhost      {cfg.host}  (queue mailtls.{cfg.host})\nstate_dir {cfg.state_dir}")
    for name, t in cfg.targets.items():
        click.echo(f"\n[{name}]")
        for k, v in t.public_view().items():
            if k == "name":
                continue
            click.echo(f"  {k:<20} {v}")


@cli.command()
@config_option
def recover(config_path: str | None) -> None:
    """Roll back deploys on this host that were interrupted (e.g. by a crash)."""
    from .local import recover_host

    try:
        done = recover_host(load_config(config_path))
    except MailTLSError as err:
        _fail(str(err), err.exit_code)
    for rec in done:
        click.echo(f"{rec.target}: deploy {rec.deploy_id} -> {rec.outcome} ({rec.reason})")
    if not done:
        click.echo("nothing to recover")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.exceptions.ClickException as err:
        err.show()
        sys.exit(1)  # usage errors are 1; 2 means "rejected"
    except SystemExit:
        raise


if __name__ == "__main__":
    main()

"""What a mail host runs, mostly from systemd units: ``worker``, ``recover`` (at
boot and by hand), ``flower``, and ``check-config`` (the worker unit's
ExecStartPre)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..errors import MailTLSError
from .common import broker_option, config_option, fail, load_config, read_env_file

FLOWER_COLUMNS = "name,state,args,result,exception,received,started,runtime,worker"


@click.command("check-config")
@config_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--worker", "for_worker", is_flag=True,
              help="also check what `mailtls worker` needs to start (keys, trusted signers, state_dir); "
                   "exit 1 saying why it could not")
@click.option("--strict", is_flag=True,
              help="exit 1 when a daemon does not read a target's files, or serves a TLS file no target covers")
def check_config(config_path: str | None, as_json: bool, for_worker: bool, strict: bool) -> None:
    """Validate the targets file and print every target with its defaults resolved;
    then ask each daemon instance the targets name what it serves, and warn where the
    two disagree."""
    from ..core.discover import cross_check

    try:
        cfg = load_config(config_path)
        if for_worker:
            _check_worker(cfg)
    except MailTLSError as err:
        fail(str(err), err.exit_code)
    warnings = _missing_dirs(cfg)
    try:
        warnings += cross_check(cfg)
    except Exception as err:  # noqa: BLE001 -- a check that only warns must never stop the worker's unit
        warnings.append(f"could not compare the targets with the daemons' configuration: {type(err).__name__}: "
                        f"{err}")
    hints = {n: _listener_hints(t) for n, t in cfg.targets.items()}
    data = {"source": cfg.source, "host": cfg.host, "state_dir": cfg.state_dir,
            "targets": {n: {**t.public_view(), "suggested_endpoints": hints[n]} for n, t in cfg.targets.items()},
            "warnings": warnings}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        sys.exit(1 if strict and warnings else 0)
    click.echo(f"config    {cfg.source}\nhost      {cfg.host}  (queue mailtls.{cfg.host})\nstate_dir {cfg.state_dir}")
    for name, t in cfg.targets.items():
        click.echo(f"\n[{name}]")
        for k, v in t.public_view().items():
            if k == "name":
                continue
            click.echo(f"  {k:<20} {v}")
        if hints[name]:
            click.echo(f"  hint: {t.mode} usually also listens on {', '.join(hints[name])}: a listener the deploy "
                       "does not verify may keep serving the old certificate; list them all in "
                       "post_deploy_verify.endpoints")
    for w in warnings:
        click.echo(f"mailtls: {'error' if strict else 'warning'}: {w}", err=True)
    sys.exit(1 if strict and warnings else 0)


def _missing_dirs(cfg: Any) -> list[str]:
    """A target file whose directory does not exist: a --local deploy (root, no
    sandbox) would create it, the worker's unit cannot (ProtectSystem=strict: only
    ReadWritePaths= are writable, and a directory is not made there) -- and no daemon
    reads a file from a directory that is not there."""
    import os

    out = []
    for name, t in cfg.targets.items():
        for role, path in t.files():
            d = os.path.dirname(path)
            if not os.path.isdir(d):
                out.append(f"targets.{name}: the directory of its {role} file {path} does not exist: a --local "
                           f"deploy would create it, the sandboxed worker unit cannot; create it (e.g. install -d "
                           f"-m 0755 {d}), or fix the path")
    return out


def _check_worker(cfg: Any) -> None:
    """What the worker refuses to start without, checked before it starts (systemd's
    ExecStartPre): a unit that fails once with a reason beats a restart loop."""
    import os

    from ..core.host import HostRuntime
    from ..errors import ConfigError

    HostRuntime(cfg).security()  # the [security] section, every host key loadable and 0600, the signers parse
    d = cfg.state_dir
    while not os.path.exists(d):  # the worker creates it (0700); its nearest existing parent must let it
        d = os.path.dirname(d)
    if not os.path.isdir(d) or not os.access(d, os.W_OK | os.X_OK):
        raise ConfigError(f"state_dir {cfg.state_dir}: {d} is not a directory this user can write")
    if d == cfg.state_dir and os.stat(d).st_mode & 0o077:
        raise ConfigError(f"state_dir {d} is open to group/others (mode {os.stat(d).st_mode & 0o777:04o}); it "
                          "holds backups of private keys: chmod 0700 it")


def _listener_hints(t: Any) -> list[str]:
    """The listeners a mode usually has that the target's verify does not list."""
    listeners = t.verify_endpoints()
    if not listeners:
        return []
    ports = {li.port for li in listeners}
    host = listeners[0].host
    shown = f"[{host}]" if ":" in host else host
    return [f"{shown}:{li.port} ({li.service})" for li in t.daemon.listeners if li.port not in ports]


@click.command()
@config_option
@click.option("--force", is_flag=True,
              help="also finish deploys that still look alive (their worker is gone for good): rolls them back")
@click.option("--boot", is_flag=True,
              help="before the mail daemons start (the boot unit): roll back without proving anything on the wire; "
                   "a daemon not running yet is not a failure, it starts on the restored files")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def recover(config_path: str | None, force: bool, boot: bool, as_json: bool) -> None:
    """Finish deploys on this host whose owner died (roll forward if provably served,
    else back). Exit 4 if any ended `failed` (operator needed), else 0."""
    from ..core.journal import Journal
    from ..core.local import recover_host

    try:
        cfg = load_config(config_path)
        done = recover_host(cfg, force=force, boot=boot)
        # owned by deploys of targets this file no longer defines: nobody here can finish them
        orphans = sorted({(o.target, o.deploy_id) for o in Journal(cfg.state_dir).owners()
                          if o.target not in cfg.targets})
    except MailTLSError as err:
        fail(str(err), err.exit_code, as_json)
    if as_json:
        from ..core.result import DeployResult

        click.echo(json.dumps([DeployResult.from_record(r).as_json() for r in done]))
    else:
        for rec in done:
            click.echo(f"{rec.target}: deploy {rec.deploy_id} -> {rec.outcome} ({rec.reason})"
                       + (f"\n  {rec.error}" if rec.outcome == "failed" and rec.error else ""))
        if not done and not orphans:
            click.echo("nothing to recover")
    for target, deploy_id in orphans:
        click.echo(f"{target}: deploy {deploy_id} is unfinished, but target {target!r} is no longer in "
                   f"{cfg.source}: restore its files by hand (state_dir/targets/{target}/deploys/{deploy_id}/backup)",
                   err=True)
    sys.exit(4 if orphans or any(r.outcome == "failed" for r in done) else 0)


@click.command()
@config_option
@broker_option
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--host", envvar="MAILTLS_HOST", metavar="NAME",
              help="this host's routing name (overrides `host` in the targets file: one file for the whole fleet)")
def worker(config_path: str | None, broker: str | None, loglevel: str, host: str | None) -> None:
    """Run this mail host's worker: recovers interrupted deploys, then consumes mailtls.<host>."""
    from ..distributed.worker import run_worker

    try:
        run_worker(config_path, broker, loglevel, host=host)
    except MailTLSError as err:
        fail(str(err), err.exit_code)


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--env-file", metavar="FILE",
              help="0600 file with MAILTLS_BROKER_URL=... and MAILTLS_FLOWER_BASIC_AUTH=user:password[,...] "
                   "(else both are read from the environment)")
@click.option("--address", default="127.0.0.1", show_default=True)
@click.option("--port", default=5555, show_default=True)
@click.option("--no-auth", is_flag=True, help="allow no basic auth on an address other than loopback")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(env_file: str | None, address: str, port: int, no_auth: bool, flower_args: tuple[str, ...]) -> None:
    """Start Flower for the fleet (extra arguments are passed to Flower).

    Secrets never go on the command line, where `ps` shows them to every user of the
    host: the broker URL and the basic-auth users come from the environment
    (MAILTLS_BROKER_URL, MAILTLS_FLOWER_BASIC_AUTH) or from --env-file.
    """
    import ipaddress
    import os

    from ..distributed.app import broker_url

    # Flower and Celery take both spellings (--basic-auth, --basic_auth), and -b for --broker
    if any(a.replace("_", "-").startswith(("--basic-auth", "--broker", "-b")) for a in flower_args):
        fail("give the broker URL and basic auth in MAILTLS_BROKER_URL / MAILTLS_FLOWER_BASIC_AUTH (or --env-file), "
              "not on the command line", 1)
    try:
        given = read_env_file(env_file) if env_file else {}
    except MailTLSError as err:
        fail(str(err), err.exit_code)
    url = given.get("MAILTLS_BROKER_URL") or os.environ.get("MAILTLS_BROKER_URL")
    auth = given.get("MAILTLS_FLOWER_BASIC_AUTH") or os.environ.get("MAILTLS_FLOWER_BASIC_AUTH", "")
    try:
        loopback = address == "localhost" or ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = False
    if not auth and not loopback and not no_auth:
        fail(f"Flower on {address} would show the fleet to anyone who reaches it: set MAILTLS_FLOWER_BASIC_AUTH "
              "(user:password) or pass --no-auth", 1)
    env = {k: v for k, v in os.environ.items() if k != "MAILTLS_FLOWER_BASIC_AUTH"}
    env.update({"MAILTLS_BROKER_URL": broker_url(url),
                # the task list an operator reads: the args column carries "HOST/NAME · deploy id"
                # (argsrepr), the result column the outcome
                "FLOWER_TASKS_COLUMNS": os.environ.get("FLOWER_TASKS_COLUMNS", FLOWER_COLUMNS)})
    if auth:
        env["FLOWER_BASIC_AUTH"] = auth  # Flower reads every option from FLOWER_<NAME> too
    argv = [sys.executable, "-m", "celery", "-A", "mailtls_tasks.distributed.app", "flower",
            f"--address={address}", f"--port={port}", *flower_args]
    # exec, not a child: SIGTERM/SIGHUP from systemd or a shell reach Flower itself (a
    # child would be left running when this process was stopped)
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)  # noqa: S606 -- a fixed argv, no shell

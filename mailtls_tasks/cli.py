"""The ``mailtls`` command.

Exit codes: 0 deployed/unchanged, 2 rejected, 3 rolled_back, 4 failed, 1 usage or
infrastructure error (config unreadable, broker down, target busy too long).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn

import click

from .core.ids import MAX_INPUT_BYTES
from .errors import MailTLSError, Rejected, UnknownTarget

if TYPE_CHECKING:
    from .core.commands import Running
    from .core.config import HostConfig
    from .result import DeployResult


def load_config(path: str | None) -> HostConfig:
    """The targets file, imported only by the commands that read it (the config model
    costs a tenth of a second to import: a distributed deploy never needs it)."""
    from .core.config import load_config as load

    return load(path)


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


FLOWER_COLUMNS = "name,state,args,result,received,started,runtime,worker"

broker_option = click.option("--broker", metavar="URL", envvar="MAILTLS_BROKER_URL",
                             help="Redis URL (default: $MAILTLS_BROKER_URL or redis://127.0.0.1:6379/0)")
config_option = click.option("--config", "config_path", metavar="FILE",
                             help="targets file (default: $MAILTLS_CONFIG or /etc/mailtls/targets.toml)")


@click.group()
@click.version_option(package_name="mailtls-tasks", prog_name="mailtls", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="log progress to stderr")
def cli(verbose: bool) -> None:
    """Rotate TLS certificates on Postfix and Dovecot, verified on the wire."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("target")
@click.option("--cert", "cert_files", required=True, multiple=True, metavar="FILE",
              help="leaf certificate (or full chain), PEM; twice for a dual RSA + ECDSA target")
@click.option("--key", "key_files", required=True, multiple=True, metavar="FILE",
              help="private key, PEM, unencrypted; one per --cert, in the same order")
@click.option("--chain", "chain_files", multiple=True, metavar="FILE",
              help="intermediate certificates, PEM, leaf's issuer first; none, or one per --cert")
@config_option
@click.option("--local", is_flag=True, help="run in-process on this host (no broker)")
@click.option("--force", is_flag=True, help="allow a leaf older than the deployed one")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--deploy-id", metavar="ID", help="idempotency key (default: generated)")
@broker_option
@click.option("--pipeline", "pipeline_path", metavar="FILE", envvar="MAILTLS_PIPELINE",
              help="pipeline keys (default: $MAILTLS_PIPELINE or /etc/mailtls/pipeline.toml)")
@click.option("--wait", "wait_s", default=None, type=float, metavar="SECONDS",
              help="distributed: how long to wait for the outcome (default 600); --local: how long to wait "
                   "for another deploy that owns the target's files (default 300)")
@click.option("--no-wait", is_flag=True, help="enqueue, print the deploy id and exit (distributed mode)")
def deploy(target: str, cert_files: tuple[str, ...], key_files: tuple[str, ...], chain_files: tuple[str, ...],
           config_path: str | None, local: bool, force: bool, as_json: bool, deploy_id: str | None,
           broker: str | None, pipeline_path: str | None, wait_s: float, no_wait: bool) -> None:
    """Deploy a certificate, key and chain to TARGET.

    With --local, in-process on this host; otherwise enqueued to the target's worker
    through Redis, waiting for the outcome. Exit: 0 deployed/unchanged, 2 rejected,
    3 rolled back, 4 failed (operator needed), 1 usage/infrastructure error.
    """
    global _exit_now
    _exit_now = True
    try:
        (cert, key, chain), *also = _read_bundles(cert_files, key_files, chain_files)
        if local:
            cfg, early = _config_and_early_validate(config_path, target)
            try:
                result = _deploy_local(cfg, target, cert, key, chain, force, deploy_id,
                                       300.0 if wait_s is None else wait_s, also, early)
            finally:
                if early is not None:
                    early.cancel()
        else:
            from .distributed.workflow import deploy as enqueue

            handle = enqueue(target, cert, key, chain, force=force, broker_url=broker, deploy_id=deploy_id,
                             pipeline=pipeline_path, also=also)
            if no_wait:
                click.echo(json.dumps({"deploy_id": handle.deploy_id, "target": handle.target, "host": handle.host})
                           if as_json else handle.deploy_id)
                return
            result = handle.get(timeout=600.0 if wait_s is None else wait_s)
    except (UnknownTarget, Rejected) as err:
        _fail(str(err), 2, as_json, outcome="rejected", target=target)
    except MailTLSError as err:
        _fail(str(err), err.exit_code, as_json, target=target)
    _emit(result, as_json)


def _read_bundles(certs: tuple[str, ...], keys: tuple[str, ...],
                  chains: tuple[str, ...]) -> list[tuple[bytes, bytes, bytes | None]]:
    """--cert/--key/--chain, paired in order: one bundle per certificate."""
    if len(certs) != len(keys) or (chains and len(chains) != len(certs)) or len(certs) > 2:
        raise click.UsageError("give one --key per --cert (and no --chain, or one per --cert); at most two: an RSA "
                               "and an ECDSA certificate")
    out = []
    for i, (c, k) in enumerate(zip(certs, keys, strict=True)):
        cert, key = _read_input(c, "cert"), _read_input(k, "key")
        assert cert is not None and key is not None
        out.append((cert, key, _read_input(chains[i], "chain") if chains else None))
    return out


def _config_and_early_validate(config_path: str | None, target: str) -> tuple[HostConfig, Running | None]:
    """The targets file, and the target's validate_command already running: started
    by the launcher before click loaded, or here, before the config model loads.
    `postfix check` (0.4 s) then runs while the model and the deploy's code load and
    the deploy stages, instead of after them. The early run is used only if the
    validated target names the same command (``steps``)."""
    from .core.configfile import read_config
    from .launcher import start_validate, take_early

    taken = take_early(config_path, target)
    if taken is not None:
        raw, source, early = taken
    else:
        raw, source = read_config(config_path)
        early = start_validate(raw, target)
    try:
        from .core.config import parse_config

        return parse_config(raw, source), early
    except BaseException:
        if early is not None:
            early.cancel()
        raise


def _deploy_local(cfg: Any, target: str, cert: bytes, key: bytes, chain: bytes | None, force: bool,
                  deploy_id: str | None, wait_s: float,
                  also: list[tuple[bytes, bytes, bytes | None]] | None = None,
                  early: Running | None = None) -> DeployResult:
    """Run in-process; on SIGTERM or Ctrl-C the run compensates, then we report that."""
    from .core.ids import new_deploy_id
    from .core.journal import Journal
    from .core.local import Terminated, run_local

    deploy_id = deploy_id or new_deploy_id()
    try:
        return run_local(cfg, target, cert, key, chain, force=force, deploy_id=deploy_id, lock_timeout=wait_s,
                         also=also, early_validate=early)
    except (KeyboardInterrupt, Terminated):
        rec = Journal(cfg.state_dir).load(cfg.target(target).name, deploy_id)
        if rec is None or not rec.finished:
            _fail(f"deploy {deploy_id} interrupted; `mailtls recover` finishes it", 1)
        from .result import DeployResult

        return DeployResult.from_record(rec)


@cli.command("check-config")
@config_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--worker", "for_worker", is_flag=True,
              help="also check what `mailtls worker` needs to start (keys, trusted signers, state_dir); "
                   "exit 1 saying why it could not")
def check_config(config_path: str | None, as_json: bool, for_worker: bool) -> None:
    """Validate the targets file and print every target with its defaults resolved."""
    try:
        cfg = load_config(config_path)
        if for_worker:
            _check_worker(cfg)
    except MailTLSError as err:
        _fail(str(err), err.exit_code)
    hints = {n: _listener_hints(t) for n, t in cfg.targets.items()}
    data = {"source": cfg.source, "host": cfg.host, "state_dir": cfg.state_dir,
            "targets": {n: {**t.public_view(), "suggested_endpoints": hints[n]} for n, t in cfg.targets.items()}}
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
        if hints[name]:
            click.echo(f"  hint: {t.mode} usually also listens on {', '.join(hints[name])}: a listener the deploy "
                       "does not verify may keep serving the old certificate; list them all in "
                       "post_deploy_verify.endpoints")


def _check_worker(cfg: Any) -> None:
    """What the worker refuses to start without, checked before it starts (systemd's
    ExecStartPre): a unit that fails once with a reason beats a restart loop."""
    import os

    from .core.host import HostRuntime
    from .errors import ConfigError

    HostRuntime(cfg).security()  # the [security] section, every host key loadable and 0600, the signers parse
    d = cfg.state_dir
    while not os.path.exists(d):  # the worker creates it (0700); its nearest existing parent must let it
        d = os.path.dirname(d)
    if not os.path.isdir(d) or not os.access(d, os.W_OK | os.X_OK):
        raise ConfigError(f"state_dir {cfg.state_dir}: {d} is not a directory this user can write")
    if d == cfg.state_dir and os.stat(d).st_mode & 0o077:
        raise ConfigError(f"state_dir {d} is open to group/others (mode {os.stat(d).st_mode & 0o777:04o}); it "
                          "holds backups of private keys: chmod 0700 it")


USUAL_PORTS = {"postfix": [(25, "smtp"), (465, "smtps"), (587, "submission")],
               "dovecot": [(143, "imap"), (993, "imaps"), (110, "pop3"), (995, "pop3s")]}


def _listener_hints(t: Any) -> list[str]:
    """The listeners a mode usually has that the target's verify does not list."""
    listeners = t.verify_endpoints()
    if not listeners:
        return []
    ports = {li.port for li in listeners}
    host = listeners[0].host
    shown = f"[{host}]" if ":" in host else host
    return [f"{shown}:{port} ({what})" for port, what in USUAL_PORTS[t.mode] if port not in ports]


@cli.command()
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
    from .core.journal import Journal
    from .core.local import recover_host

    try:
        cfg = load_config(config_path)
        done = recover_host(cfg, force=force, boot=boot)
        # owned by deploys of targets this file no longer defines: nobody here can finish them
        orphans = sorted({(o.target, o.deploy_id) for o in Journal(cfg.state_dir).owners()
                          if o.target not in cfg.targets})
    except MailTLSError as err:
        _fail(str(err), err.exit_code, as_json)
    if as_json:
        from .result import DeployResult

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


def _coordinator(broker: str | None) -> Any:
    from .distributed.app import broker_url
    from .distributed.coordination import Coordinator

    co = Coordinator(broker_url(broker))
    co.ping()
    return co


@cli.command()
@click.argument("deploy_id")
@broker_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--wait", "wait_s", default=0.0, metavar="SECONDS", help="wait this long for an outcome")
def status(deploy_id: str, broker: str | None, as_json: bool, wait_s: float) -> None:
    """Show a deploy's record (exit code as for deploy once it has ended)."""
    try:
        co = _coordinator(broker)
        rec = co.wait_record(deploy_id, wait_s) if wait_s else co.get_record(deploy_id)
    except MailTLSError as err:
        _fail(str(err), err.exit_code, as_json)
    if rec is None:
        _fail(f"no record of deploy {deploy_id}", 1, as_json)
    if rec.get("outcome"):
        from .result import DeployResult

        _emit(DeployResult.from_public(rec), as_json)
    click.echo(json.dumps(rec) if as_json else f"{rec.get('target')}: {rec.get('phase')} (not finished)")


@cli.command()
@click.argument("target")
@broker_option
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def history(target: str, broker: str | None, limit: int, as_json: bool) -> None:
    """The last deploys of TARGET (HOST/NAME, or a NAME one host defines), newest first."""
    try:
        co = _coordinator(broker)
        host, name = co.resolve(target)
        rows = co.history(f"{host}/{name}", limit)
    except MailTLSError as err:
        _fail(str(err), err.exit_code, as_json)
    if as_json:
        click.echo(json.dumps(rows))
        return
    for r in rows:
        fp = (r.get("fingerprint") or "-")[:16]
        click.echo(f"{r.get('created', '?'):<30} {r['deploy_id']:<28} {r.get('outcome') or r.get('phase'):<12} {fp}"
                   + (f"  {r['error']}" if r.get("error") else ""))


@cli.command()
@click.argument("host")
@broker_option
def forget(host: str, broker: str | None) -> None:
    """Remove a host that is gone for good from the fleet registry (its targets, names,
    labels and audits). Refused while its worker is alive; a worker that starts again
    registers anew."""
    try:
        removed = _coordinator(broker).forget_host(host)
    except MailTLSError as err:
        _fail(str(err), err.exit_code)
    click.echo(f"forgot host {host}: {removed} target(s)")


@cli.command()
@broker_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def targets(broker: str | None, as_json: bool) -> None:
    """The fleet: every registered target, its host, what it serves and whether its worker is alive."""
    try:
        rows = _coordinator(broker).fleet()
    except MailTLSError as err:
        _fail(str(err), err.exit_code, as_json)
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


@cli.command()
@config_option
@broker_option
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--host", envvar="MAILTLS_HOST", metavar="NAME",
              help="this host's routing name (overrides `host` in the targets file: one file for the whole fleet)")
def worker(config_path: str | None, broker: str | None, loglevel: str, host: str | None) -> None:
    """Run this mail host's worker: recovers interrupted deploys, then consumes mailtls.<host>."""
    from .distributed.worker import run_worker

    try:
        run_worker(config_path, broker, loglevel, host=host)
    except MailTLSError as err:
        _fail(str(err), err.exit_code)


def _read_env_file(path: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (systemd's EnvironmentFile format, without quoting rules) from
    a file only its owner can read: the secrets it holds must not be on a command line."""
    import os

    from .errors import ConfigError

    try:
        with open(path, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            text = f.read(65536)
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from None
    if mode & 0o077:
        raise ConfigError(f"{path} holds secrets and is readable by group/others (mode {mode & 0o777:04o}): "
                          "chmod 0600 it")
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"{path}:{n}: expected KEY=VALUE")
        out[key.strip()] = value.strip().strip('"').strip("'")
    return out


@cli.command(context_settings={"ignore_unknown_options": True})
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
    import subprocess

    from .distributed.app import broker_url

    # Flower and Celery take both spellings (--basic-auth, --basic_auth), and -b for --broker
    if any(a.replace("_", "-").startswith(("--basic-auth", "--broker", "-b")) for a in flower_args):
        _fail("give the broker URL and basic auth in MAILTLS_BROKER_URL / MAILTLS_FLOWER_BASIC_AUTH (or --env-file), "
              "not on the command line", 1)
    try:
        given = _read_env_file(env_file) if env_file else {}
    except MailTLSError as err:
        _fail(str(err), err.exit_code)
    url = given.get("MAILTLS_BROKER_URL") or os.environ.get("MAILTLS_BROKER_URL")
    auth = given.get("MAILTLS_FLOWER_BASIC_AUTH") or os.environ.get("MAILTLS_FLOWER_BASIC_AUTH", "")
    try:
        loopback = address == "localhost" or ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = False
    if not auth and not loopback and not no_auth:
        _fail(f"Flower on {address} would show the fleet to anyone who reaches it: set MAILTLS_FLOWER_BASIC_AUTH "
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
    sys.exit(subprocess.call(argv, env=env))


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


@cli.command()
@click.option("--cert", "cert_files", required=True, multiple=True, metavar="FILE",
              help="leaf certificate (or full chain), PEM; twice for dual RSA + ECDSA targets")
@click.option("--key", "key_files", required=True, multiple=True, metavar="FILE", help="one per --cert")
@click.option("--chain", "chain_files", multiple=True, metavar="FILE", help="none, or one per --cert")
@click.option("--targets", "targets_csv", metavar="HOST/NAME,...", help="these targets")
@click.option("--label", metavar="LABEL", help="every target carrying this label")
@click.option("--covers", "covers_csv", metavar="DNSNAME,...",
              help="every target serving one of these names whose names the certificate all covers")
@click.option("--waves", default="1,25%,100%", show_default=True,
              help="cumulative wave sizes, counts or shares; the first is the canary")
@click.option("--continue-on-error", is_flag=True, help="do not halt when a target rolls back or fails")
@click.option("--force", is_flag=True, help="allow a leaf older than the deployed one")
@click.option("--id", "rollout_id", metavar="ID", help="rollout id (default: from the certificate and the selection, "
              "so running the same rollout again resumes it)")
@click.option("--wait", "wait_s", default=600.0, show_default=True, metavar="SECONDS", help="per deploy")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@broker_option
@click.option("--pipeline", "pipeline_path", metavar="FILE", envvar="MAILTLS_PIPELINE", help="pipeline keys")
def rollout(cert_files: tuple[str, ...], key_files: tuple[str, ...], chain_files: tuple[str, ...],
            targets_csv: str | None, label: str | None,
            covers_csv: str | None, waves: str, continue_on_error: bool, force: bool, rollout_id: str | None,
            wait_s: float, as_json: bool, broker: str | None, pipeline_path: str | None) -> None:
    """Roll one certificate out to every daemon that serves it, in waves.

    Exit by the worst outcome: 0 all deployed/unchanged, 2 rejected, 3 rolled back
    (halted), 4 failed (operator needed), 1 usage or infrastructure error."""
    from .distributed.rollout import rollout as run_rollout

    try:
        (cert, key, chain), *also = _read_bundles(cert_files, key_files, chain_files)
        result = run_rollout(cert, key, chain, targets=_csv(targets_csv), label=label, covers=_csv(covers_csv),
                             waves=waves, continue_on_error=continue_on_error, force=force, broker_url=broker,
                             pipeline=pipeline_path, rollout_id=rollout_id, timeout=wait_s, also=also)
    except MailTLSError as err:
        _fail(str(err), err.exit_code, as_json)
    click.echo(json.dumps(result.model_dump(mode="json")) if as_json else result.human())
    sys.exit(result.exit_code)


@cli.command("rollout-status")
@click.argument("rollout_id")
@broker_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def rollout_status(rollout_id: str, broker: str | None, as_json: bool) -> None:
    """Show a rollout's record: each target's wave, outcome and timing (exit by the worst)."""
    from .distributed.rollout import RolloutResult

    try:
        data = _coordinator(broker).get_rollout(rollout_id)
    except MailTLSError as err:
        _fail(str(err), err.exit_code, as_json)
    if data is None:
        _fail(f"no record of rollout {rollout_id}", 1, as_json)
    result = RolloutResult.model_validate(data)
    click.echo(json.dumps(data) if as_json else result.human())
    sys.exit(result.exit_code)


@cli.command()
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
    from .core.audit import SEVERITY, TargetAudit

    stale: set[str] = set()
    try:
        if local:
            from .core.host import HostRuntime

            audits = HostRuntime(load_config(config_path)).audit()
        else:
            co = _coordinator(broker)
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
        _fail(str(err), 3, as_json)
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

    from .distributed.app import queue_for, use_broker

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


@cli.group()
def dane() -> None:
    """DANE: the TLSA records a key change needs."""


@dane.command("next")
@click.argument("target")
@click.option("--key", "key_file", required=True, metavar="FILE", help="the next private key (or its certificate)")
@config_option
def dane_next(target: str, key_file: str, config_path: str | None) -> None:
    """Print the TLSA records to publish (beside the current ones, 2 x TTL ahead) before
    deploying a certificate for this key to TARGET."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from .core.dane import record_for
    from .core.material import spki_sha256

    try:
        t = load_config(config_path).target(target)
        data = _read_input(key_file, "key") or b""
    except MailTLSError as err:
        _fail(str(err), err.exit_code)
    if t.dane is None:
        _fail(f"target {t.name!r} has no dane settings (dane = {{ tlsa = [\"_25._tcp.mx.example.com\"] }})", 1)
    try:
        public: Any = (x509.load_pem_x509_certificate(data).public_key() if b"CERTIFICATE" in data
                       else serialization.load_pem_private_key(data, password=None).public_key())
    except (ValueError, TypeError) as err:
        _fail(f"key: {key_file} is neither an unencrypted private key nor a certificate ({err})", 2)
    for name in t.dane.tlsa:
        click.echo(record_for(name, spki_sha256(public)))


@cli.command("certbot-hook")
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

    from .core.material import leaf_of_file
    from .core.names import name_covered, uncovered

    lineage = os.environ.get("RENEWED_LINEAGE")
    if not lineage:
        _fail("RENEWED_LINEAGE is not set: run me as certbot's --deploy-hook", 1)
    domains = (os.environ.get("RENEWED_DOMAINS") or "").split()
    try:
        cert = _read_input(os.path.join(lineage, "fullchain.pem"), "cert")
        key = _read_input(os.path.join(lineage, "privkey.pem"), "key")
    except MailTLSError as err:
        _fail(str(err), 2)
    assert cert is not None and key is not None
    leaf = leaf_of_file(cert)
    if leaf is None:
        _fail(f"{lineage}/fullchain.pem holds no certificate", 2)
    if distributed:
        from .distributed.rollout import rollout as run_rollout

        try:
            result = run_rollout(cert, key, None, covers=domains or None, waves=waves, broker_url=broker,
                                 pipeline=pipeline_path)
        except MailTLSError as err:
            _fail(str(err), err.exit_code)
        for addr, run in sorted(result.targets.items()):
            click.echo(f"mailtls: {addr}: {run.outcome}" + (f" ({run.reason})" if run.reason else "")
                       + f" deploy {run.deploy_id or '-'}" + (f": {run.error}" if run.error else ""))
        sys.exit(result.exit_code)
    try:
        cfg = load_config(config_path)
    except MailTLSError as err:
        _fail(str(err), err.exit_code)
    wanted = [d.lower().rstrip(".") for d in domains]  # a wildcard lineage covers one label under it
    chosen = [t for t in cfg.targets.values() if t.names and not uncovered(t.names, leaf)
              and (not wanted or any(name_covered(n, wanted) for n in t.names)) and t.alt is None]
    if not chosen:
        _fail(f"no target on host {cfg.host} serves names this certificate covers ({', '.join(domains) or '?'}); "
              "set `names` on the targets it is for", 1)
    worst = 0
    for t in chosen:
        try:
            res = _deploy_local(cfg, t.name, cert, key, None, False, None, 300.0)
        except MailTLSError as err:
            click.echo(f"mailtls: {cfg.host}/{t.name}: error: {err}")
            worst = max(worst, err.exit_code)
            continue
        click.echo(f"mailtls: {res.target}: {res.outcome}" + (f" ({res.reason})" if res.reason else "")
                   + f" deploy {res.deploy_id}" + (f": {res.error}" if res.error else ""))
        worst = max(worst, res.exit_code)
    sys.exit(worst)


@cli.group()
def keys() -> None:
    """Create and show the host and pipeline keys of distributed mode."""


def _create_key(create: Any, out: str, where: str) -> None:
    import os

    out = os.path.abspath(out)  # the targets file takes absolute paths only: print what it will accept
    try:
        pub = create(out)
    except MailTLSError as err:
        _fail(str(err), err.exit_code)
    click.echo(f"created {out} (0600)\npublic: {pub}\n\n" + where.format(out=out, pub=pub))


@keys.command("init-host")
@click.option("--out", default="/etc/mailtls/host.key", show_default=True, metavar="FILE")
def keys_init_host(out: str) -> None:
    """Create this mail host's X25519 key (0600); prints the public half for the pipeline."""
    from .security.keys import create_host_key

    _create_key(create_host_key, out, 'On this host, in the targets file:\n  [security]\n  host_keys = ["{out}"]\n\n'
                'In the pipeline\'s pipeline.toml, under [hosts]:\n  <host> = "{pub}"')


@keys.command("init-pipeline")
@click.option("--out", default="/etc/mailtls/pipeline.key", show_default=True, metavar="FILE")
def keys_init_pipeline(out: str) -> None:
    """Create the pipeline's Ed25519 signing key (0600); prints the public half for workers."""
    from .security.keys import create_signing_key

    _create_key(create_signing_key, out, 'In the pipeline\'s pipeline.toml:\n  signing_key = "{out}"\n\n'
                'On every worker host, in the targets file\'s [security]:\n  trusted_signers = ["{pub}"]')


@keys.command("public")
@click.argument("key_file")
def keys_public(key_file: str) -> None:
    """Print the public half of a host or pipeline key file."""
    from .security.keys import public_of

    try:
        click.echo(public_of(key_file))
    except MailTLSError as err:
        _fail(str(err), err.exit_code)


@keys.command("trusted")
@config_option
def keys_trusted(config_path: str | None) -> None:
    """What this worker trusts: its host keys and the pipeline keys it accepts."""
    from .security.keys import key_id, public_of

    try:
        cfg = load_config(config_path)
    except MailTLSError as err:
        _fail(str(err), err.exit_code)
    if cfg.security is None:
        _fail(f"{cfg.source}: no [security] section: this host accepts no distributed deploys", 1)
    for path in cfg.security.host_keys:
        try:
            pub = public_of(path)
            click.echo(f"host key         {pub}  id {key_id(pub)}  ({path})")
        except MailTLSError as err:
            click.echo(f"host key         UNUSABLE: {err}")
    for signer in cfg.security.trusted_signers:
        click.echo(f"trusted signer   {signer}  id {key_id(signer)}")
    click.echo(f"max envelope age {cfg.security.max_envelope_age:g}s")


def main() -> None:
    global _exit_now
    _exit_now = False
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
        if _exit_now:
            _hard_exit(done.code)
        raise
    if _exit_now:
        _hard_exit(0)


# Set by commands that leave nothing behind but their output (a deploy: its result is
# printed, its record written, its message sent). Their process then skips the
# interpreter's teardown -- 0.03 s with the local runner loaded, 0.07 s with Celery and
# redis-py: garbage-collecting modules and running library atexit hooks for
# connections the exit closes anyway.
_exit_now = False


def _hard_exit(code: object) -> NoReturn:
    import os

    from .launcher import cancel_early

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


if __name__ == "__main__":
    main()

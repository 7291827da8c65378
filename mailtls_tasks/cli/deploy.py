"""``mailtls deploy`` (in-process with --local, else through Redis to the target's
worker), ``rollout`` (one certificate to many targets, in waves) and
``rollout-status``."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn

import click

from ..errors import MailTLSError, Rejected, UnknownTarget
from .common import (
    broker_option,
    config_option,
    coordinator,
    emit,
    env_file_option,
    exit_fast,
    fail,
    load_config,
    read_input,
    split_csv,
)

if TYPE_CHECKING:
    from ..commands import Running
    from ..core.config import HostConfig
    from ..core.result import DeployResult


@click.command()
@click.argument("target", required=False)
@click.option("--cert", "cert_files", multiple=True, metavar="FILE",
              help="leaf certificate (or full chain), PEM; twice for a dual RSA + ECDSA target")
@click.option("--key", "key_files", multiple=True, metavar="FILE",
              help="private key, PEM, unencrypted; one per --cert, in the same order")
@click.option("--batch", "batch_path", metavar="DIR|FILE",
              help="many certificates at once, one batch per host (one validate, one reload per daemon): a "
                   "directory with a subdirectory per target in certbot's live/ layout, or a TOML manifest of "
                   "[[deploy]] target, cert, key, chain")
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
@click.option("--check", "check_only", is_flag=True,
              help="run every check a deploy would and say what it would change; change nothing (exit 0 "
                   "would_deploy or unchanged, 2 rejected)")
@env_file_option
def deploy(target: str | None, cert_files: tuple[str, ...], key_files: tuple[str, ...],
           batch_path: str | None, chain_files: tuple[str, ...],
           config_path: str | None, local: bool, force: bool, as_json: bool, deploy_id: str | None,
           broker: str | None, pipeline_path: str | None, wait_s: float, no_wait: bool, check_only: bool) -> None:
    """Deploy a certificate, key and chain to TARGET (or --batch: many, as one deploy).

    With --local, in-process on this host; otherwise enqueued to the target's worker
    through Redis, waiting for the outcome. Exit: 0 deployed/unchanged, 2 rejected,
    3 rolled back, 4 failed (operator needed), 1 usage/infrastructure error; a batch
    exits by its worst member.
    """
    exit_fast()
    if check_only:
        run_checks(target, cert_files, key_files, chain_files, batch_path, config_path, local, force, broker,
                   pipeline_path, 120.0 if wait_s is None else wait_s, as_json)
    if batch_path is not None:
        if target is not None or cert_files or key_files or chain_files:
            raise click.UsageError("--batch names its targets and files itself: give no TARGET, --cert, --key or "
                                   "--chain with it")
        if local:
            deploy_batch(config_path, batch_path, force, deploy_id, 300.0 if wait_s is None else wait_s, as_json)
        if deploy_id is not None:
            raise click.UsageError("--deploy-id names one deploy; a batch through the workers gives each "
                                   "certificate its own")
        enqueue_batch(batch_path, force, broker, pipeline_path, 600.0 if wait_s is None else wait_s, no_wait,
                      as_json)
    if target is None or not cert_files or not key_files:
        raise click.UsageError("give TARGET, --cert and --key (or --batch)")
    try:
        (cert, key, chain), *also = _read_bundles(cert_files, key_files, chain_files)
        if local:
            cfg, early = _config_and_early_validate(config_path, target)
            try:
                result = deploy_local(cfg, target, cert, key, chain, force, deploy_id,
                                       300.0 if wait_s is None else wait_s, also, early)
            finally:
                if early is not None:
                    early.cancel()
        else:
            from ..distributed.workflow import deploy as enqueue

            handle = enqueue(target, cert, key, chain, force=force, broker_url=broker, deploy_id=deploy_id,
                             pipeline=pipeline_path, also=also)
            if no_wait:
                click.echo(json.dumps({"deploy_id": handle.deploy_id, "target": handle.target, "host": handle.host})
                           if as_json else handle.deploy_id)
                return
            result = handle.get(timeout=600.0 if wait_s is None else wait_s)
    except (UnknownTarget, Rejected) as err:
        fail(str(err), 2, as_json, outcome="rejected", target=target)
    except MailTLSError as err:
        fail(str(err), err.exit_code, as_json, target=target)
    emit(result, as_json)


def read_batch(path: str) -> list[Any]:
    """The members of ``--batch``: a directory with one subdirectory per target, named
    after it, in certbot's live/ layout (``privkey.pem``; ``fullchain.pem``, or
    ``cert.pem`` with ``chain.pem`` if there is one), or a TOML manifest of
    ``[[deploy]]`` tables (``target``, ``cert``, ``key``, optional ``chain``; relative
    paths from the manifest's directory). Rejected naming the entry that is wrong."""
    import os
    import tomllib

    from ..core.batch import Member

    def files_of(where: str, cert: str, key: str, chain: str | None) -> tuple[bytes, bytes, bytes | None]:
        data = read_input(cert, f"{where}: cert"), read_input(key, f"{where}: key")
        assert data[0] is not None and data[1] is not None
        return data[0], data[1], read_input(chain, f"{where}: chain")

    out = []
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            d = os.path.join(path, name)
            if not os.path.isdir(d) or name.startswith("."):
                continue
            full, cert, chain = (os.path.join(d, f) for f in ("fullchain.pem", "cert.pem", "chain.pem"))
            if os.path.exists(full):
                out.append(Member(name, *files_of(name, full, os.path.join(d, "privkey.pem"), None)))
            else:
                out.append(Member(name, *files_of(name, cert, os.path.join(d, "privkey.pem"),
                                                  chain if os.path.exists(chain) else None)))
        if not out:
            raise Rejected(f"--batch {path}: no subdirectory (one per target, named after it)")
        return out
    try:
        with open(path, "rb") as f:
            manifest = tomllib.load(f)
    except OSError as err:
        raise Rejected(f"--batch {path}: cannot read it: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise Rejected(f"--batch {path}: not TOML: {err}") from None
    entries = manifest.get("deploy")
    if not isinstance(entries, list) or not entries or set(manifest) != {"deploy"}:
        raise Rejected(f"--batch {path}: expected [[deploy]] tables (target, cert, key, chain) and nothing else")
    base = os.path.dirname(os.path.abspath(path))
    for i, e in enumerate(entries, 1):
        where = f"--batch {path}: [[deploy]] {i}"
        if not isinstance(e, dict) or not {"target", "cert", "key"} <= set(e) or set(e) - {"target", "cert", "key",
                                                                                            "chain"}:
            raise Rejected(f"{where}: needs target, cert and key (and chain, optional), nothing else")
        if not all(isinstance(v, str) for v in e.values()):
            raise Rejected(f"{where}: target, cert, key and chain are strings")
        paths = {k: os.path.join(base, v) for k, v in e.items() if k != "target"}
        out.append(Member(e["target"], *files_of(e["target"], paths["cert"], paths["key"], paths.get("chain"))))
    return out


def run_checks(target: str | None, cert_files: tuple[str, ...], key_files: tuple[str, ...],
               chain_files: tuple[str, ...], batch_path: str | None, config_path: str | None, local: bool,
               force: bool, broker: str | None, pipeline_path: str | None, wait_s: float,
               as_json: bool) -> NoReturn:
    """``--check``: a report per target (``core.check``): in-process with --local, else
    on the target's worker; a batch's members are checked one by one. Nothing changes."""
    from .early import cancel_early

    cancel_early()  # a deploy's early config test (started before click loaded): check mode runs its own
    Wanted = tuple[str, bytes, bytes, "bytes | None", "list[tuple[bytes, bytes, bytes | None]] | None"]
    wanted: list[Wanted]
    try:
        if batch_path is not None:
            if target is not None or cert_files or key_files or chain_files:
                raise click.UsageError("--batch names its targets and files itself")
            wanted = [(m.target, m.cert, m.key, m.chain, None) for m in read_batch(batch_path)]
        elif target is None or not cert_files or not key_files:
            raise click.UsageError("give TARGET, --cert and --key (or --batch)")
        else:
            (cert, key, chain), *also = _read_bundles(cert_files, key_files, chain_files)
            wanted = [(target, cert, key, chain, also)]
        reports = []
        for name, cert, key, chain, more in wanted:
            if local:
                from ..core.check import check

                reports.append(check(load_config(config_path), name, cert, key, chain, force=force, also=more))
            else:
                from ..distributed.workflow import check as check_remote

                reports.append(check_remote(name, cert, key, chain, force=force, broker_url=broker,
                                            pipeline=pipeline_path, also=more, timeout=wait_s))
    except (UnknownTarget, Rejected) as err:
        fail(str(err), 2, as_json, outcome="rejected")
    except MailTLSError as err:
        fail(str(err), err.exit_code, as_json)
    if as_json:
        data = [r.model_dump(mode="json") for r in reports]
        click.echo(json.dumps(data[0] if batch_path is None else data))
    else:
        click.echo("\n".join(r.human() for r in reports))
    sys.exit(max(r.exit_code for r in reports))


def deploy_batch(config_path: str | None, batch_path: str, force: bool, deploy_id: str | None, wait_s: float,
                 as_json: bool) -> NoReturn:
    """Run a batch in-process; a line (or a JSON object) per member; exit by the worst."""
    from ..core.batch import run_batch

    try:
        members = read_batch(batch_path)
        results = run_batch(load_config(config_path), members, deploy_id=deploy_id, force=force,
                            lock_timeout=wait_s)
    except Rejected as err:
        fail(str(err), 2, as_json, outcome="rejected")
    except MailTLSError as err:
        fail(str(err), err.exit_code, as_json)
    if as_json:
        click.echo(json.dumps([r.as_json() for r in results]))
    else:
        click.echo("\n".join(r.human() for r in results))
    sys.exit(max(r.exit_code for r in results))


def enqueue_batch(batch_path: str, force: bool, broker: str | None, pipeline_path: str | None, wait_s: float,
                  no_wait: bool, as_json: bool) -> NoReturn:
    """--batch through the workers (``deploy_many``): one batch per host; a line (or a
    JSON object) per certificate, each with its own deploy id; exit by the worst."""
    from ..distributed.workflow import Certificate, deploy_many

    try:
        members = read_batch(batch_path)
        handles = deploy_many([Certificate(m.target, m.cert, m.key, m.chain) for m in members], force=force,
                              broker_url=broker, pipeline=pipeline_path)
    except (UnknownTarget, Rejected) as err:
        fail(str(err), 2, as_json, outcome="rejected")
    except MailTLSError as err:
        fail(str(err), err.exit_code, as_json)
    if no_wait:
        rows = [{"deploy_id": h.deploy_id, "target": h.target, "host": h.host} for h in handles]
        click.echo(json.dumps(rows) if as_json else "\n".join(f"{h.deploy_id}  {h.target}" for h in handles))
        sys.exit(0)
    results: list[DeployResult] = []
    timeouts: list[str] = []
    deadline = time.monotonic() + wait_s
    for h in handles:  # the batches run at once on their hosts: one deadline for all
        try:
            results.append(h.get(timeout=max(0.0, deadline - time.monotonic())))
        except MailTLSError as err:  # DeployTimeout, or Redis lost while waiting
            timeouts.append(f"{h.target}: {err}")
    if as_json:
        click.echo(json.dumps([r.as_json() for r in results] + [{"error": t} for t in timeouts]))
    else:
        click.echo("\n".join([r.human() for r in results] + [f"TIMEOUT {t}" for t in timeouts]))
    sys.exit(max([r.exit_code for r in results] + [1 for _ in timeouts]))


def _read_bundles(certs: tuple[str, ...], keys: tuple[str, ...],
                  chains: tuple[str, ...]) -> list[tuple[bytes, bytes, bytes | None]]:
    """--cert/--key/--chain, paired in order: one bundle per certificate."""
    if len(certs) != len(keys) or (chains and len(chains) != len(certs)) or len(certs) > 2:
        raise click.UsageError("give one --key per --cert (and no --chain, or one per --cert); at most two: an RSA "
                               "and an ECDSA certificate")
    out = []
    for i, (c, k) in enumerate(zip(certs, keys, strict=True)):
        cert, key = read_input(c, "cert"), read_input(k, "key")
        assert cert is not None and key is not None
        out.append((cert, key, read_input(chains[i], "chain") if chains else None))
    return out


def _config_and_early_validate(config_path: str | None, target: str) -> tuple[HostConfig, Running | None]:
    """The targets file, and the target's validate_command already running: started
    by the entry point (``early.start_early``) before click loaded, or here, before the config model loads.
    `postfix check` (0.4 s) then runs while the model and the deploy's code load and
    the deploy stages, instead of after them. The early run is used only if the
    validated target names the same command (``steps``)."""
    from ..core.configfile import read_config
    from .early import start_validate, take_early

    taken = take_early(config_path, target)
    if taken is not None:
        raw, source, early = taken
    else:
        raw, source = read_config(config_path)
        early = start_validate(raw, target)
    try:
        from ..core.config import parse_config

        return parse_config(raw, source), early
    except BaseException:
        if early is not None:
            early.cancel()
        raise


def deploy_local(cfg: Any, target: str, cert: bytes, key: bytes, chain: bytes | None, force: bool,
                  deploy_id: str | None, wait_s: float,
                  also: list[tuple[bytes, bytes, bytes | None]] | None = None,
                  early: Running | None = None) -> DeployResult:
    """Run in-process; on SIGTERM or Ctrl-C the run compensates, then we report that."""
    from ..core.journal import Journal
    from ..core.local import Terminated, run_local
    from ..ids import new_deploy_id

    deploy_id = deploy_id or new_deploy_id()
    try:
        return run_local(cfg, target, cert, key, chain, force=force, deploy_id=deploy_id, lock_timeout=wait_s,
                         also=also, early_validate=early)
    except (KeyboardInterrupt, Terminated):
        rec = Journal(cfg.state_dir).load(cfg.target(target).name, deploy_id)
        if rec is None or not rec.finished:
            fail(f"deploy {deploy_id} interrupted; `mailtls recover` finishes it", 1)
        from ..core.result import DeployResult

        return DeployResult.from_record(rec)


@click.command()
@click.option("--cert", "cert_files", multiple=True, metavar="FILE",
              help="leaf certificate (or full chain), PEM; twice for dual RSA + ECDSA targets")
@click.option("--key", "key_files", multiple=True, metavar="FILE", help="one per --cert")
@click.option("--batch", "batch_path", metavar="DIR|FILE",
              help="several certificates (as deploy --batch), each to the target it names: HOST/NAME, or a "
                   "bare NAME for that target on every host; one batch per host per wave")
@click.option("--chain", "chain_files", multiple=True, metavar="FILE", help="none, or one per --cert")
@click.option("--targets", "targets_csv", metavar="HOST/NAME,...", help="these targets")
@click.option("--label", metavar="LABEL", help="every target carrying this label")
@click.option("--covers", "covers_csv", metavar="DNSNAME,...",
              help="every target serving one of these names whose names the certificate all covers")
@click.option("--waves", default="1,25%,100%", show_default=True,
              help="cumulative wave sizes, counts or shares; the first is the canary")
@click.option("--continue-on-error", is_flag=True, help="do not halt when a target rolls back or fails")
@click.option("--skip-unreachable", is_flag=True,
              help="roll out to the rest when a selected target's host has no live worker (listed as skipped); "
                   "without it such a target halts the rollout before anything is sent")
@click.option("--force", is_flag=True, help="allow a leaf older than the deployed one")
@click.option("--id", "rollout_id", metavar="ID", help="rollout id (default: from the certificate and the selection, "
              "so running the same rollout again resumes it)")
@click.option("--wait", "wait_s", default=600.0, show_default=True, metavar="SECONDS", help="per deploy")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@broker_option
@click.option("--pipeline", "pipeline_path", metavar="FILE", envvar="MAILTLS_PIPELINE", help="pipeline keys")
@click.option("--check", "check_only", is_flag=True,
              help="check the certificate on every target the rollout would select (each by its worker) and say "
                   "what would change there; send no deploy")
@env_file_option
def rollout(cert_files: tuple[str, ...], key_files: tuple[str, ...], batch_path: str | None,
            chain_files: tuple[str, ...], targets_csv: str | None, label: str | None,
            covers_csv: str | None, waves: str, continue_on_error: bool, skip_unreachable: bool, force: bool,
            rollout_id: str | None, wait_s: float, as_json: bool, broker: str | None, pipeline_path: str | None,
            check_only: bool) -> None:
    """Roll one certificate (or --batch: several) out to every daemon that serves it, in waves.

    Exit by the worst outcome: 0 all deployed/unchanged, 2 rejected, 3 rolled back
    (halted), 4 failed (operator needed), 1 usage or infrastructure error."""
    from ..distributed.rollout import rollout as run_rollout
    from ..distributed.rollout import rollout_many

    if batch_path is not None and (cert_files or key_files or chain_files or targets_csv or label or covers_csv):
        raise click.UsageError("--batch names its targets and files itself: give no --cert, --key, --chain, "
                               "--targets, --label or --covers with it")
    if batch_path is None and not (cert_files and key_files):
        raise click.UsageError("give --cert and --key (or --batch)")
    if check_only:
        if batch_path is not None:
            raise click.UsageError("--check checks one certificate across its targets; check a --batch with "
                                   "`mailtls deploy --batch FILE --check`")
        from ..distributed.rollout import rollout_check

        try:
            (cert, key, chain), *also = _read_bundles(cert_files, key_files, chain_files)
            reports = rollout_check(cert, key, chain, targets=split_csv(targets_csv), label=label,
                                    covers=split_csv(covers_csv), force=force, broker_url=broker,
                                    pipeline=pipeline_path, timeout=min(wait_s, 120.0), also=also,
                                    skip_unreachable=skip_unreachable)
        except MailTLSError as err:
            fail(str(err), err.exit_code, as_json)
        click.echo(json.dumps([r.model_dump(mode="json") for r in reports]) if as_json
                   else "\n".join(r.human() for r in reports))
        sys.exit(max(r.exit_code for r in reports))
    try:
        if batch_path is not None:
            from ..distributed.workflow import Certificate

            result = rollout_many([Certificate(m.target, m.cert, m.key, m.chain) for m in read_batch(batch_path)],
                                  waves=waves, continue_on_error=continue_on_error, force=force, broker_url=broker,
                                  pipeline=pipeline_path, rollout_id=rollout_id, timeout=wait_s,
                                  skip_unreachable=skip_unreachable)
        else:
            (cert, key, chain), *also = _read_bundles(cert_files, key_files, chain_files)
            result = run_rollout(cert, key, chain, targets=split_csv(targets_csv), label=label,
                                 covers=split_csv(covers_csv), waves=waves, continue_on_error=continue_on_error,
                                 force=force, broker_url=broker, pipeline=pipeline_path, rollout_id=rollout_id,
                                 timeout=wait_s, also=also, skip_unreachable=skip_unreachable)
    except MailTLSError as err:
        fail(str(err), err.exit_code, as_json)
    click.echo(json.dumps(result.model_dump(mode="json")) if as_json else result.human())
    sys.exit(result.exit_code)


@click.command("rollout-status")
@click.argument("rollout_id")
@broker_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def rollout_status(rollout_id: str, broker: str | None, as_json: bool) -> None:
    """Show a rollout's record: each target's wave, outcome and timing (exit by the worst)."""
    from ..distributed.rollout import RolloutResult

    try:
        data = coordinator(broker).get_rollout(rollout_id)
    except MailTLSError as err:
        fail(str(err), err.exit_code, as_json)
    if data is None:
        fail(f"no record of rollout {rollout_id}", 1, as_json)
    result = RolloutResult.model_validate(data)
    click.echo(json.dumps(data) if as_json else result.human())
    sys.exit(result.exit_code)

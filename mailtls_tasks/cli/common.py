"""What the command modules share: reading the targets file and the PEM inputs,
printing a result or an error with the right exit code, the --broker and --config
options, the Redis coordinator, and the fast exit a deploy asks for."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import click

from ..errors import MailTLSError, Rejected
from ..ids import MAX_INPUT_BYTES

if TYPE_CHECKING:
    from ..core.config import HostConfig
    from ..core.result import DeployResult


def load_config(path: str | None) -> HostConfig:
    """The targets file, imported only by the commands that read it (the config model
    costs a tenth of a second to import: a distributed deploy never needs it)."""
    from ..core.config import load_config as load

    return load(path)


def fail(message: str, code: int, as_json: bool = False, **extra: Any) -> NoReturn:
    if as_json:
        click.echo(json.dumps({"outcome": extra.pop("outcome", None), "error": message, **extra}))
    else:
        click.echo(f"mailtls: {message}", err=True)
    sys.exit(code)


def read_input(path: str | None, what: str) -> bytes | None:
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


def emit(result: DeployResult, as_json: bool) -> NoReturn:
    if as_json:
        click.echo(json.dumps(result.as_json(), indent=None))
    else:
        click.echo(result.human())
    sys.exit(result.exit_code)


broker_option = click.option("--broker", metavar="URL", envvar="MAILTLS_BROKER_URL",
                             help="Redis URL (default: $MAILTLS_BROKER_URL or redis://127.0.0.1:6379/0)")
config_option = click.option("--config", "config_path", metavar="FILE",
                             help="targets file (default: $MAILTLS_CONFIG or /etc/mailtls/targets.toml)")


def coordinator(broker: str | None) -> Any:
    from ..distributed.app import broker_url
    from ..distributed.coordination import Coordinator

    co = Coordinator(broker_url(broker))
    co.ping()
    return co


def split_csv(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


# Set by commands that leave nothing behind but their output (a deploy: its result is
# printed, its record written, its message sent). Their process then skips the
# interpreter's teardown -- 0.03 s with the local runner loaded, 0.07 s with Celery and
# redis-py: garbage-collecting modules and running library atexit hooks for
# connections the exit closes anyway (``root.main``).
_exit_now = False


def exit_fast(on: bool = True) -> None:
    global _exit_now
    _exit_now = on


def exiting_fast() -> bool:
    return _exit_now


def read_env_file(path: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (systemd's EnvironmentFile format, without quoting rules) from
    a file only its owner can read: the secrets it holds must not be on a command line."""
    import os

    from ..errors import ConfigError

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


def load_env_file(path: str | None) -> None:
    """Put an env file's MAILTLS_* settings (the broker URL, the pipeline keys) into
    this process's environment, as systemd's EnvironmentFile= would for a unit: a
    hook certbot starts has none of the pipeline's environment."""
    import os

    if path is None:
        return
    for key, value in read_env_file(path).items():
        if not key.startswith("MAILTLS_"):
            from ..errors import ConfigError

            raise ConfigError(f"{path}: {key} is not a MAILTLS_* setting")
        os.environ[key] = value


def _env_file_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    try:
        load_env_file(value)
    except MailTLSError as err:
        fail(str(err), err.exit_code)
    return value


# eager: loaded before the other options read their MAILTLS_* defaults from the environment
env_file_option = click.option("--env-file", metavar="FILE", is_eager=True, expose_value=False,
                               callback=_env_file_callback,
                               help="0600 KEY=VALUE file of MAILTLS_* settings (e.g. /etc/mailtls/pipeline.env: "
                                    "MAILTLS_BROKER_URL, MAILTLS_PIPELINE), loaded first")

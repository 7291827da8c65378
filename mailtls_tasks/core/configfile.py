"""Reading the targets file, before (and without) validating it.

Kept apart from the config model so that what must happen early costs nothing to
import: `mailtls deploy --local` starts the target's ``validate_command`` straight
from the file it has just read, while the model (pydantic, about a tenth of a second
to import) and the rest of the deploy load beside it. The file is read once; the
model validates those very bytes, and the early start is used only when the
validated target names the same command (``steps.validate``).
"""

from __future__ import annotations

import os
from typing import Any

from ..commands import check_command
from ..errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/mailtls/targets.toml"
CONFIG_ENV = "MAILTLS_CONFIG"
HOST_ENV = "MAILTLS_HOST"


def config_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def read_config(path: str | None = None) -> tuple[Any, str]:
    """The parsed, not yet validated, targets file and its path. Refuses a file that
    someone other than root could change: it names the commands run as root."""
    from .pathsafety import unsafe_component

    p = config_path(path)
    try:
        with open(p, "rb") as f:
            data = f.read()
            st = os.fstat(f.fileno())
    except OSError as err:
        raise ConfigError(f"cannot read config {p}: {err.strerror or err}") from None
    why = unsafe_component(p)
    if why is None and st.st_mode & 0o022:
        why = f"the file is writable by group or others (mode {st.st_mode & 0o777:04o})"
    if why:
        raise ConfigError(f"{p}: refusing a targets file others could change (it names the commands run as "
                          f"root): {why}")
    is_json = p.endswith(".json")
    try:
        if is_json:
            import json

            raw = json.loads(data)
        else:
            import tomllib

            raw = tomllib.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{p}: not valid {'JSON' if is_json else 'TOML'}: {err}") from None
    if os.environ.get(HOST_ENV) and isinstance(raw, dict):
        # One targets file for the whole fleet: each host names itself (`mailtls worker --host`).
        raw = {**raw, "host": os.environ[HOST_ENV]}
    return raw, p


def validate_command_of(raw: Any, target: str) -> str | None:
    """The ``validate_command`` the model will give ``target`` (NAME or HOST/NAME), read
    from the unvalidated file; None when unsure. Only a guess to start early: the deploy
    uses the early run only if the validated target names the same command."""
    from .. import daemons  # here, not at the top: nothing but the file's read may delay the early start

    try:
        body = raw["targets"][target.rpartition("/")[2]]
        mode = body.get("mode") or daemons.DEFAULT_MODE
        command = body.get("validate_command", daemons.get(mode).defaults["validate_command"])
        if not isinstance(command, str) or not command.strip():
            return None
        return check_command(command, "validate_command")
    except (KeyError, TypeError, AttributeError, ValueError):  # ValueError: an unknown mode too
        return None

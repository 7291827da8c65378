"""Names, ids and limits, with nothing heavy behind them: the CLI and a pipeline's
enqueue check their input with these without loading pydantic or X.509 parsing."""

from __future__ import annotations

import datetime as dt
import re
import secrets

from .errors import ConfigError

MAX_INPUT_BYTES = 1024 * 1024  # any one PEM input (cert, key, chain)
TARGET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HOST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEPLOY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_deploy_id(deploy_id: str) -> str:
    if not DEPLOY_ID_RE.match(deploy_id):
        raise ConfigError(f"deploy_id {deploy_id!r} is not valid (letters, digits, '_', '-'; max 64)")
    return deploy_id


def new_deploy_id() -> str:
    """Sortable, unique, and safe as a file name."""
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(5)}"

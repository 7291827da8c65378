"""``mailtls dane``: the TLSA records a key change needs, before it is deployed."""

from __future__ import annotations

from typing import Any

import click

from ..errors import MailTLSError
from .common import config_option, fail, load_config, read_input


@click.group()
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

    from ..core.dane import record_for
    from ..core.material import spki_sha256

    try:
        t = load_config(config_path).target(target)
        data = read_input(key_file, "key") or b""
    except MailTLSError as err:
        fail(str(err), err.exit_code)
    if t.dane is None:
        fail(f"target {t.name!r} has no dane settings (dane = {{ tlsa = [\"_25._tcp.mx.example.com\"] }})", 1)
    try:
        public: Any = (x509.load_pem_x509_certificate(data).public_key() if b"CERTIFICATE" in data
                       else serialization.load_pem_private_key(data, password=None).public_key())
    except (ValueError, TypeError) as err:
        fail(f"key: {key_file} is neither an unencrypted private key nor a certificate ({err})", 2)
    for name in t.dane.tlsa:
        click.echo(record_for(name, spki_sha256(public)))

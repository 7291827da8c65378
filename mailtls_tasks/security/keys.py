"""Host and pipeline key pairs: create, store (0600), load, and print public halves.

Two kinds of keys keep Redis out of the trust path:

* each **host** has an X25519 key pair: the pipeline encrypts every bundle to the
  target host's public key, so a Redis reader learns nothing;
* the **pipeline** has an Ed25519 signing key: workers accept only envelopes signed
  by keys listed in their own config, so a Redis writer cannot get a certificate of
  their choosing deployed.

Public keys are written ``x25519:<base64>`` / ``ed25519:<base64>`` (raw 32 bytes):
short enough to paste into a config file, typed so one cannot be used as the other.
The pipeline pins host public keys in its own file; it never takes them from Redis.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import tomllib
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ..errors import ConfigError

PIPELINE_ENV = "MAILTLS_PIPELINE"
DEFAULT_PIPELINE_PATH = "/etc/mailtls/pipeline.toml"

_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def encode_public(key: X25519PublicKey | Ed25519PublicKey) -> str:
    kind = "x25519" if isinstance(key, X25519PublicKey) else "ed25519"
    return f"{kind}:{base64.b64encode(key.public_bytes(*_RAW)).decode()}"


def key_id(public: str) -> str:
    """Short stable id of a public key (what envelopes name their recipient by)."""
    return hashlib.sha256(public.encode()).hexdigest()[:16]


def _decode(value: str, kind: str, where: str) -> bytes:
    prefix, sep, b64 = value.strip().partition(":")
    if not sep or prefix != kind:
        raise ConfigError(f"{where}: expected '{kind}:<base64>', got {value[:20]!r}…")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where}: not valid base64") from None
    if len(raw) != 32:
        raise ConfigError(f"{where}: a {kind} public key is 32 bytes, got {len(raw)}")
    return raw


def parse_x25519_public(value: str, where: str) -> X25519PublicKey:
    return X25519PublicKey.from_public_bytes(_decode(value, "x25519", where))


def parse_ed25519_public(value: str, where: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(_decode(value, "ed25519", where))


def _write_private(path: str, pem: bytes) -> None:
    """O_EXCL and 0600 from the first byte (created so, never chmodded after): never
    overwrite a key, never expose one."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, mode=0o700)
        except OSError as err:
            raise ConfigError(f"cannot create {parent}: {err.strerror or err}") from None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; refusing to overwrite a key (move it away to rotate)") from None
    except OSError as err:
        raise ConfigError(f"cannot create {path}: {err.strerror or err}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())


def _pem(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def create_host_key(path: str) -> str:
    key = X25519PrivateKey.generate()
    _write_private(path, _pem(key))
    return encode_public(key.public_key())


def create_signing_key(path: str) -> str:
    key = Ed25519PrivateKey.generate()
    _write_private(path, _pem(key))
    return encode_public(key.public_key())


def _load_private(path: str) -> object:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except OSError as err:
        raise ConfigError(f"cannot read key {path}: {err.strerror or err}") from None
    if st.st_mode & 0o077:
        raise ConfigError(f"{path}: private key is readable by group/others (mode {st.st_mode & 0o777:04o}); "
                          "chmod 0600 it")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{path}: not an unencrypted PEM private key") from None


def load_host_key(path: str) -> X25519PrivateKey:
    key = _load_private(path)
    if not isinstance(key, X25519PrivateKey):
        raise ConfigError(f"{path}: not an X25519 host key (create one with: mailtls keys init-host)")
    return key


def load_signing_key(path: str) -> Ed25519PrivateKey:
    key = _load_private(path)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 signing key (create one with: mailtls keys init-pipeline)")
    return key


def public_of(path: str) -> str:
    key = _load_private(path)
    if isinstance(key, X25519PrivateKey | Ed25519PrivateKey):
        return encode_public(key.public_key())
    raise ConfigError(f"{path}: not a mailtls host or pipeline key")


@dataclass(frozen=True, repr=False)
class PipelineKeys:
    """What a pipeline needs to enqueue deploys: its signing key and pinned host keys."""

    signing_key: Ed25519PrivateKey
    hosts: dict[str, X25519PublicKey] = field(default_factory=dict)
    source: str = ""
    notify: list[str] = field(default_factory=list)  # where a halted rollout is announced (Apprise URLs)

    def __repr__(self) -> str:
        return f"<PipelineKeys signer={encode_public(self.signing_key.public_key())[:20]}… hosts={sorted(self.hosts)}>"

    def host_key(self, host: str) -> X25519PublicKey:
        try:
            return self.hosts[host]
        except KeyError:
            raise ConfigError(
                f"{self.source or 'pipeline keys'}: no public key pinned for host {host!r}; on that host run "
                f"`mailtls keys public /etc/mailtls/host.key` and add it under [hosts] as {host} = \"x25519:…\""
            ) from None


def pipeline_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get(PIPELINE_ENV) or DEFAULT_PIPELINE_PATH


def load_pipeline(path: str | None = None) -> PipelineKeys:
    """``signing_key = "/path"`` and ``[hosts] NAME = "x25519:…"``, TOML."""
    p = pipeline_path(path)
    try:
        with open(p, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"no pipeline keys at {p}: distributed deploys are signed and encrypted. Create them with "
            "`mailtls keys init-pipeline --out /etc/mailtls/pipeline.key`, pin each host's key from "
            "`mailtls keys public` under [hosts], or use --local on the mail host"
        ) from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read pipeline keys {p}: {err}") from None
    unknown = set(raw) - {"signing_key", "hosts", "notify"}
    if unknown:
        raise ConfigError(f"{p}: unknown keys {sorted(unknown)} (expected signing_key, [hosts] and [notify])")
    if not isinstance(raw.get("signing_key"), str):
        raise ConfigError(f"{p}: signing_key: path to the pipeline's Ed25519 key is required")
    hosts_raw = raw.get("hosts", {})
    if not isinstance(hosts_raw, dict):
        raise ConfigError(f"{p}: [hosts] must be a table of host = \"x25519:…\"")
    hosts = {h: parse_x25519_public(str(v), f"{p}: hosts.{h}") for h, v in hosts_raw.items()}
    notify = raw.get("notify", {})
    if not isinstance(notify, dict) or set(notify) - {"halted", "urls"} or not all(
            isinstance(v, list) and all(isinstance(u, str) for u in v) for v in notify.values()):
        raise ConfigError(f"{p}: [notify] takes halted = [URL, ...] and urls = [URL, ...] (Apprise URLs: where a "
                          "halted rollout is announced)")
    return PipelineKeys(load_signing_key(raw["signing_key"]), hosts, p,
                        notify=list(dict.fromkeys([*notify.get("urls", []), *notify.get("halted", [])])))

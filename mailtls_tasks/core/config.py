"""The host-local targets file: the only place paths and commands come from.

A deploy message names a target; everything the worker does to that target (which
files it writes, which commands it runs, which endpoint it probes) comes from here.
Someone who can write to Redis therefore cannot make a worker run anything.

Field names and defaults follow the connector contract in DESIGN.md exactly; extras
(modes, owner, timeouts, retention, verify protocol) all default to that contract.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import math
import os
import pwd
import re
import socket
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .. import daemons
from ..commands import CommandResult, check_command
from ..errors import ConfigError, UnknownTarget
from ..ids import HOST_NAME_RE, TARGET_NAME_RE
from .configfile import CONFIG_ENV, DEFAULT_CONFIG_PATH, HOST_ENV, config_path, read_config
from .pathsafety import Resolver

__all__ = ["CONFIG_ENV", "DEFAULT_CONFIG_PATH", "HOST_ENV", "config_path", "load_config", "parse_config",
           "read_config"]

Protocol = Literal["auto", "smtp", "smtps", "imap", "imaps", "pop3", "pop3s", "tls"]


# The hard and soft time limits of one step, whoever runs it (the Celery adapter uses
# them as task limits). A target's timeouts must fit inside, checked at load time.
STEP_TIME_LIMIT = 600.0
STEP_SOFT_TIME_LIMIT = 540.0
STEP_MARGIN = 20.0
MIN_LEASE = 2.0

LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: Any, field: str) -> float:
    """Seconds from a number or a string such as ``"30s"``, ``"500ms"``, ``"2m"``."""
    if isinstance(value, bool):
        raise ValueError(f"{field}: expected seconds, got a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.match(value)
        if not m:
            raise ValueError(f"{field}: {value!r} is not a duration (e.g. 30, '30s', '500ms', '10m', '1h')")
        seconds = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0,
                                       None: 1.0}[m.group(2)]
    else:
        raise ValueError(f"{field}: expected seconds, got {type(value).__name__}")
    if not math.isfinite(seconds):
        raise ValueError(f"{field}: {value!r} is not a finite duration")
    if seconds <= 0:
        raise ValueError(f"{field}: must be positive")
    return seconds


def _check_abs_path(value: str, field: str, *, allow_empty: bool = False) -> str:
    if value == "" and allow_empty:
        return value
    if "\x00" in value or "\n" in value:
        raise ValueError(f"{field}: path contains a control character")
    if not os.path.isabs(value):
        raise ValueError(f"{field}: {value!r} is not an absolute path")
    return os.path.normpath(value)


def _parse_mode_bits(value: Any, field: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{field}: expected a file mode such as '0600'")
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ValueError(f"{field}: {value!r} is not an octal mode such as '0600'") from None
    if not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ValueError(f"{field}: expected a mode between 0000 and 0777")
    return value


class Endpoint(BaseModel):
    """One listener a deploy verifies: ``host:port``, how to speak to it, what SNI to send."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str
    protocol: Protocol = "auto"
    server_name: str | None = None

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        split_endpoint(v)  # raises ValueError with a message
        return v

    @field_validator("server_name")
    @classmethod
    def _server_name(cls, v: str | None) -> str | None:
        return None if v is None else check_server_name(v)


@dataclass(frozen=True)
class Listener:
    """An endpoint with the poll settings of its target: what a probe needs."""

    endpoint: str
    host: str
    port: int
    protocol: str
    server_name: str | None
    timeout: float
    interval: float
    connect_timeout: float

    @property
    def where(self) -> str:
        """The listener, and the SNI name a probe of it sends: what messages show."""
        return f"{self.endpoint} (SNI {self.server_name})" if self.server_name else self.endpoint


class VerifySettings(BaseModel):
    """``post_deploy_verify``: probe every listener after reload until each serves the new
    leaf. ``endpoint`` (one listener, with ``protocol`` and ``server_name``) is kept for
    existing files; ``endpoints`` lists them all, each with its own protocol and name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    endpoint: str = ""
    endpoints: list[Endpoint] = Field(default_factory=list)
    timeout: float = 30.0
    protocol: Protocol = "auto"
    server_name: str | None = None
    interval: float = 0.25
    connect_timeout: float = 5.0

    @field_validator("timeout", "interval", "connect_timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any, info: Any) -> float:
        return parse_duration(v, info.field_name)

    @field_validator("server_name")
    @classmethod
    def _server_name(cls, v: str | None) -> str | None:
        return None if v is None else check_server_name(v)

    @field_validator("endpoints", mode="before")
    @classmethod
    def _endpoints(cls, v: Any) -> Any:
        if isinstance(v, list):  # "host:port" strings are fine too
            return [{"endpoint": e} if isinstance(e, str) else e for e in v]
        return v

    @model_validator(mode="after")
    def _endpoint_needed(self) -> VerifySettings:
        if self.endpoint:
            split_endpoint(self.endpoint)  # raises ValueError with a message
        if self.enabled and not self.endpoint and not self.endpoints:
            raise ValueError("endpoint: required when verify is enabled (\"host:port\", or endpoints = [...])")
        seen = [e.endpoint for e in self.all_endpoints()]
        if len(set(seen)) != len(seen):
            raise ValueError("endpoints: the same listener is listed twice")
        return self

    def all_endpoints(self) -> list[Endpoint]:
        first = [Endpoint(endpoint=self.endpoint, protocol=self.protocol, server_name=self.server_name)] \
            if self.endpoint else []
        return first + list(self.endpoints)

    def listeners(self) -> list[Listener]:
        if not self.enabled:
            return []
        out = []
        for e in self.all_endpoints():
            host, port = split_endpoint(e.endpoint)
            out.append(Listener(e.endpoint, host, port, e.protocol, e.server_name, self.timeout, self.interval,
                                self.connect_timeout))
        return out


class DaneSettings(BaseModel):
    """``dane``: before a deploy changes the key, every TLSA name must publish (DNSSEC-signed)
    a ``3 1 1`` record for the new key, seen for at least ``min_age``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tlsa: list[str] = Field(min_length=1)
    resolver: str = "127.0.0.1:53"
    min_age: float | None = None  # default: twice the record's TTL
    timeout: float = 5.0

    @field_validator("tlsa")
    @classmethod
    def _tlsa(cls, v: list[str]) -> list[str]:
        out = []
        for name in v:
            m = re.match(r"^_(\d{1,5})\._(tcp|udp)\.(.+)$", name)
            if not m:
                raise ValueError(f"tlsa: {name!r} is not a TLSA owner name such as '_25._tcp.mx1.example.com'")
            out.append(f"_{m.group(1)}._{m.group(2)}.{check_server_name(m.group(3), 'tlsa')}")
        return out

    @field_validator("resolver")
    @classmethod
    def _resolver(cls, v: str) -> str:
        host, _ = split_endpoint(v)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"resolver: {v!r} must be an IP address and port (a validating resolver)") from None
        return v

    @field_validator("min_age", "timeout", mode="before")
    @classmethod
    def _durations(cls, v: Any, info: Any) -> float | None:
        return None if v is None else parse_duration(v, info.field_name)


KeyType = Literal["any", "rsa", "ecdsa"]


class Slot(BaseModel):
    """``alt``: the second certificate of a dual RSA + ECDSA target (Dovecot's
    ``ssl_alt_cert``/``ssl_alt_key``, the second pair of Postfix's ``smtpd_tls_chain_files``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert_path: str = ""
    key_path: str = ""
    chain_path: str = ""
    combined_path: str = ""
    key_type: KeyType = "ecdsa"

    @field_validator("cert_path", "key_path", "chain_path", "combined_path")
    @classmethod
    def _paths(cls, v: str, info: Any) -> str:
        return _check_abs_path(v, f"alt.{info.field_name}", allow_empty=True)

    @model_validator(mode="after")
    def _layout(self) -> Slot:
        _check_layout(self.combined_path, self.cert_path, self.key_path, self.chain_path, "alt.")
        return self


# What a wildcard name is probed with: smtpd looks up this name, then ``.example.net``.
SNI_PROBE_LABEL = "mailtls-probe"
# The name a probe sends to see the default certificate behind an SNI table.
SNI_UNKNOWN_NAME = "mailtls-unknown.invalid"


class SniSettings(BaseModel):
    """``sni``: the daemon picks this target's certificate by SNI for its ``names``:
    Postfix through the ``tls_server_sni_maps`` table ``map`` (its entries name this
    target's files), Dovecot through ``local_name`` blocks. ``default``: the target's
    files are also the daemon's default certificate (no SNI, or a name no entry has)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    map: str = ""
    default: bool = False


def _check_layout(combined: str, cert: str, key: str, chain: str, where: str) -> None:
    if combined and (cert or key or chain):
        raise ValueError(f"{where}combined_path holds key, certificate and chain in one file: leave "
                         f"{where}cert_path, {where}key_path and {where}chain_path unset")
    if not combined and not (cert and key):
        raise ValueError(f"{where}cert_path and {where}key_path are required (or {where}combined_path)")


_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def check_server_name(value: str, field: str = "server_name") -> str:
    """A DNS name fit for SNI: ASCII labels (IDNA-encode others), no IP, no wildcard."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        raise ValueError(f"{field}: {value!r} is an IP address; SNI carries a DNS name (leave it unset)")
    name = value[:-1] if value.endswith(".") else value
    if not name or len(name) > 253 or not all(_LABEL_RE.match(label) for label in name.split(".")):
        raise ValueError(f"{field}: {value!r} is not a valid DNS name (letters, digits, '-', dots; "
                         "IDNA-encode other characters)")
    return name.lower()


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    if not endpoint:
        raise ValueError("endpoint: required when verify is enabled (\"host:port\")")
    if endpoint.startswith("["):
        host, sep, rest = endpoint[1:].partition("]:")
    else:
        host, sep, rest = endpoint.rpartition(":")
    if not sep or not host or not rest.isdigit() or not 0 < int(rest) < 65536:
        raise ValueError(f"endpoint: {endpoint!r} is not \"host:port\"")
    return host, int(rest)


class Target(BaseModel):
    """One daemon's certificate files and commands on this host."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    mode: str = daemons.DEFAULT_MODE  # a module of daemons/; checked (and its defaults filled in) below
    # The daemon instance that serves these files: Postfix's config directory, Dovecot's
    # config file; empty: the system's own. check-config and the worker ask it what it
    # serves (``core.discover.cross_check``).
    instance: str = ""
    cert_path: str = ""
    key_path: str = ""
    chain_path: str = ""
    # One file holding the key, then the certificate chain (Postfix's smtpd_tls_chain_files):
    # key and certificate change together, in one rename -- no window where they differ.
    combined_path: str = ""
    key_type: KeyType = "any"
    alt: Slot | None = None
    sni: SniSettings | None = None
    allow_self_signed: bool = False
    dane: DaneSettings | None = None
    reload_command: str
    validate_command: str = ""
    # A daemon that reloads by signal (Exim): with reload_command empty, SIGHUP goes to
    # the pid this file holds.
    pid_file: str = ""
    post_deploy_verify: VerifySettings = Field(default_factory=VerifySettings)
    command_timeout: float = 60.0
    # None: keep an existing file's mode; new files get 0600 (key) / 0644 (cert, chain).
    key_mode: int | None = None
    cert_mode: int | None = None
    owner: str | None = None
    group: str | None = None
    backup_retention: int = Field(default=5, ge=1, le=1000)
    # The DNS names this daemon must serve: a bundle whose leaf does not cover them all is
    # rejected, `rollout --covers` selects by them, and the audit checks the served chain
    # for each. Labels group targets for `rollout --label`.
    names: list[str] = Field(default_factory=list)
    labels: list[str] = Field(default_factory=list)
    # A CA file the served chain must verify to (a private CA); empty: the system store.
    trust_anchors: str = ""

    @model_validator(mode="before")
    @classmethod
    def _mode_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        mode = data.get("mode") or daemons.DEFAULT_MODE
        merged = dict(daemons.get(mode).defaults)  # ValueError naming the known modes
        if data.get("combined_path"):  # the single-file layout has no separate cert/key defaults
            merged.pop("cert_path")
            merged.pop("key_path")
        merged.update({k: v for k, v in data.items() if v is not None})
        merged["mode"] = mode
        return merged

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not TARGET_NAME_RE.match(v):
            raise ValueError(
                f"name: {v!r} is not a valid target name (letters, digits, '.', '_', '-'; "
                "no path characters)"
            )
        return v

    @field_validator("cert_path", "key_path", "chain_path", "combined_path", "instance", "pid_file")
    @classmethod
    def _paths(cls, v: str, info: Any) -> str:
        return _check_abs_path(v, info.field_name, allow_empty=True)

    @field_validator("reload_command")
    @classmethod
    def _reload(cls, v: str, info: Any) -> str:
        return check_command(v, info.field_name)

    @model_validator(mode="after")
    def _reload_fits_daemon(self) -> Target:
        d = self.daemon
        if not self.reload_command.strip() and not d.reload_by_signal:
            raise ValueError("reload_command: must not be empty")
        if not self.reload_command.strip() and not self.pid_file:
            raise ValueError(f"pid_file: mode {self.mode} reloads by SIGHUP to the pid in pid_file when "
                             "reload_command is empty: name the pid file (or a reload_command)")
        if self.pid_file and not d.reload_by_signal:
            raise ValueError(f"pid_file: mode {self.mode} reloads by its reload_command only: leave pid_file unset")
        if not d.chain_file and any(chain for *_, chain, _ in self.slots()):
            raise ValueError(f"chain_path: {self.mode} reads the chain from the certificate file (the leaf, then "
                             "its chain, in cert_path): leave chain_path unset")
        return self

    @field_validator("validate_command")
    @classmethod
    def _validate(cls, v: str, info: Any) -> str:
        return check_command(v, info.field_name)

    @field_validator("command_timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any, info: Any) -> float:
        return parse_duration(v, info.field_name)

    @field_validator("key_mode", "cert_mode", mode="before")
    @classmethod
    def _modes(cls, v: Any, info: Any) -> int | None:
        mode = None if v is None else _parse_mode_bits(v, info.field_name)
        if info.field_name == "key_mode" and mode is not None and mode & 0o027:
            raise ValueError(f"key_mode: {mode:04o} lets others read (or the group write) the private key; "
                             "use 0600, or 0640 with a group such as ssl-cert")
        return mode

    @field_validator("names")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        out = []
        for n in v:
            if n.startswith("*."):  # a target may serve a wildcard name; its leaf must cover it literally
                out.append("*." + check_server_name(n[2:], "names"))
            else:
                out.append(check_server_name(n, "names"))
        return list(dict.fromkeys(out))

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str]) -> list[str]:
        for label in v:
            if not LABEL_RE.match(label):
                raise ValueError(f"labels: {label!r} is not a label (letters, digits, '.', '_', '-')")
        return list(dict.fromkeys(v))

    @field_validator("trust_anchors")
    @classmethod
    def _anchors(cls, v: str, info: Any) -> str:
        return _check_abs_path(v, info.field_name, allow_empty=True)

    @field_validator("owner")
    @classmethod
    def _owner(cls, v: str | None) -> str | None:
        if v is not None and not v.isdigit():
            try:
                pwd.getpwnam(v)
            except KeyError:
                raise ValueError(f"owner: no user {v!r} on this host") from None
        return v

    @field_validator("group")
    @classmethod
    def _group(cls, v: str | None) -> str | None:
        if v is not None and not v.isdigit():
            try:
                grp.getgrnam(v)
            except KeyError:
                raise ValueError(f"group: no group {v!r} on this host") from None
        return v

    @model_validator(mode="after")
    def _distinct_paths(self) -> Target:
        _check_layout(self.combined_path, self.cert_path, self.key_path, self.chain_path, "")
        if self.alt is not None:
            kinds = {self.key_type, self.alt.key_type}
            if self.alt.key_type == "any" or (self.key_type != "any" and kinds != {"rsa", "ecdsa"}):
                raise ValueError("alt.key_type must be 'rsa' or 'ecdsa', and key_type the other one (or 'any')")
        paths = [p for _, p in self.files()]
        if len(set(paths)) != len(paths):
            raise ValueError("cert_path, key_path, chain_path and combined_path (and alt's) must be different files")
        if _same_file_twice(paths):
            raise ValueError("two of cert_path, key_path, chain_path, combined_path (and alt's) are the same file "
                             "(through a symlink or a hard link)")
        return self

    @model_validator(mode="after")
    def _sni_fits_daemon(self) -> Target:
        if self.sni is None:
            return self
        if not self.daemon.sni_files:
            raise ValueError(f"sni: {self.mode} picks a certificate by SNI through an expanded tls_certificate, "
                             "which mailtls does not read: give each file set a target of its own, with its names")
        if not self.names:
            raise ValueError("sni: names are required: they are the SNI names this target's certificate is "
                             "served for, and each is verified by its name")
        parse = self.daemon.sni_map
        if parse is None and self.sni.map:
            raise ValueError(f"sni.map: mode {self.mode} picks a certificate by SNI from its own configuration "
                             "(local_name blocks), not from a table: leave sni.map unset")
        if parse is not None:
            if not self.sni.map:
                raise ValueError(f"sni.map: mode {self.mode} picks a certificate by SNI from a table: name it "
                                 "as main.cf's tls_server_sni_maps does (e.g. \"lmdb:/etc/postfix/sni\")")
            parse(self.sni.map)  # ValueError naming what is wrong
        return self

    @model_validator(mode="after")
    def _layout_fits_daemon(self) -> Target:
        refused = sorted(self.layouts() - self.daemon.layouts)
        if refused:
            raise ValueError(f"mode: {self.mode} cannot read a {' or '.join(refused)} layout of files (it takes: "
                             f"{', '.join(sorted(self.daemon.layouts))})")
        return self

    @model_validator(mode="after")
    def _fits_step_limits(self) -> Target:
        """The longest step is a rollback: two reload attempts and a verify poll."""
        v = self.post_deploy_verify
        verify = (v.timeout + v.connect_timeout * len(v.all_endpoints())) if v.enabled else 0.0
        longest = 2 * self.command_timeout + verify + STEP_MARGIN
        if longest > STEP_SOFT_TIME_LIMIT:
            raise ValueError(
                f"command_timeout ({self.command_timeout:g}s) x2 + post_deploy_verify timeout and connect_timeout "
                f"({verify:g}s) + {STEP_MARGIN:g}s margin = {longest:g}s does not fit inside a step's time limit "
                f"({STEP_SOFT_TIME_LIMIT:g}s): a step would be killed mid-way")
        return self

    @property
    def daemon(self) -> daemons.Daemon:
        """The daemon this target's files are for: its config test, reload and listeners."""
        return daemons.get(self.mode)

    def reload(self) -> CommandResult:
        """Make the daemon read its files again: the reload_command, or (empty, a daemon
        that reloads by signal) SIGHUP to the pid in pid_file."""
        return self.daemon.reload(self.reload_command, timeout=self.command_timeout, pid_file=self.pid_file)

    @property
    def reload_once(self) -> tuple[str, str, str]:
        """Targets with the same one reload: a batch reloads once for all of them."""
        return self.mode, self.reload_command, "" if self.reload_command.strip() else self.pid_file

    @property
    def reload_what(self) -> str:
        """The reload, as an operator reads it in an error."""
        return "reload_command" if self.reload_command.strip() else f"reload (SIGHUP to the pid in {self.pid_file})"

    def layouts(self) -> set[daemons.Layout]:
        """How this target's files are laid out (``daemons.Layout``)."""
        used: set[daemons.Layout] = {"dual"} if self.alt is not None else set()
        for *_, combined in self.slots():
            used.add("combined" if combined else "separate")
        return used

    def verify_endpoints(self) -> list[Listener]:
        """The listeners a deploy verifies (and the audit probes). An SNI target's: each
        listener once per name, with that name as SNI; the default target's also without
        SNI and with a name no entry has (both get the default certificate)."""
        listeners = self.post_deploy_verify.listeners()
        if self.sni is None:
            return listeners
        names = self.sni_probe_names() + ([None, SNI_UNKNOWN_NAME] if self.sni.default else [])
        return [dataclasses.replace(li, server_name=n) for li in listeners for n in names]

    def default_listeners(self) -> list[Listener]:
        """An SNI target that is not the default: the listeners without SNI, whose
        certificate a deploy of it must leave as it was. Otherwise none."""
        if self.sni is None or self.sni.default:
            return []
        return [dataclasses.replace(li, server_name=None) for li in self.post_deploy_verify.listeners()]

    def sni_probe_names(self) -> list[str]:
        """The SNI name a probe sends for each of ``names`` (a wildcard: one label below it)."""
        return [f"{SNI_PROBE_LABEL}.{n[2:]}" if n.startswith("*.") else n for n in self.names]

    def slots(self) -> list[tuple[str, KeyType, str, str, str, str]]:
        """(role prefix, key type, cert, key, chain, combined) per certificate: one, or two
        for a dual RSA + ECDSA target."""
        primary_type: KeyType = self.key_type if self.key_type != "any" or self.alt is None else (
            "rsa" if self.alt.key_type == "ecdsa" else "ecdsa")
        out = [("", primary_type, self.cert_path, self.key_path, self.chain_path, self.combined_path)]
        if self.alt is not None:
            a = self.alt
            out.append(("alt_", a.key_type, a.cert_path, a.key_path, a.chain_path, a.combined_path))
        return out

    def files(self) -> list[tuple[str, str]]:
        """(role, path) in the fixed order files are committed and restored: per slot the
        chain, then the key, then the certificate (a client never sees a certificate whose
        key is not in place yet), or the one combined file."""
        out: list[tuple[str, str]] = []
        for prefix, _, cert, key, chain, combined in self.slots():
            if combined:
                out.append((prefix + "combined", combined))
                continue
            if chain:
                out.append((prefix + "chain", chain))
            out += [(prefix + "key", key), (prefix + "cert", cert)]
        return out

    def leaf_file(self) -> str:
        """The file whose first certificate is this target's (primary) leaf."""
        return self.combined_path or self.cert_path

    def public_view(self) -> dict[str, Any]:
        """What ``check-config`` prints and the registry publishes (no secrets here anyway)."""
        d = self.model_dump()
        d["key_mode"] = f"{self.key_mode:04o}" if self.key_mode is not None else "keep (new: 0600)"
        d["cert_mode"] = f"{self.cert_mode:04o}" if self.cert_mode is not None else "keep (new: 0644)"
        return d


class SecuritySettings(BaseModel):
    """``[security]``: what a worker needs to accept distributed deploys.

    ``host_keys``: this host's X25519 private keys (first = current; keep the previous
    one listed while rotating). ``trusted_signers``: Ed25519 public keys of pipelines
    allowed to deploy here. ``max_envelope_age``: older envelopes are refused.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host_keys: list[str] = Field(min_length=1)
    trusted_signers: list[str] = Field(min_length=1)
    max_envelope_age: float = 3600.0

    @field_validator("host_keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        return [_check_abs_path(p, "host_keys") for p in v]

    @field_validator("trusted_signers")
    @classmethod
    def _signers(cls, v: list[str]) -> list[str]:
        from ..security.keys import parse_ed25519_public

        for i, s in enumerate(v):
            try:
                parse_ed25519_public(s, f"trusted_signers[{i}]")
            except ConfigError as err:
                raise ValueError(str(err)) from None
        return v

    @field_validator("max_envelope_age", mode="before")
    @classmethod
    def _age(cls, v: Any, info: Any) -> float:
        return parse_duration(v, info.field_name)


def _default_host() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


class NotifySettings(BaseModel):
    """``[notify]``: where this host's notices go (Apprise URLs), per kind. ``urls``
    get every kind; each kind's own list adds to them. The worker sends them as
    ``mailtls.notify`` tasks (``retries`` with backoff); --local and certbot-hook
    deploys in-process, ``retries`` tries. A notice never changes a deploy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    urls: list[str] = Field(default_factory=list)
    rejected: list[str] = Field(default_factory=list)
    rolled_back: list[str] = Field(default_factory=list)
    failed: list[str] = Field(default_factory=list)
    # a served or on-disk certificate ending within expiring_days (from the audit; once a day per target)
    expiring: list[str] = Field(default_factory=list)
    expiring_days: float = Field(default=14.0, ge=0, le=3650)
    retries: int = Field(default=5, ge=0, le=20)

    @field_validator("urls", "rejected", "rolled_back", "failed", "expiring")
    @classmethod
    def _urls(cls, v: list[str], info: Any) -> list[str]:
        from ..notify import check_urls

        try:
            check_urls(v, f"notify.{info.field_name}")
        except ConfigError as err:  # pydantic wants a ValueError; the location is ours already
            raise ValueError(str(err).removeprefix(f"notify.{info.field_name}: ")) from None
        return v

    def urls_for(self, kind: str) -> list[str]:
        return list(dict.fromkeys([*self.urls, *getattr(self, kind, [])]))


class HostConfig(BaseModel):
    """The whole targets file of one mail host."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(default_factory=_default_host)
    state_dir: str = "/var/lib/mailtls"
    # How long a distributed deploy stays alive between two of its steps (its next
    # message may wait behind others in the host's queue); past it, recovery ends it.
    deploy_lease: float = 600.0
    # How often a worker looks for dead deploys to finish and endings to publish.
    recovery_interval: float = 30.0
    # How many times a distributed step retries (1, 2, 4 ... 30 s apart, with jitter) a
    # target whose files another live deploy owns, before its deploy ends ``rejected``
    # (reason ``busy``, nothing touched). 10 is about four minutes.
    busy_retries: int = Field(default=10, ge=0, le=100)
    # The drift audit: how often each worker probes its targets, and how many days before
    # notAfter a certificate is a warning.
    audit_interval: float = 600.0
    warn_days: float = Field(default=21.0, ge=0, le=3650)
    # Prometheus metrics on 127.0.0.1:metrics_port (none: off).
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    targets: dict[str, Target] = Field(default_factory=dict)
    security: SecuritySettings | None = None
    notify: NotifySettings = Field(default_factory=NotifySettings)
    source: str = ""
    # Target -> the other targets that share a real file with it (found at load, where
    # every path is resolved anyway): a deploy must not leave one of them half-replaced.
    _sharing: dict[str, tuple[str, ...]] = PrivateAttr(default_factory=dict)

    def sharing_with(self, name: str) -> tuple[Target, ...]:
        """The other targets reading at least one of ``name``'s files."""
        return tuple(self.targets[n] for n in self._sharing.get(name, ()))

    @field_validator("deploy_lease", "recovery_interval", "audit_interval", mode="before")
    @classmethod
    def _durations(cls, v: Any, info: Any) -> float:
        seconds = parse_duration(v, info.field_name)
        if info.field_name == "deploy_lease" and seconds < MIN_LEASE:
            raise ValueError(f"deploy_lease: {seconds:g}s is shorter than {MIN_LEASE:g}s: every deploy waiting "
                             "for its next message would be taken for dead")
        return seconds

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not HOST_NAME_RE.match(v):
            raise ValueError(f"host: {v!r} is not a valid routing name")
        return v

    @field_validator("state_dir")
    @classmethod
    def _state(cls, v: str, info: Any) -> str:
        return _check_abs_path(v, info.field_name)

    def target(self, name: str) -> Target:
        """By NAME, or by its fleet address HOST/NAME (HOST must be this host)."""
        host, sep, local = name.partition("/")
        if sep:
            if host != self.host:
                raise UnknownTarget(f"unknown target {name!r} on host {self.host!r} (it names host {host!r})")
            name = local
        try:
            return self.targets[name]
        except KeyError:
            known = ", ".join(sorted(self.targets)) or "none"
            raise UnknownTarget(
                f"unknown target {name!r} on host {self.host!r} (configured: {known})"
            ) from None


def _format_validation_error(err: ValidationError, model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per problem, naming the field (a misspelt one with the closest known
    name: pydantic alone says "Extra inputs are not permitted")."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden" and e["loc"]:
            msg = _unknown_field(model, e["loc"])
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
            if loc:  # validators name their field too: say it once
                msg = msg.removeprefix(f"{loc.rsplit('.', 1)[-1]}: ")
        where = ".".join(x for x in (prefix, loc) if x)
        lines.append(f"{where}: {msg}" if where else msg)
    return lines


def _unknown_field(model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    import difflib

    known = sorted(_model_at(model, loc[:-1]).model_fields)
    given = str(loc[-1])
    close = difflib.get_close_matches(given, known, n=1, cutoff=0.6)
    return (f"unknown field {given!r}" + (f"; did you mean {close[0]!r}?" if close else "")
            + f" (known here: {', '.join(k for k in known if k not in ('name', 'source'))})")


def _model_at(model: type[BaseModel], path: tuple[int | str, ...]) -> type[BaseModel]:
    """The model a location inside ``model`` is a field of (through lists, dicts and
    optionals of models)."""
    import typing

    def inner(annotation: Any) -> type[BaseModel] | None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        for arg in typing.get_args(annotation):
            found = inner(arg)
            if found is not None:
                return found
        return None

    cur = model
    for part in path:
        field = cur.model_fields.get(str(part))
        if field is None:
            continue  # a list index or a dict key: the same model
        sub = inner(field.annotation)
        if sub is None:
            break
        cur = sub
    return cur


def parse_config(raw: dict[str, Any], source: str = "<config>") -> HostConfig:
    """Validate a parsed targets file; errors name the target and the field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a table/object")
    raw = dict(raw)
    targets_raw = raw.pop("targets", {}) or {}
    if not isinstance(targets_raw, dict):
        raise ConfigError(f"{source}: 'targets' must be a table of NAME -> target")
    targets: dict[str, Target] = {}
    problems: list[str] = []
    for name, body in targets_raw.items():
        if not isinstance(body, dict):
            problems.append(f"targets.{name}: must be a table")
            continue
        if "name" in body:
            problems.append(f"targets.{name}.name: the name is the table's key; remove 'name'")
            continue
        try:
            targets[name] = Target(name=name, **body)
        except ValidationError as err:
            problems += _format_validation_error(err, Target, f"targets.{name}")
        except TypeError as err:  # e.g. non-string keys
            problems.append(f"targets.{name}: {err}")
    try:
        host = HostConfig(targets={}, source=source, **raw)
    except ValidationError as err:
        problems += _format_validation_error(err, HostConfig)
        host = None
    shared_problems, sharing = _shared_files(targets)
    problems += shared_problems
    if host is not None:
        problems += _unsafe_paths(host, targets)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    assert host is not None
    loaded = host.model_copy(update={"targets": targets})
    loaded._sharing = sharing
    return loaded


def _same_file_twice(paths: list[str]) -> bool:
    """Whether two of the paths are one file: the same inode (a symlink or a hard link),
    or, not there yet, the same path once resolved. One stat each, not a realpath: a
    targets file of a thousand SNI targets is loaded by every deploy."""
    seen: set[tuple[int, int]] = set()
    missing = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            missing.append(p)
            continue
        if (st.st_dev, st.st_ino) in seen:
            return True
        seen.add((st.st_dev, st.st_ino))
    reals = [os.path.realpath(p) for p in missing]
    return len(set(reals)) != len(reals)


def _shared_files(targets: dict[str, Target]) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """Two targets may share a file (Postfix and Dovecot reading one cert), but only in
    the same role: one target's key must never be another's certificate. Returns the
    problems, and which targets share a file with which."""
    seen: dict[str, tuple[str, str]] = {}
    readers: dict[str, list[str]] = {}
    problems = []
    resolver = Resolver()
    for name, t in targets.items():
        for role, path in t.files():
            real = resolver.realpath(path)
            other = seen.setdefault(real, (name, role))
            if other[1] != role:
                problems.append(f"targets.{name}.{role}_path: {path} is the same file ({real}) as "
                                f"targets.{other[0]}.{other[1]}_path; a shared file must have the same role")
            names = readers.setdefault(real, [])
            if name not in names:
                names.append(name)
    sharing: dict[str, list[str]] = {}
    for names in readers.values():
        for name in names:
            mine = sharing.setdefault(name, [])
            mine += [n for n in names if n != name and n not in mine]
    return problems, {n: tuple(others) for n, others in sharing.items() if others}


def _unsafe_paths(host: HostConfig, targets: dict[str, Target]) -> list[str]:
    from .pathsafety import unsafe_component

    resolver = Resolver()  # a thousand targets share a handful of directories
    checks = [("state_dir", host.state_dir)]
    checks += [(f"targets.{n}.{role}_path", p) for n, t in targets.items() for role, p in t.files()]
    if host.security:
        checks += [("security.host_keys", p) for p in host.security.host_keys]
    problems = []
    for field, path in checks:
        why = unsafe_component(path, resolver=resolver)
        if why:
            problems.append(f"{field}: {path} is not safe to write as root: {why} (fix the ownership or "
                            "permissions, as sshd's StrictModes would ask)")
    return problems


def load_config(path: str | None = None) -> HostConfig:
    """Load TOML or JSON (by extension; anything but ``.json`` is read as TOML)."""
    return parse_config(*read_config(path))

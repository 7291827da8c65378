"""Postfix: the MTA (smtpd on 25, SMTPS on 465, submission on 587).

What Postfix is to a deploy: ``postfix check`` tests its configuration and ``postfix
reload`` makes new smtpd processes read the files (existing ones keep the old pair
until they exit: only a fresh handshake proves what is served). It takes every
layout: separate files (``smtpd_tls_cert_file`` / ``smtpd_tls_key_file``), the key
and chain in one file (``smtpd_tls_chain_files``, key first), and RSA + ECDSA side by
side (two pairs in ``smtpd_tls_chain_files``, or ``smtpd_tls_eccert_file``).

``discover`` reads an instance's own configuration as Postfix itself resolves it
(``postconf -x`` for main.cf, ``-M`` for master.cf's services, ``-Px`` for each
service's ``-o`` overrides): which files each TLS listener serves, STARTTLS or
wrapper mode, and the SNI maps it names.
"""

from __future__ import annotations

import socket

from ..errors import ConfigError
from .found import (
    FileSet,
    FileSlot,
    Found,
    FoundListener,
    Served,
    SniServed,
    cert_key_type,
    loopback_for,
    pem_kinds,
    run_tool,
)
from .interface import SMTP_LISTENERS, CommandDaemon
from .postfix_sni import name_for_key, parse_map, parse_source

# ------------------------------------------------------------ reading its own config
# The main.cf parameters that decide what a listener serves; a service's -o overrides
# in master.cf (``postconf -P``) win over them for that service.
TLS_PARAMETERS = (
    "smtpd_tls_chain_files", "smtpd_tls_cert_file", "smtpd_tls_key_file", "smtpd_tls_eccert_file",
    "smtpd_tls_eckey_file", "smtpd_tls_dcert_file", "smtpd_tls_security_level", "smtpd_use_tls",
    "smtpd_enforce_tls", "smtpd_tls_wrappermode", "tls_server_sni_maps",
)
INSTANCE_PARAMETERS = ("config_directory", "mail_version", "inet_interfaces", "multi_instance_directories")
DEFAULT_CONFIG_DIRECTORY = "/etc/postfix"


def _postconf(config_dir: str | None, *args: str) -> str:
    return run_tool(["postconf", *(["-c", config_dir] if config_dir else []), *args],
                    f"postfix {config_dir or DEFAULT_CONFIG_DIRECTORY}")


def _settings(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        name, sep, value = line.partition(" = ")
        if not sep and line.endswith(" ="):
            name, sep, value = line[:-2], "=", ""
        if sep:
            out[name.strip()] = value.strip()
    return out


def discover(config_dir: str | None = None) -> list[Found]:
    """Every Postfix instance this configuration directory describes: the one named
    (``postconf -c DIR``), or the default one and, from its
    ``multi_instance_directories``, each postmulti instance."""
    first = _settings(_postconf(config_dir, "-x", *INSTANCE_PARAMETERS))
    # the directory named wins over what postconf says of it (3.10 can print its compiled-in default)
    default_dir = config_dir or first.get("config_directory") or DEFAULT_CONFIG_DIRECTORY
    dirs = [default_dir]
    if config_dir is None:
        dirs += [d for d in first.get("multi_instance_directories", "").replace(",", " ").split() if d not in dirs]
    out = []
    for d in dirs:
        try:
            out.append(_discover_instance(d, default=config_dir is None and d == default_dir))
        except ConfigError as err:
            if d == default_dir:
                raise
            # one broken postmulti instance must not hide the others
            out.append(Found(mode="postfix", instance=d, default_instance=False, version="", error=str(err)))
    return out


def _discover_instance(config_dir: str, *, default: bool) -> Found:
    main = _settings(_postconf(config_dir, "-x", *INSTANCE_PARAMETERS, *TLS_PARAMETERS))
    # Unexpanded: a key file left at its default ($smtpd_tls_cert_file) follows the
    # certificate of each service, after the service's -o overrides.
    raw = _settings(_postconf(config_dir, *KEY_DEFAULTS))
    follows = {key: raw.get(key, "").strip("${}") == cert for key, cert in KEY_DEFAULTS.items()}
    found = Found(mode="postfix", instance=config_dir, default_instance=default,
                  version=main.get("mail_version", ""),
                  reload_command="postfix reload" if default else f"postfix -c {config_dir} reload",
                  validate_command="postfix check" if default else f"postfix -c {config_dir} check")
    overrides: dict[tuple[str, str], dict[str, str]] = {}
    for key, value in _settings(_postconf(config_dir, "-Px")).items():
        service, _, rest = key.partition("/")
        kind, _, name = rest.partition("/")
        overrides.setdefault((service, kind), {})[name] = value
    services = [line.split() for line in _postconf(config_dir, "-M").splitlines() if line.strip()]
    passes = [s[0] for s in services if len(s) >= 8 and s[1] == "pass" and s[7] == "smtpd"]
    by_files: dict[FileSet, Served] = {}
    tables: list[str] = []  # tls_server_sni_maps, as main.cf and each service's -o give it
    for fields in services:
        if len(fields) < 8 or fields[1] != "inet" or fields[7] not in ("smtpd", "postscreen"):
            continue
        service, command = fields[0], fields[7]
        own = overrides.get((service, "inet"), {})
        if command == "postscreen":  # the smtpd it hands connections to answers STARTTLS
            own = overrides.get((passes[0], "pass"), {}) if passes else own
        settings = {**main, **own}
        for key, cert in KEY_DEFAULTS.items():
            if follows[key] and cert in own and key not in own:
                settings[key] = own[cert]
        protocol = _tls_protocol(settings)
        where = f"master.cf service {service}"
        if protocol is None:
            continue  # no TLS on it: nothing of ours to serve there
        listener = _listener(service, main.get("inet_interfaces", "all"), protocol)
        if listener is None:
            found.notes.append(f"{where}: cannot tell its port; list it in post_deploy_verify by hand")
            continue
        files = _file_set(settings, found.notes, where)
        if files is None:
            if not any(n.startswith(where) for n in found.notes):
                found.notes.append(f"{where} ({listener.endpoint}) offers TLS but names no certificate file")
            continue
        if settings.get("smtpd_tls_dcert_file"):
            found.notes.append(f"{where}: a DSA certificate ({settings['smtpd_tls_dcert_file']}) is not managed")
        source = "main.cf" if not overrides.get((service, "inet")) or all(
            settings.get(p) == main.get(p) for p in TLS_PARAMETERS) else f"{where} (-o overrides)"
        served = by_files.setdefault(files, Served(files, source=source))
        served.listeners.append(listener)
        sni = settings.get("tls_server_sni_maps", "")
        if sni and sni not in tables:
            tables.append(sni)
    found.served = list(by_files.values())
    for value in tables:
        for spec in value.replace(",", " ").split():
            _sni_table(spec, found)
    return found


def _sni_table(spec: str, found: Found) -> None:
    """The file sets a ``tls_server_sni_maps`` table serves, one per distinct list of
    files, with the names (keys) that get it; what cannot be read is said in a note."""
    try:
        table = parse_map(spec, "tls_server_sni_maps")
    except ValueError as err:
        found.sni.append(f"tls_server_sni_maps = {spec}: not read ({err})")
        return
    try:
        with open(table.source, "rb") as f:
            entries = parse_source(f.read().decode("utf-8", "replace"), table.source)
    except (OSError, ConfigError) as err:
        why = err.strerror if isinstance(err, OSError) else str(err)
        found.sni.append(f"tls_server_sni_maps = {spec}: cannot read its source {table.source}: {why}")
        return
    groups: dict[tuple[str, ...], list[str]] = {}
    for e in entries:
        groups.setdefault(e.files, []).append(name_for_key(e.key))
    for paths, names in groups.items():
        where = f"{spec} ({names[0]})"
        files = _file_set({"smtpd_tls_chain_files": ", ".join(paths)}, found.notes, where)
        found.conditional += list(paths)
        if files is not None:
            found.sni_served.append(SniServed(files, names, table=spec, source=spec))


def _yes(value: str | None) -> bool:
    return (value or "").strip().lower() in ("yes", "true", "1")  # Postfix booleans, any case


def _tls_protocol(s: dict[str, str]) -> str | None:
    """smtps (wrapper mode), smtp (STARTTLS offered) or None (no TLS)."""
    if _yes(s.get("smtpd_tls_wrappermode")):
        return "smtps"
    level = s.get("smtpd_tls_security_level", "").strip().lower()
    if level:
        return None if level == "none" else "smtp"
    return "smtp" if _yes(s.get("smtpd_use_tls")) or _yes(s.get("smtpd_enforce_tls")) else None


def _listener(service: str, interfaces: str, protocol: str) -> FoundListener | None:
    host, sep, port = service.rpartition(":")
    if not sep:
        host, port = "", service
    if not port.isdigit():
        try:
            port = str(socket.getservbyname(port, "tcp"))
        except OSError:
            return None
    if not host:
        first = interfaces.replace(",", " ").split()
        host = first[0] if first else "all"
        if host in ("localhost", "loopback-only", "all"):
            host = "127.0.0.1"
    return FoundListener(loopback_for(host), int(port), protocol, service)


def _file_set(s: dict[str, str], notes: list[str], where: str) -> FileSet | None:
    """The files one listener serves, as slots a target can take; None (with a note
    saying why) when they do not fit one: a proposal must never be a guess."""
    chain_files = [f for f in s.get("smtpd_tls_chain_files", "").replace(",", " ").split() if f]
    slots: list[FileSlot] = []
    if len(chain_files) == 1:  # one file: key and chain in it, the only layout Postfix takes
        if pem_kinds(chain_files[0])[0] > 1:
            notes.append(f"{where}: {chain_files[0]} holds more than one key (RSA and ECDSA in one file): a "
                         "target takes one key per file; not proposed")
            return None
        slots.append(FileSlot(combined=chain_files[0], key_type=cert_key_type(chain_files[0])))
    elif chain_files:  # each key followed by its chain: in one file, or in the files after it
        groups: list[list[str]] = []
        for f in chain_files:
            keys, _ = pem_kinds(f)
            if keys < 0:
                notes.append(f"{where}: cannot read {f} to tell what it holds (run discover as root)")
                return None
            if keys > 1:
                notes.append(f"{where}: {f} holds {keys} keys (RSA and ECDSA in one file): a target takes one "
                             "key per file; not proposed")
                return None
            if keys:
                groups.append([f])
            elif groups:
                groups[-1].append(f)
            else:
                notes.append(f"{where}: smtpd_tls_chain_files starts with {f}, which holds no key; not proposed")
                return None
        for g in groups:
            _, first_certs = pem_kinds(g[0])
            if len(g) == 1 and first_certs:
                slots.append(FileSlot(combined=g[0], key_type=cert_key_type(g[0])))
            elif len(g) in (2, 3) and not first_certs:
                slots.append(FileSlot(key=g[0], cert=g[1], chain=g[2] if len(g) == 3 else "",
                                      key_type=cert_key_type(g[1])))
            else:
                notes.append(f"{where}: {', '.join(g)}: a key with its chain split this way is not a layout a "
                             "target takes; not proposed")
                return None
    else:
        for cert_p, key_p in (("smtpd_tls_cert_file", "smtpd_tls_key_file"),
                              ("smtpd_tls_eccert_file", "smtpd_tls_eckey_file")):
            cert = s.get(cert_p, "")
            if not cert:
                continue
            key = s.get(key_p) or cert
            kind = cert_key_type(cert)
            slots.append(FileSlot(combined=cert, key_type=kind) if key == cert
                         else FileSlot(cert=cert, key=key, key_type=kind))
    if not slots:
        return None
    if len(slots) > 2:
        notes.append(f"{where}: {len(slots)} certificates; a target takes one, or an RSA and an ECDSA: not proposed")
        return None
    return FileSet(tuple(slots))


KEY_DEFAULTS = {"smtpd_tls_key_file": "smtpd_tls_cert_file", "smtpd_tls_eckey_file": "smtpd_tls_eccert_file"}


DAEMON = CommandDaemon(
    name="postfix",
    defaults={
        "cert_path": "/etc/postfix/certs/cert.pem",
        "key_path": "/etc/postfix/certs/key.pem",
        "chain_path": "",
        "reload_command": "postfix reload",
        "validate_command": "postfix check",
    },
    reader=discover,
    default_instance=DEFAULT_CONFIG_DIRECTORY,
    sni_map=parse_map,
    listeners=SMTP_LISTENERS,
)

"""Dovecot: IMAP and POP3 (143 and 110 with STARTTLS/STLS, 993 and 995 implicit TLS).

What Dovecot is to a deploy: ``doveconf -n`` tests its configuration and ``doveadm
reload`` makes it read the files again; until then its config process keeps serving
what it read when it started. It takes every layout: separate files (2.3 ``ssl_cert =
<file`` / ``ssl_key = <file``; 2.4 ``ssl_server_cert_file`` / ``ssl_server_key_file``),
one file holding key and chain (both settings naming it), and RSA + ECDSA side by side
(``ssl_alt_cert`` / ``ssl_alt_key``).

``discover`` reads an instance's own configuration through ``doveconf``, which 2.3
and 2.4 print differently (2.4: nested ``ssl_server { cert_file = ... }`` blocks, also
inside ``local_name``; 2.3: ``ssl_cert = <file``, the key path shown only with -P),
and its listeners from the services, defaults included.
"""

from __future__ import annotations

import re

from .found import FileSet, FileSlot, Found, FoundListener, Served, SniServed, cert_key_type, loopback_for, run_tool
from .interface import CommandDaemon, UsualListener

# ------------------------------------------------------------ reading its own config
DEFAULT_CONFIG_FILE = "/etc/dovecot/dovecot.conf"
# login service -> (STARTTLS protocol, implicit-TLS protocol), for the protocols it serves
LOGIN_SERVICES = {"imap": ("imap-login", "imap", "imaps"), "pop3": ("pop3-login", "pop3", "pop3s"),
                  "submission": ("submission-login", "smtp", "smtps")}


def _doveconf(config_file: str | None, *args: str) -> str:
    return run_tool(["doveconf", *(["-c", config_file] if config_file else []), *args],
                    f"dovecot {config_file or DEFAULT_CONFIG_FILE}")


def flatten(text: str) -> tuple[dict[str, str], set[str]]:
    """doveconf's output as ``path -> value`` (``service/imap-login/inet_listener/imap/port``)
    and the set of block paths: 2.4 prints nested blocks, 2.3 and a path query flat lines;
    both come out the same."""
    values: dict[str, str] = {}
    blocks: set[str] = set()
    stack: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line == "}":
            if stack:
                stack.pop()
            continue
        if line.endswith("{"):
            head = "/".join(line[:-1].split())
            stack.append(head)
            blocks.add("/".join(stack))
            continue
        name, sep, value = line.partition("=")
        if sep:
            values["/".join([*stack, name.strip()])] = value.strip()
    return values, blocks


def _version(header: str) -> tuple[str, tuple[int, ...], str]:
    """From doveconf -n's first line, ``# 2.4.1-4 (7d8c0e5759): /etc/dovecot/dovecot.conf``:
    the version as printed, as numbers, and the config file it read."""
    m = re.match(r"#\s*(\d+(?:\.\d+)*)(\S*)\s*(?:\([^)]*\))?:\s*(\S+)", header)
    if not m:
        return "", (), ""
    return m.group(1) + m.group(2), tuple(int(n) for n in m.group(1).split(".")), m.group(3)


def _file(value: str | None) -> str:
    """2.3's ``<path`` (the file's contents) as a path; 2.4 gives the path itself."""
    return (value or "").strip().removeprefix("<").strip()


def discover(config_file: str | None = None) -> list[Found]:
    """The Dovecot instance of ``config_file`` (doveconf's default when None)."""
    # -P: the key paths are hidden without it. This output holds the passdb's secrets
    # too: only the settings below are read from it, and it goes nowhere else.
    text = _doveconf(config_file, "-n", "-P")
    version, numbers, path = _version(text.splitlines()[0] if text else "")
    config_file = config_file or path or DEFAULT_CONFIG_FILE
    mine, _ = flatten(text)
    every, blocks = flatten(_doveconf(config_file, "-a"))
    is24 = numbers >= (2, 4)
    default = config_file == DEFAULT_CONFIG_FILE
    found = Found(mode="dovecot", instance=config_file, default_instance=default, version=version,
                  reload_command="doveadm reload" if default else f"doveadm -c {config_file} reload",
                  validate_command="doveconf -n" if default else f"doveconf -c {config_file} -n")
    if every.get("ssl", "yes") == "no":
        found.notes.append("ssl = no: this Dovecot offers no TLS")
        return [found]

    inline: list[str] = []

    def tls(prefix: str) -> list[str]:
        """cert, key, alt cert, alt key under ``prefix`` (top level, or a block's): paths
        only. A value that is not a file (2.3's inline PEM, without the ``<``) is left
        out and said in a note, never shown: it may be a key."""
        if is24:
            names = [f"ssl_server/{k}" for k in ("cert_file", "key_file", "alt_cert_file", "alt_key_file")]
            raw = [mine.get(prefix + n) or mine.get(prefix + n.replace("/", "_")) or "" for n in names]
            ok = [v for v in raw if not v or v.startswith("/")]
        else:
            names = ["ssl_cert", "ssl_key", "ssl_alt_cert", "ssl_alt_key"]
            raw = [mine.get(prefix + n) or "" for n in names]
            ok = [v for v in raw if not v or v.startswith("<")]
        if len(ok) != len(raw):
            inline.append(prefix.rstrip("/") or "the top level")
            return ["", "", "", ""]
        return [_file(v) for v in raw]

    cert, key, alt_cert, alt_key = tls("")
    # Blocks that give some connections files of their own: by SNI name (local_name),
    # by local or remote address (local, remote), or per protocol (protocol NAME).
    scopes = sorted({"/".join(k.split("/")[:2]) for k in mine
                     if k.split("/")[0] in ("local_name", "local", "remote", "protocol") and "ssl" in k})
    per_protocol: dict[str, list[str]] = {}
    for scope in scopes:
        kind, _, name = scope.partition("/")
        files = [f for f in tls(scope + "/") if f]
        if not files:
            continue
        if kind == "protocol":
            per_protocol[name] = tls(scope + "/")
            continue
        found.conditional += files
        c, k, ac, ak = tls(scope + "/")
        if kind == "local_name" and c:  # by SNI name: a target of its own can take it
            slots = [_slot(c, k)] + ([_slot(ac, ak)] if ac else [])
            found.sni_served.append(SniServed(FileSet(tuple(slots)), name.strip('"').split(),
                                              source=f"{config_file} (local_name {name})"))
        else:
            found.sni.append(f"{kind} {name}: {', '.join(files)}")
    for where in inline:
        found.notes.append(f"{where}: a TLS setting holds its PEM inline, not a file name: nothing to manage there")
    if not cert:
        found.notes.append("no ssl certificate file is configured")
        return [found]
    listeners = _listeners(config_file, every, blocks, is24)
    sets: list[tuple[str, list[str]]] = [("", [cert, key, alt_cert, alt_key])]
    sets += [(proto, [f or base for f, base in zip(files, (cert, key, alt_cert, alt_key), strict=True)])
             for proto, files in sorted(per_protocol.items())]
    for proto, (c, k, ac, ak) in sets:
        slots = [_slot(c, k)] + ([_slot(ac, ak)] if ac else [])
        served = Served(FileSet(tuple(slots)), source=config_file + (f" (protocol {proto})" if proto else ""))
        served.listeners = [li for p, li in listeners if (p == proto if proto else p not in per_protocol)]
        found.served.append(served)
    return [found]


def _slot(cert: str, key: str) -> FileSlot:
    key = key or cert
    kind = cert_key_type(cert)
    return FileSlot(combined=cert, key_type=kind) if key == cert else FileSlot(cert=cert, key=key, key_type=kind)


def _protocols(every: dict[str, str]) -> list[str]:
    """2.3: ``protocols = imap pop3``; 2.4: ``protocols { imap = yes }``."""
    if "protocols" in every:
        return every["protocols"].split()
    return [k.split("/", 1)[1] for k, v in every.items() if k.startswith("protocols/") and v == "yes"]


def _listeners(config_file: str, every: dict[str, str], blocks: set[str],
               is24: bool) -> list[tuple[str, FoundListener]]:
    """(protocol, listener) for every TLS listener of the protocols served."""
    wanted = []
    for proto in _protocols(every):
        if proto not in LOGIN_SERVICES:
            continue
        service = LOGIN_SERVICES[proto][0]
        names = sorted({b.split("/")[3] for b in blocks if b.startswith(f"service/{service}/inet_listener/")
                        and b.count("/") == 3})
        wanted += [(proto, service, n) for n in names]
    if is24 and wanted:  # 2.4's -a lists the listeners, not their settings: ask for each (defaults count)
        keys = [f"service/{s}/inet_listener/{n}/{k}" for _, s, n in wanted for k in ("port", "ssl", "listen")]
        values, _ = flatten(_doveconf(config_file, *keys))
    else:
        values = every
    address_key = "listen" if is24 else "address"
    out = []
    for proto, service, name in wanted:
        base = f"service/{service}/inet_listener/{name}/"
        port = values.get(base + "port", "0")
        if not port.isdigit() or int(port) == 0:
            continue
        implicit = values.get(base + "ssl", "").lower() == "yes"
        address = values.get(base + address_key) or every.get("listen", "*")
        first = address.replace(",", " ").split()
        out.append((proto, FoundListener(loopback_for(first[0] if first else "*"), int(port),
                                         LOGIN_SERVICES[proto][2 if implicit else 1], f"{service} {name}")))
    return out


DAEMON = CommandDaemon(
    name="dovecot",
    defaults={
        "cert_path": "/etc/dovecot/certs/cert.pem",
        "key_path": "/etc/dovecot/certs/key.pem",
        "chain_path": "",
        "reload_command": "doveadm reload",
        "validate_command": "doveconf -n",
    },
    reader=discover,
    default_instance=DEFAULT_CONFIG_FILE,
    listeners=(
        UsualListener(143, "imap", "imap"),
        UsualListener(993, "imaps", "imaps"),
        UsualListener(110, "pop3", "pop3"),
        UsualListener(995, "pop3s", "pop3s"),
    ),
)

"""The daemon's own configuration as the truth: a targets file proposed from it
(``mailtls discover``), and a targets file checked against it (``check-config``, the
worker at start).

A deploy into a file the daemon does not read is "deployed" on disk and changes
nothing on the wire; a TLS file the daemon reads that no target covers keeps its old
certificate through every renewal. Both are found here by asking the instance that a
target names (``instance``; the default one when empty) what it serves.
"""

from __future__ import annotations

import os
import re
from typing import Any

from .. import daemons
from ..daemons.found import FileSet, Found
from ..errors import ConfigError
from .config import HostConfig, Target


def read(mode: str, instance: str | None) -> list[Found]:
    """What the daemon of ``mode`` serves, for the instance named (None: the system's
    own, and for Postfix every postmulti instance it lists)."""
    return daemons.get(mode).discover(instance)


# -------------------------------------------------------------------- proposing
def propose(found: list[Found]) -> dict[str, dict[str, Any]]:
    """A target per daemon instance per distinct file set, each with its mode,
    instance, commands and every TLS listener as a verify endpoint. A set no target
    can take (``FileSet.unproposable``) is left out; ``render`` says why."""
    out: dict[str, dict[str, Any]] = {}
    for f in found:
        slug = _slug(f.instance)
        base = f.mode if f.default_instance else slug if slug.startswith(f.mode) else f"{f.mode}-{slug}"
        for i, served in enumerate(f.served):
            if served.files.unproposable():
                continue
            name = base if i == 0 else f"{base}-{served.listeners[0].port if served.listeners else i + 1}"
            while name in out:
                name += "-2"
            body: dict[str, Any] = {"mode": f.mode, "instance": f.instance, **_layout(served.files),
                                    **_commands(f)}
            if served.listeners:
                body["post_deploy_verify"] = {"enabled": True, "endpoints": [
                    {"endpoint": li.endpoint, "protocol": li.protocol} for li in served.listeners]}
            default = next((s for s in f.sni_served if s.files == served.files), None)
            if default is not None:  # the default certificate, with entries of its own in the table
                body["names"] = default.names
                body["sni"] = {**({"map": default.table} if default.table else {}), "default": True}
            out[name] = body
        listeners = list({li.endpoint: li for s in f.served for li in s.listeners}.values())
        for sni in f.sni_served:
            if sni.files.unproposable() or any(s.files == sni.files for s in f.served):
                continue
            name = f"{base}-{_name_slug(sni.names[0])}"
            while name in out:
                name += "-2"
            body = {"mode": f.mode, "instance": f.instance, **_layout(sni.files), "names": sni.names,
                    "sni": {"map": sni.table} if sni.table else {},
                    **_commands(f)}
            if listeners:  # every listener, each probed with each of the names as SNI
                body["post_deploy_verify"] = {"enabled": True, "endpoints": [
                    {"endpoint": li.endpoint, "protocol": li.protocol} for li in listeners]}
            out[name] = body
    return out


def _commands(f: Found) -> dict[str, str]:
    """The instance's commands; an empty reload_command (Exim: SIGHUP) is left out, its pid file named."""
    out = {"reload_command": f.reload_command} if f.reload_command else {}
    out["validate_command"] = f.validate_command
    if f.pid_file:
        out["pid_file"] = f.pid_file
    return out


def _name_slug(name: str) -> str:
    """``*.example.net`` -> ``wildcard.example.net``: a target name from an SNI name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name.replace("*", "wildcard"))[:60]


def _slug(instance: str) -> str:
    """``/etc/postfix-out`` -> ``postfix-out``; ``/etc/dovecot/dovecot-imap.conf`` -> ``dovecot-imap``."""
    stem = os.path.splitext(os.path.basename(instance.rstrip("/")))[0] or "instance"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", stem)[:40] or "instance"


def _layout(files: FileSet) -> dict[str, Any]:
    def slot(s: Any) -> dict[str, Any]:
        d: dict[str, Any] = {"combined_path": s.combined} if s.combined else {"cert_path": s.cert,
                                                                             "key_path": s.key}
        if s.chain:
            d["chain_path"] = s.chain
        return d

    first = files.slots[0]
    body = slot(first)
    if len(files.slots) > 1:  # one RSA and one ECDSA: propose() takes no other pair
        second = files.slots[1]
        body["key_type"] = first.key_type
        body["alt"] = {**slot(second), "key_type": second.key_type}
    return body


def render(found: list[Found], host: str, *, header: list[str] | None = None) -> str:
    """The proposed targets file, TOML, with what was found and what was not as comments."""
    import tomli_w

    lines = [f"# {line}" if line else "#" for line in header or []]
    for f in found:
        if f.error:
            lines.append(f"# {f.mode} {f.instance}: not read: {f.error}")
            continue
        lines.append(f"# {f.mode} {f.version} {'(the default instance) ' if f.default_instance else ''}"
                     f"{f.instance}: {len(f.served)} set(s) of TLS files")
        for s in f.served:
            lines.append(f"#   {', '.join(s.files.paths())} on "
                         f"{', '.join(f'{li.endpoint} ({li.protocol})' for li in s.listeners) or 'no listener'}"
                         f" ({s.source})")
            why = s.files.unproposable()
            if why:
                lines.append(f"#   note: {s.source}: {why}: not proposed")
        for sni_set in f.sni_served:
            lines.append(f"#   by SNI, for {', '.join(sni_set.names)}: {', '.join(sni_set.files.paths())} "
                         f"({sni_set.source})")
            why = sni_set.files.unproposable()
            if why:
                lines.append(f"#   note: {sni_set.source}: {why}: not proposed")
        for sni in f.sni:
            lines.append(f"#   for some connections only, not proposed (a per-address block, or a table not "
                         f"read): {sni}")
        for note in f.notes:
            lines.append(f"#   note: {note}")
    body: dict[str, Any] = {"host": host, "targets": propose(found)}
    return "\n".join(lines) + ("\n\n" if lines else "") + tomli_w.dumps(body)


# --------------------------------------------------------------------- checking
def _real(path: str) -> str:
    return os.path.realpath(path)


def cross_check(cfg: HostConfig) -> list[str]:
    """For every daemon instance the targets name: a target whose files it does not
    read, and a TLS file it reads that no target covers. Warnings, each naming both
    paths; an instance that cannot be asked (its tool missing, its config broken) is
    a warning too. An empty ``instance`` and the default one spelled out are the same."""
    groups: dict[tuple[str, str], list[Target]] = {}
    for t in cfg.targets.values():
        groups.setdefault((t.mode, _real(t.instance or t.daemon.default_instance)), []).append(t)
    warnings: list[str] = []
    for (mode, instance), targets in sorted(groups.items()):
        default = instance == _real(daemons.get(mode).default_instance)
        where = f"{mode} instance {instance}"
        try:
            found = [f for f in read(mode, None if default else instance)
                     if (f.default_instance if default else _real(f.instance) == instance)]
        except ConfigError as err:
            warnings.append(f"cannot ask {where} what it serves: {err}")
            continue
        if not found:
            warnings.append(f"{where}: found no such instance")
            continue
        f = found[0]
        if f.error:
            warnings.append(f"cannot ask {where} what it serves: {f.error}")
            continue
        served = {_real(p) for s in f.served for p in s.files.paths()}
        read_there = served | {_real(p) for p in f.conditional}
        covered: set[str] = set()
        for t in targets:
            mine = list(t.files())
            covered |= {_real(p) for _, p in mine}
            unread = [path for role, path in mine if _real(path) not in read_there and not role.endswith("chain")]
            if unread:
                serving = ", ".join(sorted({p for s in f.served for p in s.files.paths()})) or "no TLS file"
                if f.undecided:
                    warnings.append(f"target {t.name!r}: which files {where} serves cannot be read from its "
                                    f"configuration: {f.undecided}; only a deploy's verify on the wire can tell")
                    continue
                warnings.append(f"target {t.name!r}: {where} does not read {', '.join(unread)}; it serves "
                                f"{serving}: a deploy there would change nothing on the wire")
        for sni in f.sni_served:
            if not any(_real(p) in covered for p in sni.files.paths()):
                warnings.append(f"{where} serves {', '.join(sni.files.paths())} by SNI for {', '.join(sni.names)} "
                                f"({sni.source}), which no target covers: it keeps its certificate through every "
                                "renewal (`mailtls discover` proposes a target for it)")
        for s in f.served:
            missing = [p for p in s.files.paths() if _real(p) not in covered]
            if missing:
                on = ", ".join(li.endpoint for li in s.listeners) or "no listener"
                warnings.append(f"{where} serves {', '.join(missing)} on {on}, which no target covers: it keeps "
                                "its certificate through every renewal (`mailtls discover` proposes a target for "
                                "it)")
    return warnings

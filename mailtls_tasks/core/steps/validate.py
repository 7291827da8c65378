"""Step 2, validate: the staged files load into OpenSSL as the daemon will load them
and a local handshake with them serves the new leaf (and, for a daemon whose TLS
library is another -- Exim's GnuTLS -- they load into that one too); then the daemon's
own config test (the target's ``validate_command``). Failure ends the deploy ``rejected``.
"""

from __future__ import annotations

import contextlib
import os
import ssl

from ...commands import CommandResult, Running
from ...daemons import postfix_sni
from ...errors import ConfigError, Rejected, StepFailed, ValidationFailed
from .. import files, material, sni
from ..config import Target
from ..journal import DeployRecord, StepRecord
from .context import StepContext
from .phases import ORDER, finish, past, remove_temps, timed

# An early-started validate_command (``StepContext.early_validate``) stands for the
# validate step only if that step begins within this many seconds of its start: after
# a long wait for the target's lock, the config is checked afresh.
EARLY_VALIDATE_MAX_AGE = 10.0


def validate(ctx: StepContext, deploy_id: str) -> DeployRecord:
    """Load the staged pair as OpenSSL will and shake hands with it; then the
    operator's validate_command. Failure ends the deploy ``rejected``, live untouched."""
    rec = ctx.load(deploy_id)
    if past(rec, "validated"):
        return rec
    if ORDER[rec.phase] < ORDER["staged"]:  # a stage that died half-way: its files are not all named yet
        raise StepFailed(f"deploy {deploy_id} cannot validate from phase {rec.phase!r}")
    with timed(ctx, rec, "validate"):
        try:
            if ctx.batch is None or rec.target not in ctx.batch.checked:  # check_staged did, for a batch
                _local_handshake(ctx, rec)
            _check_table(ctx, rec)
            if ctx.target.validate_command.strip():
                res = _validate_command(ctx)
                if not res.ok:
                    raise ValidationFailed(f"validate_command failed: {res.summary()}")
            reload_ready(ctx.target)
        except Rejected as err:
            remove_temps(rec)
            rec.steps["validate"] = StepRecord(status="failed", detail=str(err))
            finish(ctx, rec, "rejected", str(err))
            raise
        rec.phase = "validated"
    return rec


def _validate_command(ctx: StepContext) -> CommandResult:
    t = ctx.target
    if ctx.batch is None:
        return _verdict(t, ctx.early_validate)
    known = ctx.batch.verdicts.get(t.validate_command)  # once for every member of the batch that names it
    if known is None:
        known = ctx.batch.verdicts[t.validate_command] = _verdict(t, ctx.batch.early.pop(t.validate_command, None))
    return known


def _verdict(t: Target, early: Running | None) -> CommandResult:
    """The validate_command's verdict: the early run's, when it is this command and
    started recently enough; else (killing a stale early run) a run now."""
    if early is not None and not early.done:
        if early.command == t.validate_command and early.age() <= EARLY_VALIDATE_MAX_AGE:
            return early.wait(t.command_timeout)
        early.cancel()
    return t.daemon.config_test(t.validate_command, timeout=t.command_timeout)


def check_staged(ctx: StepContext, rec: DeployRecord) -> None:
    """A batch's own check of one member, before its table is built: a member whose
    files do not load is rejected alone (its record finished), the others go on."""
    try:
        _local_handshake(ctx, rec)
    except Rejected as err:
        remove_temps(rec)
        rec.steps["validate"] = StepRecord(status="failed", detail=str(err))
        finish(ctx, rec, "rejected", str(err))
        raise
    assert ctx.batch is not None
    ctx.batch.checked.add(rec.target)  # validate need not shake hands with the same files again


def _local_handshake(ctx: StepContext, rec: DeployRecord) -> None:
    """Each certificate slot's staged files load into OpenSSL as the daemon will load
    them, and a handshake with them serves that slot's new leaf."""
    by_role = {e.role: (e.real if rec.files_already_live else e.temp) for e in rec.files}
    pairs = []
    for prefix, kind, *_ in ctx.target.slots():
        expected = rec.leaves.get(kind, rec.fingerprint)
        made = None
        if prefix + "combined" in by_role:  # key, leaf and chain in one file: as Postfix reads it
            certfile = keyfile = by_role[prefix + "combined"]
        else:
            certfile, keyfile = by_role[prefix + "cert"], by_role[prefix + "key"]
            if prefix + "chain" in by_role:  # the daemon is given the chain separately; OpenSSL wants one file
                cert_bytes = files.read_bytes(certfile) or b""
                chain_bytes = files.read_bytes(by_role[prefix + "chain"]) or b""
                made = os.path.join(ctx.journal.deploy_dir(rec.target, rec.deploy_id), f"handshake-{kind}.pem")
                files.write_scratch(made, cert_bytes + chain_bytes)
                certfile = made
        try:
            what = f"the staged {kind if kind != 'any' else ''} cert/key".replace("  ", " ")
            if handshake_with(certfile, keyfile, what) != expected:
                raise ValidationFailed("a local handshake with the staged files served another certificate")
        finally:
            if made:
                with contextlib.suppress(OSError):
                    os.unlink(made)
        if not made:  # a daemon that reads a chain file of its own is an OpenSSL one
            pairs.append((certfile, keyfile))
    daemon_check(ctx.target, pairs)


def reload_ready(t: Target) -> None:
    """The reload can reach the daemon (Exim: its pid file names a running Exim
    daemon): found out now, with nothing committed, not after the files are live."""
    why = t.daemon.reload_ready(t.reload_command, t.pid_file)
    if why:
        raise ValidationFailed(why)


def daemon_check(t: Target, pairs: list[tuple[str, str]]) -> None:
    """The staged (certificate, key) files as the daemon's own TLS library loads them,
    where that is not OpenSSL (``Daemon.check_files``: Exim's GnuTLS)."""
    why = t.daemon.check_files(pairs, timeout=t.command_timeout)
    if why:
        raise ValidationFailed(why)


def handshake_with(certfile: str, keyfile: str | None, what: str) -> str:
    """Load the files into OpenSSL as a server, shake hands in memory: the leaf served
    (validate's check of the staged files; check mode's of its copies)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        server.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as err:
        raise ValidationFailed(f"{what} do not load into OpenSSL: {err}") from None
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return _memory_handshake(client, server)


def _check_table(ctx: StepContext, rec: DeployRecord) -> None:
    """The SNI table built at stage serves, for each of the target's names, the new
    pair (looked up as smtpd does: the name, then its parent domains); and for every
    other name exactly what the live table serves it now."""
    built = next((e for e in rec.files if e.role == sni.MAP_ROLE), None)
    if built is None:
        return
    t = ctx.target
    p = sni.plan(t, ctx.tables_read)
    assert p is not None
    # a batch's table is built with every member of it in that table: each is "ours"
    members = [(t, rec)]
    for name in (ctx.batch.tables.get(t.name, ()) if ctx.batch is not None else ()):
        other = ctx.journal.load(name, rec.member_id(name))
        if name != t.name and other is not None:
            members.append((ctx.batch.targets[name], other))  # type: ignore[union-attr]
    ours = set().union(*(sni.keys_of(m, p) for m, _ in members))
    try:
        new = postfix_sni.dump(p.table, built.scratch[0], p.config_dir, t.command_timeout)
        old = postfix_sni.dump(p.table, p.table.source, p.config_dir, t.command_timeout) if built.existed else None
    except ConfigError as err:
        raise ValidationFailed(f"sni.map: {err}") from None
    scratch = os.path.join(ctx.journal.deploy_dir(rec.target, rec.deploy_id), "handshake-sni.pem")
    try:
        for member, member_rec in members:
            want = set(member_rec.leaves.values())
            mine = sni.keys_of(member, p)
            for name in member.sni_probe_names():
                key = next((k for k in postfix_sni.lookup_keys(name) if k in new), None)
                if key not in mine:
                    raise ValidationFailed(f"sni.map: the table built for {name} gives it "
                                           f"{'no entry' if key is None else 'the entry ' + key + ', not its target'}")
                served = set()
                for group in material.key_chains(new[key]):
                    files.write_scratch(scratch, group)
                    served.add(handshake_with(scratch, None, f"the table built for {name}: its files"))
                if served != want:
                    raise ValidationFailed(f"sni.map: a local handshake with the table built for {name} served "
                                           "another certificate than the staged one")
    finally:
        with contextlib.suppress(OSError):
            os.unlink(scratch)
    if old is not None:
        changed = sorted(k for k in set(new) | set(old) if k not in ours and new.get(k) != old.get(k))
        if changed:
            shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            raise ValidationFailed(
                f"sni.map: built from {p.table.source} and the files it names, the table would change what "
                f"{len(changed)} other name(s) are served ({shown}): the live {p.table.compiled} is older than "
                "its source or those files. Rebuild it (postmap -F) once those files are right, or deploy their "
                "targets; nothing was changed")


def _memory_handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> str:
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    s = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    c_done = s_done = False
    for _ in range(20):
        for obj, is_client in ((c, True), (s, False)):
            if (c_done if is_client else s_done):
                continue
            try:
                obj.do_handshake()
                if is_client:
                    c_done = True
                else:
                    s_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as err:
                raise ValidationFailed(f"local TLS handshake with the staged files failed: {err}") from None
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        if c_done and s_done:
            break
    if not c_done:
        raise ValidationFailed("local TLS handshake with the staged files did not complete")
    der = c.getpeercert(binary_form=True)
    if not der:
        raise ValidationFailed("local TLS handshake presented no certificate")
    return material.fingerprint_der(der)

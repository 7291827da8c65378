"""Step 1, stage: claim the files, check the material, back up the live files and
write the new ones as temps beside them. Ends the deploy ``unchanged`` (the bytes
are live and served) or ``rejected`` (bad material, a stale fence, a target sharing
the files that the new set would break); nothing live is touched either way.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import grp
import os

from ...errors import ConfigError, MaterialError, Rejected, Superseded, TargetBusy
from ...ids import check_deploy_id
from .. import files, material, probe, sni
from ..config import Target
from ..journal import DeployRecord, FileEntry, Origin, StepRecord
from ..material import Bundle
from ..names import leaf_names, uncovered
from .context import StepContext, target_reals
from .phases import already_staged, finish, remove_temps, skip, temp_for, timed
from .served import default_served, served_now

RawBundle = tuple[bytes, bytes, bytes | None]


def stage(ctx: StepContext, deploy_id: str, cert_pem: bytes, key_pem: bytes,
          chain_pem: bytes | None = None, *, force: bool = False, fence: int | None = None,
          origin: Origin = "local", now: dt.datetime | None = None,
          also: list[RawBundle] | None = None) -> DeployRecord:
    """Claim the files, check the material, back up the live files, write the new
    ones as temps.

    Ends the deploy as ``unchanged`` when the bytes are already live (and, with
    verify on, already served), or ``rejected`` when the material is bad or the
    deploy is superseded. The caller holds the target's file locks and has made sure
    no other live deploy owns them (``ownership.holding``).
    """
    t = ctx.target
    rec = ctx.journal.load(t.name, check_deploy_id(deploy_id))
    if already_staged(rec):
        return rec
    rerun = rec is not None
    if rec is not None:  # a previous attempt died mid-stage: nothing live was touched
        remove_temps(rec)
    else:
        ctx.journal.write_intent(t.name, deploy_id, origin)
    reals = target_reals(t, table=ctx.batch is None)  # a batch's table: claimed by the member that carries it
    for real in reals:
        owner = ctx.journal.owner_of(real)
        if owner is not None and (owner.target, owner.deploy_id) != (t.name, deploy_id):
            other = ctx.journal.load(owner.target, owner.deploy_id)
            if other is not None and not other.finished:
                raise TargetBusy(f"{real} is owned by deploy {owner.deploy_id} of target {owner.target!r}")
    rec = DeployRecord(deploy_id=deploy_id, target=t.name, host=ctx.host, fence=fence, origin=origin,
                       claimed=reals, input_sha256=material.input_digest([cert_pem, *(c for c, _, _ in also or [])]),
                       batch=list(ctx.batch.members) if ctx.batch is not None else [],
                       batch_ids=dict(ctx.batch.ids) if ctx.batch is not None else {},
                       batch_id=ctx.batch.batch_id if ctx.batch is not None else None)
    # Claim before the record exists: an owner entry without a record is stale and
    # cleared, a record without its owner entries would be invisible to recovery.
    for real in reals:
        ctx.journal.set_owner(real, rec)
    with timed(ctx, rec, "stage"):
        try:
            if fence is not None:
                _check_fence(ctx, fence, rec, rerun=rerun)
            _stage(ctx, rec, [(cert_pem, key_pem, chain_pem), *(also or [])], force=force, now=now)
        except Rejected as err:  # Superseded included
            remove_temps(rec)
            rec.steps["stage"] = StepRecord(status="failed", detail=str(err))
            finish(ctx, rec, "rejected", str(err), err.reason)
            raise
    return rec


def tombstone(ctx: StepContext, deploy_id: str, origin: Origin) -> DeployRecord:
    """End a deploy that died before its first record was saved: nothing was touched.
    A late stage message for it then finds it ended instead of starting it."""
    rec = DeployRecord(deploy_id=deploy_id, target=ctx.target.name, host=ctx.host, origin=origin)
    rec.steps["stage"] = StepRecord(status="failed", detail="interrupted before it was staged")
    return finish(ctx, rec, "rolled_back", "the deploy was interrupted before it was staged; nothing was touched",
                   "interrupted")


def _check_fence(ctx: StepContext, fence: int, rec: DeployRecord, *, rerun: bool) -> None:
    """A stale, replayed or overtaken envelope must not overwrite a newer deploy.

    Strictly greater than the highest fence staged on any of its files; equal only
    for the very deploy that recorded it when its record is still here in ``staging``
    (its stage died and runs again). The fence is recorded after the record is first
    saved, so "fence recorded, no record" means the record was pruned: a replay."""
    highest, by = ctx.journal.fence_state(rec.reals, ctx.target.name)
    if fence < highest or (fence == highest and not (by == rec.deploy_id and rerun)):
        raise Superseded(f"superseded: a deploy with fence {highest} already ran on these files "
                         f"({ctx.target.name!r} or a target sharing them); this one has fence {fence}")
    ctx.journal.record_fence(rec.reals, fence, rec.deploy_id)


def _slot_bundles(t: Target, raw: list[RawBundle], now: dt.datetime | None) -> list[tuple[str, str, Bundle]]:
    """(role prefix, key type, checked bundle) for each of the target's certificate slots."""
    slots = t.slots()
    bundles = [material.build_bundle(c, k, ch, now=now) for c, k, ch in raw]
    kinds = [b.key_type for b in bundles]
    wanted = [k for _, k, *_ in slots]
    if len(bundles) != len(slots) or (len(slots) > 1 and sorted(kinds) != sorted(wanted)):
        need = " and ".join(k.upper() for k in wanted) if len(slots) > 1 else "one"
        raise MaterialError(f"cert: target {t.name!r} takes {need} certificate{'s' if len(slots) > 1 else ''}; "
                            f"got {len(bundles)} ({', '.join(k.upper() for k in kinds)})")
    out: list[tuple[str, str, Bundle]] = []
    for prefix, kind, *_ in slots:
        bundle = next(b for b in bundles if kind in ("any", b.key_type)) if len(slots) > 1 else bundles[0]
        if kind != "any" and bundle.key_type != kind:
            raise MaterialError(f"cert: target {t.name!r} takes an {kind.upper()} certificate; got "
                                f"{bundle.key_type.upper()}")
        out.append((prefix, kind, bundle))
    return out


def judge_slots(t: Target, raw: list[RawBundle],
                now: dt.datetime | None) -> tuple[list[tuple[str, str, Bundle]], dict[str, bytes]]:
    """The material checks of a deploy, touching nothing: each slot's bundle (key,
    chain, validity, strength), its chain_path, the target's names, the trust path;
    and the exact bytes of every file. Stage and check mode (``core.check``) both."""
    slots = _slot_bundles(t, raw, now)
    wanted: dict[str, bytes] = {}
    for (prefix, kind, bundle), (_, _, _, _, chain_path, combined) in zip(slots, t.slots(), strict=True):
        what = f"{kind.upper()} certificate" if kind != "any" else "certificate"
        if chain_path and not bundle.chain and not bundle.self_signed:
            raise MaterialError(f"chain: target {t.name!r} has a chain_path for its {what} but the bundle carries no "
                                "chain (clients such as Thunderbird need it)")
        missing = uncovered(t.names, bundle.leaf)
        if missing:
            raise MaterialError(f"names: the {what} does not cover {', '.join(missing)}, which target {t.name!r} "
                                f"must serve (it covers: {', '.join(leaf_names(bundle.leaf)) or 'no DNS name'})")
        material.check_path(bundle, t.trust_anchors, allow_self_signed=t.allow_self_signed, names=t.names, now=now)
        wanted.update(bundle.file_bytes(chain_path_set=bool(chain_path), combined=bool(combined), prefix=prefix))
    return slots, wanted


def _stage(ctx: StepContext, rec: DeployRecord, raw: list[RawBundle], *, force: bool,
           now: dt.datetime | None) -> None:
    t = ctx.target
    slots, wanted = judge_slots(t, raw, now)
    for _, kind, bundle in slots:
        rec.leaves[kind] = bundle.fingerprint
        rec.chains[kind] = bundle.chain_fingerprints()
    primary = slots[0][2]
    rec.fingerprint = primary.fingerprint
    rec.not_after = min(b.leaf.not_valid_after_utc for _, _, b in slots).isoformat()

    current: dict[str, tuple[files.FileState, bytes | None]] = {}
    for role, path in t.files():
        current[role] = files.inspect(files.real_path(path))
    old_spkis: dict[str, str | None] = {}
    for (prefix, kind, bundle), (_, _, _, _, _, combined) in zip(slots, t.slots(), strict=True):
        leaf_data = current[prefix + ("combined" if combined else "cert")][1]
        old_leaf = material.leaf_of_file(leaf_data) if leaf_data else None
        if old_leaf is not None:
            rec.previous_leaves[kind] = material.fingerprint(old_leaf)
        old_spkis[kind] = material.spki_sha256(old_leaf.public_key()) if old_leaf is not None else None
        material.check_not_older(bundle.leaf, old_leaf, force)
    rec.previous_fingerprint = rec.previous_leaves.get(slots[0][1])
    if t.dane is not None:
        from .. import dane

        changed = [b for _, kind, b in slots if old_spkis.get(kind) != b.spki_sha256()]
        if changed:
            dane.require_ready(t, ctx.journal, [b.spki_sha256() for b in changed])

    uid_cfg, gid_cfg = files.resolve_owner(t.owner, t.group)
    entries = []
    for role, path in t.files():
        st, _ = current[role]
        entries.append(FileEntry(
            role=role, path=path, real=st.path, temp=temp_for(st.path, rec.deploy_id),
            new_sha256=material.sha256(wanted[role]), new_mode=new_mode(t, role, st, rec),
            new_uid=uid_cfg if uid_cfg is not None else st.uid,
            new_gid=new_gid(t, role, st, gid_cfg),
            existed=st.exists, old_sha256=st.sha256, old_mode=st.mode, old_uid=st.uid, old_gid=st.gid,
        ))
    plan = sni.plan(t, ctx.tables_read) if t.sni is not None else None
    # a key file found readable by others is written again (same bytes, 0600): not "live"
    files_live = all(e.existed and e.old_sha256 == e.new_sha256 and e.old_mode == e.new_mode
                     and e.old_uid == e.new_uid and e.old_gid == e.new_gid for e in entries)
    # An indexed SNI table holds the files' bytes: it is built again unless it already
    # holds, for each of the target's entries, exactly the files' bytes (live ones).
    rebuild = (ctx.batch is None and plan is not None and plan.table.indexed
               and not (files_live and sni.holds_live(plan)))  # a batch builds its tables itself
    rec.files = entries

    if files_live and not rebuild:
        rec.files_already_live = True
        if not t.verify_endpoints():
            _finish_unchanged(ctx, rec, "bytes already live; verify is off")
            return
        served = served_now(t, rec.leaves)
        rec.served_fingerprint = served.get(slots[0][1])
        if all(served.get(kind) == fp for kind, fp in rec.leaves.items()):
            _finish_unchanged(ctx, rec, "bytes already live and served")
            return
        # Same bytes on disk, another leaf served (e.g. a second daemon sharing the
        # file was never reloaded): nothing to write, but reload and verify anyway.
        rec.phase = "staged"
        return

    _check_sharing(ctx, slots, entries, wanted, old_spkis, now)
    if rebuild:
        assert plan is not None
        key_entry = next(e for e in entries if e.role in ("key", "combined"))
        table = sni.map_entry(plan, rec.deploy_id, key_entry)
        current[table.role] = files.inspect(table.real)
        rec.files = entries = [*entries, table]
    for li in t.default_listeners():  # what a deploy of an SNI name must not change
        with contextlib.suppress(probe.ProbeError):
            rec.default_served[li.endpoint] = default_served(ctx, li)
    ctx.save(rec)  # temps named in the journal before they exist: recovery can find them
    for e in entries:
        if e.existed:
            data = current[e.role][1]
            assert data is not None
            ctx.journal.write_backup(t.name, rec.deploy_id, e.role, data)
    for e in entries:
        if e.role == sni.MAP_ROLE:
            continue  # built below, from the staged files
        os.makedirs(os.path.dirname(e.real), mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(e.temp)  # our own name, left by an attempt that died
        try:
            files.write_new(e.temp, wanted[e.role], e.new_mode, e.new_uid, e.new_gid)
        except OSError as err:
            remove_temps(rec)
            raise Rejected(f"{e.role}: cannot stage next to {e.real}: {err.strerror or err}") from None
    if rebuild:
        assert plan is not None
        table = entries[-1]
        try:
            table.new_sha256 = sni.build_beside(plan, table, {e.real: e.temp for e in entries[:-1]},
                                                t.command_timeout)
        except (ConfigError, OSError) as err:
            remove_temps(rec)
            why = err if isinstance(err, ConfigError) else (err.strerror or err)
            raise Rejected(f"sni.map: cannot build the table beside {table.real}: {why}") from None
    rec.phase = "staged"


def new_mode(t: Target, role: str, st: files.FileState, rec: DeployRecord) -> int:
    """The mode a file is written with. One rule for every file that holds a private
    key (a key file, or a combined key + chain file): ``key_mode`` when set (it cannot
    let others read, nor the group write); else the mode the file has, unless that lets
    others read or the group write it -- then 0600, said so in the deploy's notes; a
    new file 0600. Certificate files: ``cert_mode``, else kept, else 0644.

    The one exception: a daemon that reads its key as a group of its own after giving
    up root (Debian's Exim, ``Debian-exim``) gets 0640 with that group where 0600 would
    be written -- where this host has the group and the target names none (``key_gid``);
    0600 root would be a key the daemon cannot read."""
    if not role.endswith(("key", "combined")):
        return t.cert_mode if t.cert_mode is not None else (st.mode if st.exists and st.mode is not None else 0o644)
    if t.key_mode is not None:
        return t.key_mode
    gid = key_gid(t)
    fresh = 0o600 if gid is None else 0o640
    if not st.exists or st.mode is None:
        return fresh
    if st.mode & 0o027:
        how = "0600" if gid is None else f"0640 with group {t.daemon.key_group}, which {t.mode} reads its key as"
        _note(rec, f"{st.path} holds a private key and was mode {st.mode:04o} (readable by others or "
                   f"writable by its group): written {how} (set key_mode, e.g. \"0640\" with a group, to choose)")
        return fresh
    return st.mode


def key_gid(t: Target) -> int | None:
    """The gid of the group ``t``'s daemon reads its key as (``Daemon.key_group``), when
    the target names no group of its own and this host has that group; else None."""
    if t.group is not None or not t.daemon.key_group:
        return None
    try:
        return grp.getgrnam(t.daemon.key_group).gr_gid
    except KeyError:
        return None


def new_gid(t: Target, role: str, st: files.FileState, configured: int | None) -> int | None:
    """The group a file is written with: the target's ``group``; else, for a key file
    written 0640 for its daemon's group (``new_mode``), that group; else the file's own."""
    if configured is not None:
        return configured
    gid = key_gid(t)
    if gid is not None and role.endswith(("key", "combined")) and (
            not st.exists or st.mode is None or st.mode & 0o027):
        return gid
    return st.gid


def _note(rec: DeployRecord, note: str) -> None:
    if note not in rec.notes:  # a stage run again after a crash says it once
        rec.notes.append(note)


def _check_sharing(ctx: StepContext, slots: list[tuple[str, str, Bundle]], entries: list[FileEntry],
                   wanted: dict[str, bytes], old_spkis: dict[str, str | None], now: dt.datetime | None) -> None:
    """What this deploy writes, judged for the host's other targets that read any of it.

    One that will serve the new leaf (it reads the certificate file) must accept it as
    it would its own: key type, names, trust anchors, DANE readiness. One that shares
    only part of a certificate's files (the key, each with a certificate of its own;
    or the certificate, one of them with a chain file) must not be left with files its
    daemon cannot serve: a key that is not its certificate's, a chain that did not issue
    it, its chain taken away. Only what this deploy would break counts; what was wrong
    before is not ours to judge. ``old_spkis``: by our slot's key type, the key of the
    leaf in place, as stage read it."""
    after = {e.real: wanted[e.role] for e in entries}
    ours: dict[str, dict[str, str]] = {}  # our slot prefix -> role -> real file
    slot_of: dict[str, str] = {}  # real file -> the prefix of our slot that writes it
    for e in entries:
        prefix = "alt_" if e.role.startswith("alt_") else ""
        ours.setdefault(prefix, {})[e.role.removeprefix(prefix)] = e.real
        slot_of[e.real] = prefix
    bundles = {prefix: bundle for prefix, _, bundle in slots}
    kinds = {prefix: kind for prefix, kind, _ in slots}
    for other in ctx.sharing:
        for _, kind, cert, key, chain, combined in other.slots():
            paths = {"combined": combined} if combined else {"cert": cert, "key": key,
                                                              **({"chain": chain} if chain else {})}
            reals = {role: files.real_path(path) for role, path in paths.items()}
            touched = [role for role, real in reals.items() if real in after]
            if not touched:
                continue
            where = (f"shared files: target {other.name!r} also reads "
                     f"{', '.join(sorted(paths[r] for r in touched))}")
            bundle = bundles[slot_of[reals[touched[0]]]]
            leaf_real = reals.get("combined") or reals["cert"]
            if leaf_real in after:  # it will serve our leaf, in place of the one in that file now
                ours_at = slot_of[leaf_real]
                _judge_for(ctx, other, kind, bundles[ours_at], old_spkis.get(kinds[ours_at]), where, now)
            if combined or reals in ours.values():  # the very files of one of our slots, laid out alike
                continue
            try:
                before = {role: files.read_bytes(real) for role, real in reals.items()}
            except OSError as err:
                raise Rejected(f"{where}, and {err.filename or 'one of its files'} cannot be read to check that "
                               f"it stays whole: {err.strerror or err}") from None
            if any(b is None for b in before.values()):
                continue  # not all in place: nothing of its is live to break
            was = {role: b or b"" for role, b in before.items()}
            will = {role: after.get(reals[role], was[role]) for role in reals}
            broken = (material.set_problems(will["cert"], will["key"], will.get("chain"))
                      - material.set_problems(was["cert"], was["key"], was.get("chain")))
            if not bundle.chain:  # a leaf that needs no chain leaves none to take away
                broken.discard(material.NO_CHAIN)
            if broken:
                raise MaterialError(f"{where}; this deploy would leave it with {' and '.join(sorted(broken))}. "
                                    f"Deploy the same certificate to both, or give {other.name!r} files of its own")


def _judge_for(ctx: StepContext, other: Target, kind: str, bundle: Bundle, old_spki: str | None, where: str,
               now: dt.datetime | None) -> None:
    """The checks stage makes of a bundle for its own target, made for ``other``
    (``old_spki``: the key of the leaf it serves now, None if there is none)."""
    try:
        if kind != "any" and bundle.key_type != kind:
            raise MaterialError(f"it takes an {kind.upper()} certificate there, this one is "
                                f"{bundle.key_type.upper()}")
        missing = uncovered(other.names, bundle.leaf)
        if missing:
            raise MaterialError(f"the certificate does not cover {', '.join(missing)}, which it must serve")
        material.check_path(bundle, other.trust_anchors, allow_self_signed=other.allow_self_signed,
                            names=other.names, now=now)
        if other.dane is not None:
            from .. import dane

            if old_spki != bundle.spki_sha256():
                dane.require_ready(other, ctx.journal, [bundle.spki_sha256()])
    except Rejected as err:
        raised = type(err)(f"{where}: {err}")
        raised.reason = err.reason
        raise raised from None


def _finish_unchanged(ctx: StepContext, rec: DeployRecord, detail: str) -> None:
    for name in ("validate", "commit", "reload", "verify"):
        skip(rec, name, detail)
    rec.steps["stage"] = StepRecord(status="ok")
    finish(ctx, rec, "unchanged")

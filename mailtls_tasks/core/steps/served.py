"""What the daemon serves on the wire, listener by listener: the poll that verify
and rollback wait on, and the one-shot look that stage and recovery take."""

from __future__ import annotations

import time

from ...errors import VerifyFailed
from .. import material, probe
from ..config import Listener, Target
from ..names import validation_names
from .context import StepContext


def expected_algorithm(kind: str) -> str | None:
    return None if kind == "any" else kind


def default_served(ctx: StepContext, li: Listener) -> str:
    """The leaf ``li`` serves without SNI now (raises probe.ProbeError). A batch's
    members share the answer until the next reload: they all ask about the same
    default certificate."""
    memo = ctx.batch.default_now if ctx.batch is not None else None
    key = (li.endpoint, li.protocol)
    if memo is not None and key in memo:
        return memo[key]
    fp = probe.probe_listener(li).fingerprint
    if memo is not None:
        memo[key] = fp
    return fp


def wait_served(t: Target, leaves: dict[str, str], chains: dict[str, list[str]] | None) -> str | None:
    """Every listener serves every slot's leaf (``chains``: with the chain deployed),
    within the verify timeout (one deadline for them all). Returns the primary leaf."""
    listeners = t.verify_endpoints()
    deadline = time.monotonic() + listeners[0].timeout
    anchors = material.load_anchors(t.trust_anchors) if t.trust_anchors and chains is not None else None
    first: str | None = None
    for li in listeners:
        for kind, fp in leaves.items():
            left = max(0.5, deadline - time.monotonic())
            algorithm = expected_algorithm(kind) if len(leaves) > 1 else None
            served = probe.wait_for(li, fp, timeout=left, algorithm=algorithm)
            first = first or served.fingerprint
            if chains is None:
                continue
            what = f"{li.where}" + (f" ({kind.upper()})" if len(leaves) > 1 else "")
            if served.chain_fingerprints != chains.get(kind, served.chain_fingerprints):
                raise VerifyFailed(f"{what} serves the new leaf with another chain ({len(served.chain) - 1} "
                                   f"certificate(s) after the leaf, {len(chains.get(kind, []))} deployed): the daemon "
                                   "reads the chain from elsewhere", served=served.fingerprint)
            if anchors is not None:
                for name in validation_names(t.names, served.chain[0]):
                    why = material.chain_problem(served.chain[0], served.chain[1:], name, anchors)
                    if why:
                        raise VerifyFailed(f"{what} serves a chain that does not validate for {name}: {why}",
                                           served=served.fingerprint)
    return first


def served_now(t: Target, leaves: dict[str, str]) -> dict[str, str]:
    """What every listener serves now, per slot: kind -> fingerprint, when all agree."""
    out: dict[str, str] = {}
    for kind in leaves:
        seen = set()
        for li in t.verify_endpoints():
            try:
                seen.add(probe.probe_listener(li, expected_algorithm(kind) if len(leaves) > 1 else None).fingerprint)
            except probe.ProbeError:
                seen.add("")
        if len(seen) == 1 and "" not in seen:
            out[kind] = seen.pop()
    return out

"""Two batches that share a target, interleaved at every point of the first one.

Batch X (a, b) is paused at its k-th durable file operation (a write, rename, unlink or
directory fsync: hypothesis picks k); batch Y (b, c) runs meanwhile, then X goes on,
then Y again if it had to give way. Whatever k and whichever of the two certificates
for b is newer: neither waits on the other for ever, both end, every pair on disk
matches, and b ends with the newer certificate (never an older pair live: the later
batch's older one for b is rejected, alone, and its other member still deploys).
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailtls_tasks.core import files
from mailtls_tasks.core.batch import Member, run_batch
from mailtls_tasks.core.journal import Journal
from mailtls_tasks.core.material import fingerprint, key_matches_cert, leaf_of_file
from mailtls_tasks.errors import TargetBusy
from tests.support.host import MailHost
from tests.support.pki import PKI, Issued

OPS = ("write_new", "replace", "remove", "fsync_dir")


@contextmanager
def paused_at(k: int, thread: list[threading.Thread], paused: threading.Event,
              go_on: threading.Event) -> Iterator[None]:
    """The k-th durable file operation of ``thread[0]`` waits for ``go_on``."""
    originals = {n: getattr(files, n) for n in OPS}
    count = itertools.count(1)

    def wrap(fn: Any) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            if thread and threading.current_thread() is thread[0] and next(count) == k:
                paused.set()
                go_on.wait(30)
            return fn(*a, **kw)
        return wrapper

    for n in OPS:
        setattr(files, n, wrap(originals[n]))
    try:
        yield
    finally:
        for n in OPS:
            setattr(files, n, originals[n])


def leaf(pki: PKI, name: str, hours_ago: float) -> Issued:
    return pki.leaf(name, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours_ago))


def member(target: str, issued: Issued) -> Member:
    return Member(target, issued.fullchain_pem, issued.key_pem)


# make model runs many more (MAILTLS_INTERLEAVINGS)
@settings(max_examples=int(os.environ.get("MAILTLS_INTERLEAVINGS", "30")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(k=st.integers(min_value=1, max_value=140), x_newer=st.booleans())
def test_two_overlapping_batches_never_deadlock_nor_leave_an_older_pair(pki: PKI, k: int, x_newer: bool) -> None:
    root = Path(tempfile.mkdtemp(prefix="batches-"))
    try:
        host = MailHost(root)
        for name in ("a", "b", "c"):
            host.add_target(name, names=[f"{name}.example.test"])
            host.install(name, leaf(pki, f"{name}.example.test", 5))
        b_x, b_y = leaf(pki, "b.example.test", 1 if x_newer else 2), leaf(pki, "b.example.test", 2 if x_newer else 1)
        a_new, c_new = leaf(pki, "a.example.test", 1), leaf(pki, "c.example.test", 1)
        cfg = host.config
        thread: list[threading.Thread] = []
        paused, go_on = threading.Event(), threading.Event()
        out: dict[str, Any] = {}

        Journal(str(host.state)).owners()  # the journal's layout settled first: not part of the interleaving

        def run_x() -> None:
            try:
                out["x"] = run_batch(cfg, [member("a", a_new), member("b", b_x)], lock_timeout=30)
            finally:
                paused.set()  # ended before its k-th operation: Y runs after it

        with paused_at(k, thread, paused, go_on):
            thread.append(threading.Thread(target=run_x))
            thread[0].start()
            paused.wait(30)
            try:
                out["y"] = run_batch(cfg, [member("b", b_y), member("c", c_new)], lock_timeout=0.3)
            except TargetBusy:
                out["y"] = None  # X holds b: Y gave way, nothing of it touched
            go_on.set()
            thread[0].join(30)
            assert not thread[0].is_alive(), "batch X never ended"
        if out["y"] is None:
            assert host.path("c", "cert").read_bytes() != c_new.fullchain_pem
            out["y"] = run_batch(cfg, [member("b", b_y), member("c", c_new)], lock_timeout=5)

        newer = b_x if x_newer else b_y
        for name, want in (("a", a_new), ("b", newer), ("c", c_new)):
            cert, key = host.path(name, "cert").read_bytes(), host.path(name, "key").read_bytes()
            assert key_matches_cert(key, cert), name
            assert fingerprint(leaf_of_file(cert)) == want.fingerprint, (name, k, x_newer)  # type: ignore[arg-type]
        outcomes = {r.target.split("/")[1] + "@" + which: r.outcome for which in ("x", "y") for r in out[which]}
        assert outcomes["a@x"] == outcomes["c@y"] == "deployed"
        assert {outcomes["b@x"], outcomes["b@y"]} <= {"deployed", "rejected"}
        j = Journal(str(host.state))
        assert j.owners() == [] and host.stray_temps() == []
    finally:
        shutil.rmtree(root, ignore_errors=True)

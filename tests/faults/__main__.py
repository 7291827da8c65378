"""``make faults``: the whole fault matrix, both modes, and the table for the README.

    python -m tests.faults [--level full|slice] [--out faults-report.md]

Exits 1 if any case broke the invariant (each is listed with what was wrong).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from tests.faults.harness import (
    FAULTS,
    Case,
    InvariantBroken,
    Result,
    WorkerRig,
    local_cases,
    measure,
    run_local_case,
    run_worker_case,
    table,
    worker_cases,
    worker_count,
)
from tests.support.keys import Pipeline
from tests.support.pki import make_pki
from tests.support.services import RedisServer


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(143)  # so the finally blocks stop the workers and Redis


def main() -> int:
    signal.signal(signal.SIGTERM, _terminated)
    ap = argparse.ArgumentParser()
    ap.add_argument("--level", default="full", choices=["full", "slice"])
    ap.add_argument("--out", default="faults-report.md")
    ap.add_argument("--modes", default="local,worker")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mailtls-faults-"))
    pki = make_pki("ec")
    leaves = (pki.leaf(), pki.leaf())
    results: list[Result] = []
    broken: list[tuple[Case, str]] = []
    notes: list[str] = []
    t0 = time.monotonic()

    def record(case: Case, run: object) -> None:
        try:
            results.append(run())  # type: ignore[operator]
        except InvariantBroken as err:
            broken.append((case, str(err)))
            print(f"BROKEN {case.id}: {err}", flush=True)

    if "local" in args.modes:
        counts, kill_at = measure(root / "measure", pki, leaves)
        print(f"local syscall counts: {counts}", flush=True)
        for case in local_cases(args.level, counts):
            record(case, lambda c=case: run_local_case(root / "local" / c.id, pki, c, leaves, kill_at))
        print(f"local: {len(results)} cases, {len(broken)} broken, {time.monotonic() - t0:.0f}s", flush=True)
    if "worker" in args.modes:
        redis = RedisServer(root / "redis")
        pipeline = Pipeline(root / "pipeline")
        os.environ["MAILTLS_PIPELINE"] = str(pipeline.path)
        rig = WorkerRig(root / "rig", pki, leaves, redis.url, pipeline)
        try:
            wcounts = {(sc, s): worker_count(rig, s, sc) for sc in ("deploy", "rollback") for s in FAULTS}
            wcounts[("batch", "rename")] = worker_count(rig, "rename", "batch")
            print(f"worker syscall counts: {wcounts}", flush=True)
            ipc = sum(len(v) for v in rig.ipc.values())
            notes.append(f"worker mode: {ipc} error injections into writes to Celery's pool pipe or a socket "
                         "left out (per mode and error; a pipe cannot fail with ENOSPC or EIO)")
            for case in worker_cases(args.level, wcounts, rig.ipc):
                record(case, lambda c=case: run_worker_case(rig, c, whole_worker=c.mode == "worker"))
        finally:
            rig.close()
            redis.stop()
    report = table(results, broken)
    summary = "; ".join([f"{len(results) + len(broken)} cases, {len(broken)} broke the invariant, "
                         f"{time.monotonic() - t0:.0f}s", *notes])
    Path(args.out).write_text(report + "\n\n" + summary + "\n")
    print(report + "\n\n" + summary)
    for case, why in broken:
        print(f"  {case.id}: {why}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())

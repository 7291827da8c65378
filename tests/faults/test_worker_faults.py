"""The fault matrix, distributed mode: a real worker's pool child gets the faults.

Two ways to die: the pool child alone (Celery redelivers its message at once), or the
whole worker with it (it restarts; its start-up recovery must end the deploy and
Redis must hear of it). Scenarios: a deploy, one that rolls back, and the deploy as
the member of a batch (``deploy_many``: the whole run in one ``mailtls.batch`` task).
``make test`` runs a spread of rename kills both ways and one
point of each error; ``make faults`` sweeps every N.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.faults.harness import FAULTS, InvariantBroken, WorkerRig, run_worker_case, worker_cases, worker_count
from tests.support.keys import Pipeline
from tests.support.pki import PKI
from tests.support.services import RedisServer, require

pytestmark = pytest.mark.integration
LEVEL = os.environ.get("MAILTLS_FAULTS", "slice")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, pki: PKI, redis_server: RedisServer,
        pipeline: Pipeline) -> Iterator[WorkerRig]:
    require("strace")
    r = WorkerRig(tmp_path_factory.mktemp("wfaults") / "rig", pki, (pki.leaf(), pki.leaf()), redis_server.url,
                  pipeline)
    yield r
    r.close()


@pytest.fixture(scope="module")
def counts(rig: WorkerRig) -> dict[tuple[str, str], int]:
    out = {(scenario, syscall): worker_count(rig, syscall, scenario)
           for scenario in ("deploy", "rollback") for syscall in FAULTS}
    out[("batch", "rename")] = worker_count(rig, "rename", "batch")  # a batch's cases kill at a rename
    return out


@pytest.mark.parametrize("mode", ["worker", "child"])
def test_worker_fault_matrix(rig: WorkerRig, counts: dict[tuple[str, str], int], mode: str) -> None:
    assert counts[("deploy", "rename")] >= 5 and counts[("rollback", "rename")] >= 5, counts
    assert counts[("batch", "rename")] >= 5, counts
    broken, results = [], []
    cases = [c for c in worker_cases(LEVEL, counts, rig.ipc) if c.mode == mode]
    assert cases
    for case in cases:
        try:
            results.append(run_worker_case(rig, case, whole_worker=mode == "worker"))
        except InvariantBroken as err:
            broken.append(f"{case.id}: {err}")
    assert not broken, "\n".join(broken)
    assert {r.outcome for r in results} <= {"deployed", "rolled_back", "rejected", "failed", None}
    if mode == "worker":
        assert any("worker killed" in r.notes for r in results), "no case killed the worker: the sweep missed"

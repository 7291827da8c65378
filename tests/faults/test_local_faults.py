"""The fault matrix, ``--local`` mode: real processes, faults injected by strace.

``make test`` runs a fixed spread of each fault (every third rename kill of a deploy
and of a rollback, first/middle/last for the other kills, one point for each error);
``make faults`` (``MAILTLS_FAULTS=full``) sweeps every N and prints the table that the
README carries. See ``harness.py`` for the invariant checked after every case.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import FAULTS, SCENARIOS, InvariantBroken, Result, local_cases, measure, run_local_case
from tests.support.pki import PKI, Issued
from tests.support.services import require

LEVEL = os.environ.get("MAILTLS_FAULTS", "slice")
GROUPS = [(s, sc, label) for s in SCENARIOS for sc, actions in FAULTS.items() for _, label in actions]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[tuple[dict[tuple[str, str], int], int,
                                                                                 tuple[Issued, Issued], Path]]:
    require("strace")
    root = tmp_path_factory.mktemp("faults")
    leaves = (pki.leaf(), pki.leaf())
    counts, kill_at = measure(root / "measure", pki, leaves)
    yield counts, kill_at, leaves, root


@pytest.mark.parametrize(("scenario", "syscall", "label"), GROUPS, ids=["-".join(g) for g in GROUPS])
def test_local_fault_matrix(matrix, pki: PKI, scenario: str, syscall: str, label: str) -> None:  # type: ignore[no-untyped-def]
    counts, kill_at, leaves, root = matrix
    assert counts[(scenario, "rename")] >= 3, counts  # a sweep over nothing proves nothing
    cases = [c for c in local_cases(LEVEL, counts)
             if (c.scenario, c.syscall, c.label) == (scenario, syscall, label)]
    assert cases
    results: list[Result] = []
    broken = []
    for case in cases:
        try:
            results.append(run_local_case(root / case.id, pki, case, leaves, kill_at))
        except InvariantBroken as err:
            broken.append(f"{case.id}: {err}")
    assert not broken, "\n".join(broken)
    if scenario == "deploy" and label == "SIGKILL":
        # killed before anything was committed: old; late enough: rolled forward or recovered
        assert {r.live for r in results} <= {"old", "new"}

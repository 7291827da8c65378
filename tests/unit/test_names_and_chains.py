"""Which names a chain is validated for (review findings: a target with trust_anchors
but no ``names`` rolled back every deploy; wildcard names were refused at stage)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailtls_tasks.core.material import build_bundle, check_path
from mailtls_tasks.core.names import name_covered, validation_names
from mailtls_tasks.distributed.rollout import RolloutError, check_reachable, plan_waves, select, unregistered
from mailtls_tasks.errors import MaterialError
from tests.support.pki import PKI, issue


def _anchors(tmp_path: Path, pki: PKI) -> str:
    f = tmp_path / "ca.pem"
    f.write_bytes(pki.root.cert_pem)
    return str(f)


def test_validation_names_use_the_leaf_when_the_target_names_none(pki: PKI) -> None:
    leaf = issue("mx.example.test", pki.inter, sans=["mx.example.test", "*.example.test"])
    assert validation_names((), leaf.cert) == ["mx.example.test"]
    assert validation_names(("*.example.test",), leaf.cert) == ["mailtls-check.example.test"]
    only_wild = issue("w", pki.inter, sans=["*.example.test"])
    assert validation_names((), only_wild.cert) == ["mailtls-check.example.test"]


def test_strict_chain_check_without_names_and_with_wildcards(tmp_path: Path, pki: PKI) -> None:
    anchors = _anchors(tmp_path, pki)
    plain = pki.leaf("mail.example.test")
    check_path(build_bundle(plain.cert_pem, plain.key_pem, plain.chain_pem), anchors, allow_self_signed=False)
    wild = issue("w", pki.inter, sans=["*.example.test"])
    wild.chain = [pki.inter.cert]
    bundle = build_bundle(wild.cert_pem, wild.key_pem, wild.chain_pem)
    check_path(bundle, anchors, allow_self_signed=False, names=("*.example.test",))
    check_path(bundle, anchors, allow_self_signed=False)
    with pytest.raises(MaterialError, match=r"for other\.test"):
        check_path(bundle, anchors, allow_self_signed=False, names=("other.test",))


def test_covers_selects_through_a_wildcard_lineage() -> None:
    entries = [{"host": "a", "target": "smtp", "names": ["mail.example.com"], "worker_alive": True},
               {"host": "b", "target": "smtp", "names": ["mail.example.com"], "worker_alive": False},
               {"host": "a", "target": "www", "names": ["www.other.org"], "worker_alive": True}]
    leaf = issue("x", None, sans=["*.example.com"]).cert
    chosen, _, unreachable = select(entries, targets=None, label=None, covers=["*.example.com"], leaf=leaf)
    assert chosen == ["a/smtp"]  # b's worker is down: not sent (it would wait out the timeout), and not dropped
    assert unreachable == {"b/smtp": "no live worker on host b"}
    assert name_covered("mail.example.com", ["*.example.com"]) and not name_covered("a.b.example.com",
                                                                                     ["*.example.com"])
    assert select(entries, targets=["b/smtp"], label=None, covers=None, leaf=leaf)[1:] == (
        {}, {"b/smtp": "no live worker on host b"})
    with pytest.raises(RolloutError, match=r"nothing sent: the rollout cannot reach b/smtp \(no live worker"):
        check_reachable(unreachable, skip_unreachable=False)
    check_reachable(unreachable, skip_unreachable=True)
    keys = type("Keys", (), {"hosts": {"a": None, "c": None}, "source": "pipeline.toml"})()
    assert unregistered(entries, keys) == {
        "c/*": "host c is in pipeline.toml but has registered no target (worker not running, or Redis lost the "
               "registry)"}


@pytest.mark.parametrize("spec", ["inf%", "nan%", "-1", "0%", "101%", "x"])
def test_bad_wave_specs_are_refused(spec: str) -> None:
    with pytest.raises(RolloutError, match="waves"):
        plan_waves(10, spec)


def test_wave_plan() -> None:
    assert plan_waves(10, "1,25%,100%") == [1, 2, 7]
    assert plan_waves(1, "1,25%,100%") == [1]

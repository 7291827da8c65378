"""``--deploy-id`` names one deploy of one bundle.

Run again with the same bundle it converges (the recorded result, or the rest of its
steps after a crash). Under another bundle, or under the id of a distributed deploy,
it is refused before anything is touched: a certbot hook with a fixed id would
otherwise report its first deploy, exit 0, forever; and a local run would run the
steps of a deploy a worker owns -- or roll that deploy back when it failed.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from mailtls_tasks.core.journal import Journal
from mailtls_tasks.core.local import contexts_for
from mailtls_tasks.core.steps.stage import stage
from mailtls_tasks.errors import Rejected
from tests.support.host import MailHost
from tests.support.pki import PKI


def test_a_fixed_id_with_another_certificate_is_refused_and_nothing_changes(host: MailHost, pki: PKI) -> None:
    first, second = pki.leaf(), pki.leaf()
    host.add_target("mx")
    assert host.deploy("mx", first, deploy_id="hook-1").outcome == "deployed"
    before = host.snapshot()

    with pytest.raises(Rejected, match=r"deploy id hook-1 was already used for other certificates"):
        host.deploy("mx", second, deploy_id="hook-1")

    assert host.snapshot() == before
    assert len(host.reload.calls) == 1
    rec = Journal(str(host.state)).load("mx", "hook-1")
    assert rec is not None and rec.outcome == "deployed" and rec.fingerprint == first.fingerprint


def test_the_cli_says_so_with_exit_2(host: MailHost, pki: PKI) -> None:
    first, second = pki.leaf(), pki.leaf()
    host.add_target("mx")
    assert host.deploy("mx", first, deploy_id="hook-2").outcome == "deployed"

    p = host.cli("deploy", "mx", "--local", "--deploy-id", "hook-2", "--cert", "c.pem", "--key", "k.pem",
                 input_files={"c.pem": second.fullchain_pem, "k.pem": second.key_pem})

    assert p.returncode == 2, p.stdout + p.stderr
    assert "already used for other certificates" in p.stderr
    assert host.path("mx", "cert").read_bytes() == first.fullchain_pem


def test_a_local_run_does_not_take_over_a_distributed_deploy_in_flight(host: MailHost, pki: PKI) -> None:
    old, new = pki.leaf(), pki.leaf()
    host.add_target("mx")
    host.install("mx", old)
    cfg = host.config
    ctx = replace(contexts_for(cfg)["mx"])
    staged = stage(ctx, "dist-1", new.fullchain_pem, new.key_pem, origin="distributed", fence=1)
    assert staged.phase == "staged"  # a worker staged it; its validate message is on its way

    with pytest.raises(Rejected, match=r"deploy id dist-1 is a distributed deploy of target 'mx'"):
        host.deploy("mx", new, deploy_id="dist-1")

    rec = Journal(str(host.state)).load("mx", "dist-1")
    assert rec is not None and rec.phase == "staged" and not rec.finished  # left to its worker
    assert host.path("mx", "cert").read_bytes() == old.fullchain_pem
    assert host.reload.calls == [] and host.validate.calls == []


def test_a_dual_target_rerun_converges_in_either_order_and_a_new_leaf_is_refused(host: MailHost, pki: PKI) -> None:
    from mailtls_tasks.core.local import run_local
    from tests.support.pki import make_pki

    rsa_pki = make_pki("rsa")
    host.add_target("dual", alt={"key_type": "rsa", "cert_path": str(host.certs / "rsa-cert.pem"),
                                 "key_path": str(host.certs / "rsa-key.pem")})
    ec, rsa, rsa2 = pki.leaf(), rsa_pki.leaf(kind="rsa"), rsa_pki.leaf(kind="rsa")
    cfg = host.config

    first = run_local(cfg, "dual", ec.fullchain_pem, ec.key_pem, also=[(rsa.fullchain_pem, rsa.key_pem, None)],
                      deploy_id="dual-1", lock_timeout=5)
    again = run_local(cfg, "dual", rsa.fullchain_pem, rsa.key_pem, also=[(ec.fullchain_pem, ec.key_pem, None)],
                      deploy_id="dual-1", lock_timeout=5)
    assert first.outcome == "deployed", first.error
    assert again == first
    with pytest.raises(Rejected, match="already used for other certificates"):
        run_local(cfg, "dual", ec.fullchain_pem, ec.key_pem, also=[(rsa2.fullchain_pem, rsa2.key_pem, None)],
                  deploy_id="dual-1", lock_timeout=5)
    assert host.path("dual", "cert").read_bytes() == ec.fullchain_pem
    assert (host.certs / "rsa-cert.pem").read_bytes() == rsa.fullchain_pem


def test_an_id_first_rejected_for_bad_input_is_not_reported_again_for_good_input(host: MailHost, pki: PKI) -> None:
    host.add_target("mx")
    good = pki.leaf()
    bad = host.deploy("mx", pki.leaf(), chain=b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
                      deploy_id="fix-1", fullchain=False)
    assert bad.outcome == "rejected"

    with pytest.raises(Rejected, match="already used for other certificates"):
        host.deploy("mx", good, deploy_id="fix-1")

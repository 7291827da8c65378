"""The worker host's runtime opening envelopes, against real files and keys."""

from __future__ import annotations

import time
from pathlib import Path

from mailtls_tasks.core.host import HostRuntime
from mailtls_tasks.core.journal import Journal
from mailtls_tasks.security.envelope import seal
from mailtls_tasks.security.keys import load_pipeline
from tests.support.host import MailHost
from tests.support.keys import Pipeline
from tests.support.pki import PKI


def test_redelivered_stage_after_staging_returns_the_record_even_if_its_envelope_expired(
        host: MailHost, pki: PKI, tmp_path: Path) -> None:
    """Redis redelivers unacked messages after the visibility timeout (2 h), which is past
    max_envelope_age (1 h): a stage that already ran must not be re-judged and rejected."""
    pipeline = Pipeline(tmp_path / "pipeline")
    host.enroll(pipeline)
    host.add_target("mx")
    keys = load_pipeline(str(pipeline.path))
    leaf = pki.leaf()

    def envelope(issued_at: float) -> dict[str, object]:
        return seal(target="mx", host=host.host, deploy_id="d-1", fence=1, cert=leaf.fullchain_pem,
                    key=leaf.key_pem, chain=None, force=False, signing_key=keys.signing_key,
                    recipient=keys.host_key(host.host), issued_at=issued_at)

    rt = HostRuntime(host.config)
    staged = rt.stage_envelope("mx", "d-1", envelope(time.time()), fence=1)
    assert staged.phase == "staged" and not staged.finished

    again = rt.stage_envelope("mx", "d-1", envelope(time.time() - 7200), fence=1)

    assert again.phase == "staged" and again.fingerprint == leaf.fingerprint


def test_a_validate_message_for_a_stage_that_died_half_way_is_refused_and_touches_nothing(
        host: MailHost, pki: PKI) -> None:
    """Found by the protocol model: stage dies at its 9th durable file operation (its
    record names only some of the files), then a validate message arrives (redelivered
    or late). validate must refuse it like commit refuses an unvalidated deploy, not
    run the handshake on half a file list (it crashed with KeyError: 'cert')."""
    import pytest

    from mailtls_tasks.core.steps.validate import validate
    from mailtls_tasks.errors import StepFailed
    from tests.unit.test_protocol_model import Crash, crash_before_op

    old, new = pki.leaf(), pki.leaf()
    host.add_target("mx")
    host.install("mx", old)
    before = host.snapshot()
    rt = HostRuntime(host.config)
    Journal(str(host.state)).owners()  # the journal's layout marker written: not one of the 9 below
    with pytest.raises(Crash), crash_before_op(9):
        rt.stage("mx", "half-1", new.fullchain_pem, new.key_pem, None, force=False, fence=1)
    rec = rt.record("mx", "half-1")
    assert rec is not None and rec.phase == "staging"  # the model's state: died inside stage

    with pytest.raises(StepFailed, match="cannot validate from phase 'staging'"):
        validate(rt.context("mx"), "half-1")
    assert host.snapshot() == before

"""The sample alert rules fire on metrics the worker really exports."""

from __future__ import annotations

import re

import yaml

from tests.support.services import REPO

EXPORTED = {"mailtls_deploys_total", "mailtls_rollbacks_total", "mailtls_step_seconds", "mailtls_cert_expiry_seconds",
            "mailtls_drift", "mailtls_audit_last_timestamp_seconds", "mailtls_worker_heartbeat_timestamp_seconds"}


def test_every_rule_is_complete_and_uses_exported_metrics() -> None:
    doc = yaml.safe_load((REPO / "workers" / "mailtls-alerts.yml").read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert len(rules) >= 6
    source = (REPO / "mailtls_tasks" / "distributed" / "metrics.py").read_text()
    for rule in rules:
        assert rule["alert"].startswith("MailTLS") and rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        used = set(re.findall(r"\bmailtls_[a-z_]+", rule["expr"]))
        assert used and used <= EXPORTED, (rule["alert"], used - EXPORTED)
        for name in used:  # and the worker does define each of them
            base = name.removesuffix("_total")
            assert f'"{base}"' in source, name


"""certbot, against a real ACME server (pebble), renews a certificate; its deploy hook
`mailtls certbot-hook` puts it on both daemons that serve the name, verified."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mailtls_tasks.core import probe
from mailtls_tasks.core.journal import Journal
from mailtls_tasks.core.material import fingerprint, leaf_of_file
from tests.support.acme import Certbot, Pebble
from tests.support.pki import PKI
from tests.support.services import REPO, free_port, require
from tests.support.stack import MailStack

pytestmark = pytest.mark.e2e
NAME = "mail.certbot.test"


def test_certbot_renewal_through_the_hook_reaches_both_daemons(tmp_path: Path, pki: PKI) -> None:
    require("certbot")
    pebble = Pebble(tmp_path / "pebble", pki)
    stack = MailStack(tmp_path / "mx", pki.leaf(NAME), host="certbot-mx")
    for name in ("smtp", "imap"):
        stack.targets[name]["names"] = [NAME]
    stack.targets["www"] = {**stack.targets["smtp"], "names": ["www.certbot.test"],
                            "cert_path": str(tmp_path / "www-cert.pem"), "key_path": str(tmp_path / "www-key.pem")}
    del stack.targets["www"]["post_deploy_verify"]
    stack.write_config()
    stack.start()
    try:
        certbot = Certbot(tmp_path / "certbot", pebble)
        hook = (f"{shlex.quote(sys.executable)} -m mailtls_tasks.cli certbot-hook --config "
                f"{shlex.quote(str(stack.config_path))}")
        env = {"PYTHONPATH": str(REPO)}
        issued = certbot.run("certonly", "--standalone", "--http-01-port", str(certbot.http_port), "-d", NAME,
                             "--deploy-hook", hook, env=env)
        assert issued.returncode == 0, issued.stdout + issued.stderr + certbot.log()[-3000:]
        first = fingerprint(leaf_of_file((certbot.live(NAME) / "cert.pem").read_bytes()))  # type: ignore[arg-type]
        for port, proto in ((stack.postfix.smtp_port, "smtp"), (stack.dovecot.ports["imaps"], "imaps")):
            assert probe.probe("127.0.0.1", port, proto).fingerprint == first

        renewed = certbot.run("renew", "--force-renewal", "--deploy-hook", hook, env=env)
        assert renewed.returncode == 0, renewed.stdout + renewed.stderr
        second = fingerprint(leaf_of_file((certbot.live(NAME) / "cert.pem").read_bytes()))  # type: ignore[arg-type]
        assert second != first
        for port, proto in ((stack.postfix.smtp_port, "smtp"), (stack.dovecot.ports["imaps"], "imaps")):
            assert probe.probe("127.0.0.1", port, proto).fingerprint == second
        log = certbot.log()
        assert "mailtls: certbot-mx/smtp: deployed" in log and "mailtls: certbot-mx/imap: " in log
        assert "certbot-mx/www" not in log  # www's names are not covered: not touched
        recs = Journal(str(stack.state)).records("smtp")
        assert [r.outcome for r in recs][-1] == "deployed" and recs[-1].fingerprint == second

        # the hook's results without Redis (none here): read from the host's journal
        hist = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "history", "certbot-mx/smtp", "--json",
                               "--config", str(stack.config_path), "--broker", f"redis://127.0.0.1:{free_port()}/0"],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
        assert hist.returncode == 0, hist.stderr
        assert "reading this host's journal" in hist.stderr
        rows = json.loads(hist.stdout)
        assert rows[0]["deploy_id"] == recs[-1].deploy_id and rows[0]["outcome"] == "deployed"
        assert rows[0]["fingerprint"] == second and len(rows) == len(recs)

        # --check, run by hand as the README says (certbot's --dry-run calls no deploy hook):
        # the renewed lineage is live on both daemons already -> UNCHANGED, nothing run
        live = certbot.live(NAME)
        checked = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "certbot-hook", "--check",
                                  "--config", str(stack.config_path)], capture_output=True, text=True, cwd=REPO,
                                 timeout=120, env={**os.environ, "RENEWED_LINEAGE": str(live),
                                                   "RENEWED_DOMAINS": NAME})
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout.count(": UNCHANGED") == 2 and "certbot-mx/www" not in checked.stdout, checked.stdout
        assert len(Journal(str(stack.state)).records("smtp")) == len(recs)

        # a lineage for another server (a host may have those): said so, exit 0, nothing touched
        other = pki.leaf("other.certbot.test")
        lineage = tmp_path / "live" / "other.certbot.test"
        lineage.mkdir(parents=True)
        (lineage / "fullchain.pem").write_bytes(other.fullchain_pem)
        (lineage / "privkey.pem").write_bytes(other.key_pem)
        hook_run = subprocess.run([sys.executable, "-m", "mailtls_tasks.cli", "certbot-hook",
                                   "--config", str(stack.config_path)], capture_output=True, text=True, cwd=REPO,
                                  timeout=60, env={**os.environ, "RENEWED_LINEAGE": str(lineage),
                                                   "RENEWED_DOMAINS": "other.certbot.test"})
        assert hook_run.returncode == 0, hook_run.stdout + hook_run.stderr
        assert "not deployed, no target on host certbot-mx serves names it covers" in hook_run.stdout
        assert len(Journal(str(stack.state)).records("smtp")) == len(recs)
    finally:
        stack.stop()
        pebble.stop()

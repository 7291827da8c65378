"""The result of a deploy, as the CLI's ``--json`` prints it and the API returns it.

The same shape whether the deploy ran in-process or through Celery, built from the
journal record, so it can never contain key material.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from .journal import STEP_NAMES, DeployRecord, Outcome

# Endings of deploys that never got to judge their bundle: busy past the retry budget,
# cancelled by the client, envelope lost with Redis's data. Exit 1, like a busy target.
NEVER_STARTED = frozenset({"busy", "cancelled", "envelope_missing"})
EXIT_CODES: dict[str, int] = {"deployed": 0, "unchanged": 0, "rejected": 2, "rolled_back": 3, "failed": 4}


class StepResult(BaseModel):
    status: str
    ms: int


class DeployResult(BaseModel):
    deploy_id: str
    target: str
    host: str = ""
    outcome: Outcome
    reason: str | None = None
    fingerprint_sha256: str | None = None
    previous_fingerprint_sha256: str | None = None
    served_fingerprint_sha256: str | None = None
    steps: dict[str, StepResult] = {}
    error: str | None = None
    notes: list[str] = []

    @property
    def exit_code(self) -> int:
        if self.outcome == "rejected" and self.reason in NEVER_STARTED:
            return 1  # the target or the broker was the problem, not the bundle
        return EXIT_CODES[self.outcome]

    @property
    def ok(self) -> bool:
        return self.outcome in ("deployed", "unchanged")

    @classmethod
    def from_record(cls, rec: DeployRecord) -> DeployResult:
        if rec.outcome is None:
            raise ValueError(f"deploy {rec.deploy_id} has not finished (phase {rec.phase})")
        steps = {n: StepResult(status=rec.steps[n].status, ms=rec.steps[n].ms)
                 for n in STEP_NAMES if n in rec.steps}
        return cls(
            deploy_id=rec.deploy_id,
            target=f"{rec.host}/{rec.target}" if rec.host else rec.target,
            host=rec.host,
            outcome=rec.outcome,
            reason=rec.reason,
            fingerprint_sha256=rec.fingerprint,
            previous_fingerprint_sha256=rec.previous_fingerprint,
            served_fingerprint_sha256=rec.served_fingerprint,
            steps=steps,
            error=rec.error,
            notes=list(rec.notes),
        )

    @classmethod
    def from_public(cls, d: dict[str, Any]) -> DeployResult:
        """From the deploy record a worker published to Redis."""
        raw_steps = d.get("steps") or {}
        steps = {n: StepResult(status=raw_steps[n]["status"], ms=raw_steps[n].get("ms", 0))
                 for n in STEP_NAMES if n in raw_steps}
        return cls(
            deploy_id=d["deploy_id"],
            target=d.get("target", ""),
            host=d.get("host") or "",
            outcome=d["outcome"],
            reason=d.get("reason"),
            fingerprint_sha256=d.get("fingerprint"),
            previous_fingerprint_sha256=d.get("previous_fingerprint"),
            served_fingerprint_sha256=d.get("served_fingerprint"),
            steps=steps,
            error=d.get("error"),
            notes=list(d.get("notes") or []),
        )

    def human(self) -> str:
        """A few lines for a terminal."""
        lines = [f"{self.target}: {self.outcome.upper()}" + (f" ({self.reason})" if self.reason else "")
                 + f"  deploy {self.deploy_id}"]
        fp = self.fingerprint_sha256
        lines.append(f"  new leaf      {fp or '-'}")
        lines.append(f"  previous leaf {self.previous_fingerprint_sha256 or '-'}")
        if self.served_fingerprint_sha256:
            lines.append(f"  served now    {self.served_fingerprint_sha256}")
        if self.steps:
            lines.append("  steps         " + "  ".join(f"{n}:{s.status}({s.ms}ms)" for n, s in self.steps.items()))
        if self.error:
            lines.append(f"  error         {self.error}")
        lines += [f"  note          {n}" for n in self.notes]
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

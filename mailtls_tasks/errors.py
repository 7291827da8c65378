"""The whole exception story of mailtls-tasks.

Every error a deploy can end with is one of these. The class decides three things
callers need without parsing messages:

* ``outcome``: what a deploy that ends with this error is recorded as;
* ``transient``: whether trying the same step again later may succeed (a busy
  target, a command that timed out, a broker hiccup) -- only these are retried;
* ``exit_code``: what the CLI exits with.

Messages never contain key material: they name files, fields and fingerprints only.
"""

from __future__ import annotations


class MailTLSError(Exception):
    """Base class. ``str(err)`` is safe to log and to store in Redis. ``reason`` is the
    short, stable word a deploy that ends with this error is recorded with."""

    outcome: str = "failed"
    transient: bool = False
    exit_code: int = 1
    reason: str | None = None


class ConfigError(MailTLSError):
    """The host's targets file is unreadable or invalid (exit 1: usage error)."""

    exit_code = 1


class UnknownTarget(MailTLSError):
    """A message or command named a target this host's config does not define."""

    outcome = "rejected"
    exit_code = 2


class AmbiguousTarget(UnknownTarget):
    """A bare NAME that more than one host defines: say HOST/NAME (the message lists them)."""


class HostTaken(MailTLSError):
    """Another live worker already serves this host name (exit 1)."""

    exit_code = 1


class Rejected(MailTLSError):
    """The new material or the staged files failed a check; nothing live was touched."""

    outcome = "rejected"
    exit_code = 2


class MaterialError(Rejected):
    """PEM, key, chain or validity problems in the bundle."""


class ValidationFailed(Rejected):
    """The staged files did not load, or the operator's validate_command failed."""


class StepFailed(MailTLSError):
    """A step after staging failed; the deploy must be compensated by a rollback."""

    outcome = "rolled_back"
    exit_code = 3


class CommitFailed(StepFailed):
    """Renaming the staged files into place failed."""


class CommandFailed(StepFailed):
    """A configured command exited non-zero (reload, or validate during rollback)."""


class VerifyFailed(StepFailed):
    """The endpoint did not serve the expected certificate before the timeout."""

    def __init__(self, message: str, served: str | None = None) -> None:
        super().__init__(message)
        self.served = served


class Transient(MailTLSError):
    """Trying again later may succeed; the step changed nothing it cannot redo."""

    transient = True
    exit_code = 1


class TargetBusy(Transient):
    """Another live deploy owns one of the target's files (``owned``), or a step of one
    holds its lock right now."""

    owned: bool = False


class JournalError(Transient):
    """The host journal could not be read or written (disk full, I/O error).

    The message names the file and the errno. Exit 1: the host needs attention, the
    bundle was not judged. Transient: every step is idempotent, so trying again once
    the disk has room (or the I/O error has passed) converges."""


class CommandTimeout(Transient):
    """A configured command ran past its timeout and its process group was killed."""


class DeployFailed(MailTLSError):
    """Neither the new set nor the old set could be made live and verified.

    An operator is needed; the message says what is on disk and what is served.
    """

    outcome = "failed"
    exit_code = 4


class Superseded(Rejected):
    """A newer deploy of the same target already ran; this (stale) message must not act."""

    reason = "superseded"


class Conflict(MailTLSError):
    """The live files are not what this deploy expects (changed by hand, by another
    tool, or by a newer deploy): the step stopped without overwriting them."""




class BrokerError(MailTLSError):
    """Redis or Celery could not be reached or answered unexpectedly (exit 1)."""

    transient = True
    exit_code = 1

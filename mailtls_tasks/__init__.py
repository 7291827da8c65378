"""mailtls-tasks: rotate TLS certificates on Postfix and Dovecot, verified on the wire.

Public API::

    mailtls_tasks.deploy(target, cert_pem, key_pem, chain_pem=None, *, force=False,
                         broker_url=None) -> DeployHandle      # through Redis + a worker
    mailtls_tasks.run_local(config, target, cert_pem, key_pem, chain_pem=None, *, force=False)
                         -> DeployResult                       # in-process, no broker
    mailtls_tasks.rollout(cert_pem, key_pem, chain_pem=None, *, targets=None | label=None | covers=None,
                          waves="1,25%,100%", continue_on_error=False) -> RolloutResult
    mailtls_tasks.deploy_many([Certificate(target, cert_pem, key_pem, chain_pem), ...])
                         -> [DeployHandle, ...]   # one batch per host: one validate, one reload
    mailtls_tasks.rollout_many([Certificate(None, cert_pem, key_pem), ...], waves="1,100%")
                         -> RolloutResult         # each to the targets it covers (or names)
    mailtls_tasks.check(target, cert_pem, key_pem, chain_pem=None) -> CheckReport   # by the target's worker
    mailtls_tasks.check_local(config, target, cert_pem, key_pem, chain_pem=None) -> CheckReport  # in-process
                         # every check a deploy runs, what it would change; nothing changed
    mailtls_tasks.load_config(path=None) -> HostConfig

A target is ``HOST/NAME``; a bare ``NAME`` is accepted while exactly one host defines it.

``deploy`` is imported lazily: the core (config, steps, local runs) never loads Celery.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core.check import CheckReport
    from .core.check import check as check_local
    from .core.config import HostConfig, Target, VerifySettings, load_config
    from .core.local import run_local
    from .core.result import DeployResult
    from .distributed.rollout import RolloutResult, rollout, rollout_many
    from .distributed.workflow import Certificate, DeployHandle, check, deploy, deploy_many
    from .errors import MailTLSError

__all__ = ["Certificate", "CheckReport", "DeployHandle", "DeployResult", "HostConfig", "MailTLSError", "RolloutResult",
           "Target", "VerifySettings", "check", "check_local", "deploy", "deploy_many", "load_config", "rollout",
           "rollout_many", "run_local"]
__version__ = "0.1.0"

# Everything is imported on first use: `mailtls status` or a pipeline's enqueue must not
# pay for pydantic, cryptography's X.509 or Celery (PEP 562).
_WHERE = {"HostConfig": ".core.config", "Target": ".core.config", "VerifySettings": ".core.config",
          "load_config": ".core.config", "run_local": ".core.local", "MailTLSError": ".errors",
          "DeployResult": ".core.result", "deploy": ".distributed.workflow", "DeployHandle": ".distributed.workflow",
          "rollout": ".distributed.rollout", "RolloutResult": ".distributed.rollout",
          "rollout_many": ".distributed.rollout", "deploy_many": ".distributed.workflow",
          "Certificate": ".distributed.workflow", "check": ".distributed.workflow", "CheckReport": ".core.check",
          "check_local": ".core.check"}
_NAMED = {"check_local": "check"}  # exported under another name than its module's


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(name)
    return getattr(import_module(where, __name__), _NAMED.get(name, name))

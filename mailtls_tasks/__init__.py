"""mailtls-tasks: rotate TLS certificates on Postfix and Dovecot, verified on the wire.

Public API::

    mailtls_tasks.deploy(target, cert_pem, key_pem, chain_pem=None, *, force=False,
                         broker_url=None) -> DeployHandle      # through Redis + a worker
    mailtls_tasks.run_local(config, target, cert_pem, key_pem, chain_pem=None, *, force=False)
                         -> DeployResult                       # in-process, no broker
    mailtls_tasks.load_config(path=None) -> HostConfig

``deploy`` is imported lazily: the core (config, steps, local runs) never loads Celery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .core.config import HostConfig, Target, VerifySettings, load_config
from .core.local import run_local
from .errors import MailTLSError
from .result import DeployResult

if TYPE_CHECKING:
    from .distributed.workflow import DeployHandle, deploy

__all__ = ["DeployHandle", "DeployResult", "HostConfig", "MailTLSError", "Target", "VerifySettings", "deploy",
           "load_config", "run_local"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("deploy", "DeployHandle"):
        from .distributed import workflow

        return getattr(workflow, name)
    raise AttributeError(name)

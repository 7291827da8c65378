"""mailtls-tasks: rotate TLS certificates on Postfix and Dovecot, verified on the wire."""

from .config import HostConfig, Target, VerifySettings, load_config
from .errors import MailTLSError
from .result import DeployResult

__all__ = ["DeployResult", "HostConfig", "MailTLSError", "Target", "VerifySettings", "load_config"]
__version__ = "0.1.0"

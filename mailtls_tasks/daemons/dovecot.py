"""Dovecot: IMAP and POP3 (143 and 110 with STARTTLS/STLS, 993 and 995 implicit TLS).

What Dovecot is to a deploy: ``doveconf -n`` tests its configuration and ``doveadm
reload`` makes it read the files again; until then its config process keeps serving
what it read when it started. It takes every layout: separate files (2.3 ``ssl_cert =
<file`` / ``ssl_key = <file``; 2.4 ``ssl_server_cert_file`` / ``ssl_server_key_file``),
one file holding key and chain (both settings naming it), and RSA + ECDSA side by side
(``ssl_alt_cert`` / ``ssl_alt_key``).

Reading Dovecot's own configuration (``doveconf``: 2.3 and 2.4 print it differently)
belongs in this module.
"""

from __future__ import annotations

from .interface import CommandDaemon, UsualListener

DAEMON = CommandDaemon(
    name="dovecot",
    defaults={
        "cert_path": "/etc/dovecot/certs/cert.pem",
        "key_path": "/etc/dovecot/certs/key.pem",
        "chain_path": "",
        "reload_command": "doveadm reload",
        "validate_command": "doveconf -n",
    },
    listeners=(
        UsualListener(143, "imap", "imap"),
        UsualListener(993, "imaps", "imaps"),
        UsualListener(110, "pop3", "pop3"),
        UsualListener(995, "pop3s", "pop3s"),
    ),
)

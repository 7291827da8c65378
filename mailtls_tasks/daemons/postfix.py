"""Postfix: the MTA (smtpd on 25, SMTPS on 465, submission on 587).

What Postfix is to a deploy: ``postfix check`` tests its configuration and ``postfix
reload`` makes new smtpd processes read the files (existing ones keep the old pair
until they exit: only a fresh handshake proves what is served). It takes every
layout: separate files (``smtpd_tls_cert_file`` / ``smtpd_tls_key_file``), the key
and chain in one file (``smtpd_tls_chain_files``, key first), and RSA + ECDSA side by
side (two pairs in ``smtpd_tls_chain_files``, or ``smtpd_tls_eccert_file``).

Reading Postfix's own configuration (``postconf -n``, ``-M``, ``-P``: which files and
listeners an instance really uses) belongs in this module.
"""

from __future__ import annotations

from .interface import CommandDaemon, UsualListener

DAEMON = CommandDaemon(
    name="postfix",
    defaults={
        "cert_path": "/etc/postfix/certs/cert.pem",
        "key_path": "/etc/postfix/certs/key.pem",
        "chain_path": "",
        "reload_command": "postfix reload",
        "validate_command": "postfix check",
    },
    listeners=(
        UsualListener(25, "smtp", "smtp"),
        UsualListener(465, "smtps", "smtps"),
        UsualListener(587, "smtp", "submission"),
    ),
)

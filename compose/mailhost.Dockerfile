# A mail host: Debian's Postfix and Dovecot, a self-signed starter certificate, and the
# mailtls worker. The worker's targets file is compose/targets.toml.
FROM python:3.11-slim-bookworm
RUN echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      postfix dovecot-imapd dovecot-pop3d openssl \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY mailtls_tasks /src/mailtls_tasks
RUN pip install --no-cache-dir "/src[flower]"
COPY compose/targets.toml /etc/mailtls/targets.toml
COPY compose/mailhost-entrypoint.sh /usr/local/bin/mailhost-entrypoint
RUN chmod 0755 /usr/local/bin/mailhost-entrypoint && chmod 0600 /etc/mailtls/targets.toml
ENTRYPOINT ["/usr/local/bin/mailhost-entrypoint"]
CMD ["mailtls", "worker"]

# The compose mail host (see compose/README.md): Debian's Postfix and Dovecot, each
# with its own certificate files, and the mailtls worker. Flower runs from this image
# too, with its own entrypoint (compose/docker-compose.yml).
# Build context: the repository root; compose/mailhost.Dockerfile.dockerignore keeps
# it to the files copied below (BuildKit, i.e. `docker compose`).
# BASE_IMAGE: any Debian 12 or 13 image with a python3 (the default is Docker Hub's);
# where no registry is reachable, scripts/podman-base-images.sh imports one made by
# debootstrap (compose/docker-compose.yml passes MAILTLS_BASE_IMAGE through).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# "No configuration": Debian's postfix then ships no main.cf; mailhost-setup makes one.
RUN echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      postfix dovecot-imapd dovecot-pop3d openssl \
 && { python3 -c 'import venv, ensurepip' 2>/dev/null \
      || DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv; } \
 && rm -rf /var/lib/apt/lists/*

COPY compose/mailhost-setup.sh /usr/local/sbin/mailhost-setup
# Dovecot 2.3 and 2.4 speak different config languages: mailhost-setup installs the one
# this image's Dovecot reads as conf.d/99-mailtls.conf.
COPY compose/dovecot-mailtls.conf compose/dovecot-mailtls-2.4.conf /usr/local/share/mailtls/
# Dovecot's postinst may link its certificate to ssl-cert's snakeoil pair: drop the links,
# so that the entrypoint makes real files there (a deploy would otherwise rewrite
# /etc/ssl/certs/ssl-cert-snakeoil.pem through them).
RUN sh /usr/local/sbin/mailhost-setup \
 && rm -f /etc/dovecot/private/dovecot.pem /etc/dovecot/private/dovecot.key \
 && install -d -m 0755 /etc/postfix/certs \
 && install -d -m 0700 /etc/dovecot/private /etc/mailtls /var/lib/mailtls /keys

COPY pyproject.toml README.md /src/
COPY mailtls_tasks /src/mailtls_tasks
# A venv of its own, as `make install` does: Debian's own python3 refuses a system-wide
# pip install (externally managed), the python images' does not mind either way.
RUN python3 -m venv /opt/mailtls \
 && /opt/mailtls/bin/pip install --no-cache-dir "/src[flower]" \
 && ln -sfn /opt/mailtls/bin/mailtls /usr/local/bin/mailtls

COPY compose/targets.toml /usr/local/share/mailtls/targets.toml
COPY compose/demo-cert.sh /usr/local/bin/demo-cert
COPY compose/mailhost-entrypoint.sh /usr/local/bin/mailhost-entrypoint
RUN chmod 0755 /usr/local/bin/demo-cert /usr/local/bin/mailhost-entrypoint \
 && chmod 0644 /usr/local/share/mailtls/targets.toml
ENV MAILTLS_CONFIG=/etc/mailtls/targets.toml
# 25 SMTP (STARTTLS), 465 SMTPS, 143 IMAP (STARTTLS), 993 IMAPS, 110 POP3 (STLS), 995 POP3S
EXPOSE 25 465 143 993 110 995
ENTRYPOINT ["/usr/local/bin/mailhost-entrypoint"]
CMD ["mailtls", "worker"]

#!/bin/sh
# The compose mail host (mx1): keys of distributed mode, the targets file, starter
# certificates, a certificate for the walk-through, then Postfix and Dovecot, then the
# command (default: `mailtls worker`). Idempotent: a restart keeps what exists.
# Only the "mailhost" service runs this; Flower has its own entrypoint.
set -eu
umask 022

# --- Keys of distributed mode (README "Security") --------------------------------------
# This host's X25519 key stays in /etc/mailtls (the mailtls-etc volume). The pipeline's
# Ed25519 signing key and its pipeline.toml go to the shared "keys" volume, so that you
# can run the pipeline's commands with `docker compose exec mailhost ...`. DEMO ONLY: a
# real pipeline keeps its key on its own machine, never on a mail host.
[ -s /etc/mailtls/host.key ] || mailtls keys init-host --out /etc/mailtls/host.key >/dev/null
[ -s /keys/pipeline.key ] || mailtls keys init-pipeline --out /keys/pipeline.key >/dev/null
host_pub=$(mailtls keys public /etc/mailtls/host.key)
signer=$(mailtls keys public /keys/pipeline.key)

# write_private FILE: stdin to FILE (0600), replaced in one rename
write_private() {
    rm -f "$1.tmp"
    (umask 077 && cat > "$1.tmp")
    mv -f "$1.tmp" "$1"
}

# The pipeline pins this host's public key (`mx1` is the targets file's host).
printf 'signing_key = "/keys/pipeline.key"\n\n[hosts]\nmx1 = "%s"\n' "$host_pub" \
    | write_private /keys/pipeline.toml

# The worker's targets file: the image's template plus a [security] table trusting the
# demo pipeline's key. Rewritten at every start, so it always matches the keys.
{
    cat /usr/local/share/mailtls/targets.toml
    printf '\n[security]\nhost_keys = ["/etc/mailtls/host.key"]\ntrusted_signers = ["%s"]\nmax_envelope_age = "1h"\n' \
        "$signer"
} | write_private /etc/mailtls/targets.toml

# --- Certificates ---------------------------------------------------------------------
# A demo CA (/keys/ca) issues a starter certificate for each daemon, in each daemon's own
# files, and one more for the walk-through's first deploy (/keys/incoming).
if [ ! -s /etc/postfix/certs/mail.pem ]; then
    starter=$(mktemp -d)
    demo-cert "$starter" >/dev/null
    # smtpd_tls_chain_files: the key first, then the certificate and its chain
    cat "$starter/privkey.pem" "$starter/fullchain.pem" | write_private /etc/postfix/certs/mail.pem
    rm -rf "$starter"
fi
if [ ! -s /etc/dovecot/private/dovecot.pem ] || [ ! -s /etc/dovecot/private/dovecot.key ]; then
    starter=$(mktemp -d)
    demo-cert "$starter" >/dev/null
    write_private /etc/dovecot/private/dovecot.key < "$starter/privkey.pem"
    install -m 0644 "$starter/fullchain.pem" /etc/dovecot/private/dovecot.pem
    rm -rf "$starter"
fi
[ -s /keys/incoming/fullchain.pem ] || demo-cert /keys/incoming >/dev/null

# Refuse to start on a targets file the worker would refuse.
mailtls check-config >/dev/null

# --- Daemons --------------------------------------------------------------------------
postfix start
# a pid file left by this container's previous run could name a live process now
rm -f /run/dovecot/master.pid
dovecot

exec "$@"

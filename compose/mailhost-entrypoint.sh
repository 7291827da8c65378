#!/bin/sh
# Start Postfix and Dovecot with a throwaway self-signed certificate, then the worker.
set -eu
mkdir -p /etc/postfix/certs /etc/dovecot/certs
if [ ! -s /etc/postfix/certs/cert.pem ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7 \
        -subj "/CN=mx1.compose.test" -keyout /etc/postfix/certs/key.pem -out /etc/postfix/certs/cert.pem 2>/dev/null
    chmod 0600 /etc/postfix/certs/key.pem
fi
ln -sf /etc/postfix/certs/cert.pem /etc/dovecot/certs/cert.pem
ln -sf /etc/postfix/certs/key.pem /etc/dovecot/certs/key.pem
postconf -e "smtpd_tls_cert_file=/etc/postfix/certs/cert.pem" "smtpd_tls_key_file=/etc/postfix/certs/key.pem" \
    "smtpd_tls_security_level=may" "maillog_file=/dev/stdout" "mydestination=" \
    "inet_interfaces=all"
postconf -M "submissions/inet=submissions inet n - y - - smtpd -o smtpd_tls_wrappermode=yes"
cat > /etc/dovecot/conf.d/99-mailtls.conf <<CONF
ssl = yes
ssl_cert = </etc/dovecot/certs/cert.pem
ssl_key = </etc/dovecot/certs/key.pem
protocols = imap pop3
CONF
# Keys of distributed mode: this host's key, and (for the demo) a pipeline key in the
# shared /keys volume, pinned to this host. Real pipelines keep their key elsewhere.
mkdir -p /keys
[ -s /etc/mailtls/host.key ] || mailtls keys init-host --out /etc/mailtls/host.key >/dev/null
[ -s /keys/pipeline.key ] || mailtls keys init-pipeline --out /keys/pipeline.key >/dev/null
HOST_PUB=$(mailtls keys public /etc/mailtls/host.key)
SIGNER=$(mailtls keys public /keys/pipeline.key)
printf 'signing_key = "/keys/pipeline.key"\n[hosts]\nmx1 = "%s"\n' "$HOST_PUB" > /keys/pipeline.toml
if ! grep -q '^\[security\]' /etc/mailtls/targets.toml; then
    printf '\n[security]\nhost_keys = ["/etc/mailtls/host.key"]\ntrusted_signers = ["%s"]\n' "$SIGNER" \
        >> /etc/mailtls/targets.toml
fi
postfix start
dovecot
exec "$@"

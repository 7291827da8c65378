#!/bin/sh
# Build-time configuration of the image's Postfix (run once by mailhost.Dockerfile).
# POSTFIX_DIR (default /etc/postfix) lets tests/unit/test_compose.py run it against a
# scratch copy with `postconf -c`.
#
# Debian's postfix installed with debconf "No configuration" ships a master.cf but no
# main.cf, and `postconf -e` has nothing to edit: start from Debian's own minimal one.
set -eu
pf=${POSTFIX_DIR:-/etc/postfix}

[ -s "$pf/main.cf" ] || cp /usr/share/postfix/main.cf.debian "$pf/main.cf"
[ -s "$pf/master.cf" ] || cp /usr/share/postfix/master.cf.dist "$pf/master.cf"

# TLS: one file with the key, then the certificate and its chain (smtpd_tls_chain_files,
# Postfix >= 3.4): the "smtp" target of compose/targets.toml replaces it in one rename
# (combined_path), so no smtpd ever reads a new key with an old certificate.
# No syslog in the container: Postfix logs to a file (postlogd, under /var).
postconf -c "$pf" -e \
    "myhostname = mail.compose.test" \
    "mydestination =" \
    "relayhost =" \
    "inet_interfaces = all" \
    "inet_protocols = ipv4" \
    "mynetworks = 127.0.0.0/8" \
    "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination" \
    "alias_maps =" \
    "alias_database =" \
    "maillog_file = /var/log/postfix.log" \
    "smtpd_tls_chain_files = /etc/postfix/certs/mail.pem" \
    "smtpd_tls_security_level = may" \
    "smtpd_tls_loglevel = 1"

# Port 25 (Debian's "smtp inet" service) offers STARTTLS; 465 is SMTPS, TLS from the
# first byte (wrapper mode), with the same certificate.
postconf -c "$pf" -M "465/inet = 465 inet n - n - - smtpd"
postconf -c "$pf" -P "465/inet/smtpd_tls_wrappermode = yes" "465/inet/smtpd_tls_security_level = encrypt"
# No chroot: Debian's init script would populate /var/spool/postfix for it; here nothing does.
postconf -c "$pf" -F "*/*/chroot = n"

# Dovecot: the mailtls settings in the language of the Dovecot installed (2.3 on
# Debian 12, 2.4 on Debian 13). DOVECOT_DIR and SHARE as POSTFIX_DIR above.
dv=${DOVECOT_DIR:-/etc/dovecot}
share=${SHARE:-/usr/local/share/mailtls}
case "$(dovecot --version 2>/dev/null)" in
    2.3*) conf=dovecot-mailtls.conf ;;
    *) conf=dovecot-mailtls-2.4.conf ;;
esac
install -m 0644 "$share/$conf" "$dv/conf.d/99-mailtls.conf"

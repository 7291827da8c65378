#!/bin/sh
# Install what `make test` / `make demo` need on a Debian machine, only if missing.
# Never starts or configures the system's own Postfix/Dovecot/Redis: the tests and
# the demo run private instances from temporary directories.
set -eu

need=""
command -v redis-server >/dev/null 2>&1 || need="$need redis-server"
[ -x /usr/sbin/postfix ] || need="$need postfix"
[ -x /usr/sbin/dovecot ] || need="$need dovecot-imapd dovecot-pop3d"
[ -x /usr/bin/doveadm ] || case "$need" in *dovecot-imapd*) ;; *) need="$need dovecot-imapd" ;; esac
command -v openssl >/dev/null 2>&1 || need="$need openssl"
command -v script >/dev/null 2>&1 || need="$need bsdutils"
command -v strace >/dev/null 2>&1 || need="$need strace"      # the fault matrix injects with it
command -v pgrep >/dev/null 2>&1 || need="$need procps"
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then need="$need python3-venv"; fi

if [ -n "$need" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "bootstrap: missing:$need -- run as root or: sudo apt-get install$need" >&2
        exit 1
    fi
    echo "bootstrap: installing$need"
    # A satellite-less, unconfigured Postfix: we never use the system instance.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null || true
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $need >/dev/null
fi

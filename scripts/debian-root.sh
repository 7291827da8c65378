#!/bin/sh
# Build, once, a Debian root a test lane runs in, and keep it. About a minute and
# 300-400 MiB the first time; a root already built for the same package list is kept as
# it is. Never touches the machine's own /etc or daemons.
#
#   trixie          Debian 13: Postfix 3.10, Dovecot 2.4, Redis 8, Python 3.13 and the tools
#                   the real-daemon suites use (the Debian 13 lane, systemd, podman images)
#   exim-bookworm   Debian 12 with Exim 4.96 (exim4-daemon-light) installed by apt as an
#   exim-trixie     operator has it -- Debian-exim, /etc/exim4, update-exim4.conf, the
#                   init script -- and Dovecot, Redis, GnuTLS's tools: the Exim lane.
#                   Debian 13: Exim 4.98. (Exim conflicts with Postfix: a root of its own.)
#
#   scripts/debian-root.sh KIND           # prints the root's path
#   MAILTLS_TRIXIE_ROOT=DIR ...           # the trixie root elsewhere than /var/cache/mailtls-tests/trixie
set -eu
KIND=${1:-trixie}
case "$KIND" in
    trixie)
        SUITE=trixie
        ROOT=${MAILTLS_TRIXIE_ROOT:-/var/cache/mailtls-tests/trixie}
        PKGS=postfix,postfix-lmdb,dovecot-imapd,dovecot-pop3d,redis-server,python3,python3-venv,openssl,ca-certificates
        PKGS=$PKGS,strace,procps,util-linux,bsdutils,git,make,unbound,nsd,ldnsutils,certbot,pebble
        # certtool: the unit tests of Exim's GnuTLS file check
        PKGS=$PKGS,gnutls-bin
        # debootstrap resolves no virtual packages: what certbot's python3-cryptography needs, by name
        PKGS=$PKGS,python3-cffi-backend
        # systemd as PID 1 under systemd-nspawn (the systemd lane)
        PKGS=$PKGS,systemd,systemd-sysv,dbus
        WANT="mailtls trixie root v1: $PKGS" ;;
    exim-bookworm|exim-trixie)
        SUITE=${KIND#exim-}
        ROOT=/var/cache/mailtls-tests/$KIND
        # exim4-daemon-light pulls exim4-base and exim4-config (the stock update-exim4.conf set-up)
        PKGS=exim4-daemon-light,gnutls-bin,dovecot-imapd,dovecot-pop3d,redis-server,python3,python3-venv
        PKGS=$PKGS,openssl,ca-certificates,strace,procps,util-linux,make,git
        # exim4-base wants cron, whose trixie package wants systemd (or a sysusers): named
        # here, debootstrap installs it in order; left to the resolver, it does not
        [ "$SUITE" = trixie ] && PKGS=$PKGS,systemd,systemd-sysv
        WANT="mailtls $KIND root v1: $PKGS" ;;
    *) echo "debian-root: unknown root $KIND (trixie, exim-bookworm, exim-trixie)" >&2; exit 2 ;;
esac
ROOT=${ROOT%/}
case "$ROOT" in
    /?*/?*) ;;  # at least two levels deep: it is removed and rebuilt when its package list changes
    *) echo "debian-root: $ROOT: an absolute path at least two levels deep, please" >&2; exit 1 ;;
esac
if [ -f "$ROOT/.mailtls-root" ] && [ "$(cat "$ROOT/.mailtls-root")" = "$WANT" ]; then
    echo "$ROOT"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "debian-root: building a Debian root needs root" >&2
    exit 1
fi
# One build at a time: a second caller waits for the first, then finds the root built.
mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
flock 9
if [ -f "$ROOT/.mailtls-root" ] && [ "$(cat "$ROOT/.mailtls-root")" = "$WANT" ]; then
    echo "$ROOT"
    exit 0
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    echo "debian-root: installing debootstrap" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi
# The mirror this machine's own apt uses (Debian's packages are what it can reach).
MIRROR=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null \
         | grep -v security | head -n 1)
[ -n "$MIRROR" ] || MIRROR=$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian

NEW="$ROOT.new"
rm -rf "$NEW"
mkdir -p "$NEW/usr/sbin"
# Packages are installed, never started: no daemon of the root runs until a test starts it.
printf '#!/bin/sh\nexit 101\n' > "$NEW/usr/sbin/policy-rc.d"
chmod 0755 "$NEW/usr/sbin/policy-rc.d"
echo "debian-root: debootstrap $SUITE from $MIRROR into $NEW" >&2
debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$NEW" "$MIRROR" >"$NEW.log" 2>&1 || {
    tail -n 30 "$NEW.log" >&2
    exit 1
}
echo "$WANT" > "$NEW/.mailtls-root"
rm -rf "$ROOT"
mv "$NEW" "$ROOT"
mv "$NEW.log" "$ROOT.log"
echo "$ROOT"

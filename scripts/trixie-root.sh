#!/bin/sh
# Build, once, the Debian 13 (trixie) root the second test lane runs in, and keep it:
# Postfix 3.10, Dovecot 2.4, Redis 8, Python 3.13 and the tools the real-daemon suites
# use. About a minute and 400 MiB the first time; a root already built for the same
# package list is kept as it is. Never touches the machine's own /etc or daemons.
#
#   scripts/trixie-root.sh            # prints the root's path
#   MAILTLS_TRIXIE_ROOT=DIR ...       # elsewhere than /var/cache/mailtls-tests/trixie
set -eu
ROOT=${MAILTLS_TRIXIE_ROOT:-/var/cache/mailtls-tests/trixie}
ROOT=${ROOT%/}
case "$ROOT" in
    /?*/?*) ;;  # at least two levels deep: it is removed and rebuilt when its package list changes
    *) echo "trixie-root: MAILTLS_TRIXIE_ROOT=$ROOT: an absolute path at least two levels deep, please" >&2; exit 1 ;;
esac
PKGS=postfix,postfix-lmdb,dovecot-imapd,dovecot-pop3d,redis-server,python3,python3-venv,openssl,ca-certificates
PKGS=$PKGS,strace,procps,util-linux,bsdutils,git,make,unbound,nsd,ldnsutils,certbot,pebble
# debootstrap resolves no virtual packages: what certbot's python3-cryptography needs, by name
PKGS=$PKGS,python3-cffi-backend
# systemd as PID 1 under systemd-nspawn (the systemd lane)
PKGS=$PKGS,systemd,systemd-sysv,dbus
WANT="mailtls trixie root v1: $PKGS"

if [ -f "$ROOT/.mailtls-root" ] && [ "$(cat "$ROOT/.mailtls-root")" = "$WANT" ]; then
    echo "$ROOT"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "trixie-root: building the Debian 13 root needs root" >&2
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
    echo "trixie-root: installing debootstrap" >&2
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
echo "trixie-root: debootstrap trixie from $MIRROR into $NEW" >&2
debootstrap --variant=minbase --include="$PKGS" trixie "$NEW" "$MIRROR" >"$NEW.log" 2>&1 || {
    tail -n 30 "$NEW.log" >&2
    exit 1
}
echo "$WANT" > "$NEW/.mailtls-root"
rm -rf "$ROOT"
mv "$NEW" "$ROOT"
mv "$NEW.log" "$ROOT.log"
echo "$ROOT"

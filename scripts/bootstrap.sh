#!/bin/sh
# Install what `make test` (`bootstrap.sh test`, the default) or `make demo`
# (`bootstrap.sh demo`: the daemons alone) need on a Debian machine, only if missing,
# and say what it installs. The demo: redis-server, postfix, postfix-lmdb,
# dovecot-imapd, dovecot-pop3d, openssl, procps, util-linux, python3-venv -- nothing
# the tests alone use (chromium, unbound, nsd, certbot, pebble, podman, ...).
# Never starts or configures the system's own Postfix/Dovecot/Redis: the tests and
# the demo run private instances from temporary directories.
set -eu
for_what=${1:-test}

need=""
command -v redis-server >/dev/null 2>&1 || need="$need redis-server"
[ -x /usr/sbin/postfix ] || need="$need postfix"
# lmdb: tables (the SNI map, tls_server_sni_maps = lmdb:...) are a plugin of their own
[ -e /usr/lib/postfix/postfix-lmdb.so ] || need="$need postfix-lmdb"
[ -x /usr/sbin/dovecot ] || need="$need dovecot-imapd dovecot-pop3d"
[ -x /usr/bin/doveadm ] || case "$need" in *dovecot-imapd*) ;; *) need="$need dovecot-imapd" ;; esac
command -v openssl >/dev/null 2>&1 || need="$need openssl"
command -v pgrep >/dev/null 2>&1 || need="$need procps"  # the demo's stand-in reload commands find their runs
command -v unshare >/dev/null 2>&1 || need="$need util-linux"  # the fleet (demo, tests): a mount namespace per host
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then need="$need python3-venv"; fi
if [ "$for_what" = test ]; then
    command -v strace >/dev/null 2>&1 || need="$need strace"      # the fault matrix injects with it
    command -v certtool >/dev/null 2>&1 || need="$need gnutls-bin"  # Exim's TLS library: its file check's unit tests
    [ -x /usr/bin/chromium ] || need="$need chromium"              # a screenshot of Flower's task list
    [ -x /usr/sbin/unbound ] || need="$need unbound"               # DANE: a validating resolver ...
    [ -x /usr/sbin/nsd ] || need="$need nsd"                       # ... an authoritative server ...
    command -v ldns-signzone >/dev/null 2>&1 || need="$need ldnsutils"  # ... and a signed zone
    command -v certbot >/dev/null 2>&1 || need="$need certbot"     # the certbot hook, renewed for real ...
    command -v pebble >/dev/null 2>&1 || need="$need pebble"       # ... against a real ACME server
    command -v systemd-analyze >/dev/null 2>&1 || need="$need systemd"  # `systemd-analyze verify` of the units
    command -v debootstrap >/dev/null 2>&1 || need="$need debootstrap"  # the Debian 13 lane's root (scripts/trixie-root.sh)
    command -v systemd-nspawn >/dev/null 2>&1 || need="$need systemd-container"  # ... booted with systemd as PID 1 (tests/systemd)
    command -v podman >/dev/null 2>&1 || need="$need podman"                  # compose/ for real (tests/compose) ...
    command -v runc >/dev/null 2>&1 || need="$need runc"                      # ... with runc (crun refuses hybrid cgroups),
    [ -x /usr/libexec/podman/catatonit ] || need="$need catatonit"            # ... the compose file's `init: true`,
    # ... and the compose services' names: podman 4.3 (Debian 12) resolves them through
    # CNI's dnsname plugin, podman 5 (Debian 13) through netavark's aardvark-dns
    if [ "$(. /etc/os-release && echo "$VERSION_ID")" = 12 ]; then
        [ -x /usr/lib/cni/dnsname ] || need="$need golang-github-containernetworking-plugin-dnsname"
    else
        [ -x /usr/lib/podman/aardvark-dns ] || need="$need aardvark-dns"
        # netavark's firewall is nftables (only recommended, and so not installed by
        # --no-install-recommends): without nft every container with a network fails
        command -v nft >/dev/null 2>&1 || need="$need nftables"
    fi
fi

if [ -n "$need" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "bootstrap: missing:$need -- run as root or: sudo apt-get install$need" >&2
        exit 1
    fi
    echo "bootstrap: installing$need"
    # A satellite-less, unconfigured Postfix: we never use the system instance.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null || true
    export DEBIAN_FRONTEND=noninteractive
    # Install daemons without starting them (Debian's policy-rc.d): the tests run their
    # own private instances; a system unbound or nsd on port 53 is nobody's wish here.
    guard=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d && guard=1
    fi
    apt-get update -qq
    # shellcheck disable=SC2086
    rc=0
    apt-get install -y -qq --no-install-recommends $need >/dev/null || rc=$?
    if [ -n "$guard" ]; then rm -f /usr/sbin/policy-rc.d; fi
    if [ "$rc" != 0 ]; then echo "bootstrap: apt-get install failed ($rc)" >&2; exit "$rc"; fi
fi

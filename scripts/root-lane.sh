#!/bin/sh
# A lane of `make test` run in a cached Debian root (scripts/debian-root.sh builds it). By
# default the Debian 13 lane: the unit and real-daemon suites (local, distributed, e2e and
# the fault matrix's slice) against trixie's Postfix 3.10, Dovecot 2.4, Redis 8 and
# Python 3.13. With --root exim-bookworm / exim-trixie: the Exim suite (tests/exim)
# against Debian 12's Exim 4.96 / Debian 13's 4.98, installed there as an operator has it.
#
#   scripts/root-lane.sh                      # the Debian 13 lane's suites
#   scripts/root-lane.sh make demo            # any command, run in a fresh copy of the tree
#   scripts/root-lane.sh --root exim-trixie   # the Exim suite in the Debian 13 Exim root
#   scripts/root-lane.sh --as-host make test  # as on a Debian 13 machine (make test-as-trixie)
#
# Everything happens in a mount namespace of its own: the root's /proc, /dev, a fresh
# /tmp and /run, this machine's pip set-up (read-only, so pip inside resolves what pip
# outside does) are mounted for this run only and vanish with it. The tree is copied
# into the root (without .venv and caches), never mounted: nothing inside writes here.
#
# --as-host: the root is a Debian 13 machine of its own for this run, as far as a chroot
# can be one: a throw-away copy of the cached root (what its bootstrap installs, podman's
# images, its venv vanish with it), /sys with the cgroups (systemd-nspawn and podman need
# them), and this machine's /var/cache/mailtls-tests, so that the systemd and compose
# suites inside find the cached root they boot and import instead of building another.
set -eu
cd "$(dirname "$0")/.."
AS_HOST=""
KIND=trixie
while :; do
    case "${1:-}" in
        --as-host) AS_HOST=1; shift ;;
        --root) KIND=$2; shift 2 ;;
        *) break ;;
    esac
done
ROOT=$(sh scripts/debian-root.sh "$KIND")
WORK=""
if [ -n "$AS_HOST" ]; then
    WORK=$(mktemp -d /var/tmp/mailtls-trixie-host.XXXXXX)
    trap 'rm -rf "$WORK"' EXIT
    trap 'exit 130' INT TERM
    echo "trixie lane: copying the root to $WORK for this run" >&2
    cp -a "$ROOT" "$WORK/root"
    ROOT=$WORK/root
fi
if [ "$#" -eq 0 ] && [ "$KIND" != trixie ]; then
    # Not through make: its bootstrap would want Postfix, which conflicts with Exim.
    set -- .venv/bin/pytest -q -ra -p no:cacheprovider --durations=5 tests/exim
elif [ "$#" -eq 0 ]; then
    # ruff, the layer contracts and mypy under Python 3.13 (the root has every package
    # `make demo` needs, so its bootstrap installs nothing), then the suites. Flower's task
    # list, looked at in a headless Chromium, is the same page on both lanes: it is looked
    # at in the Debian 12 lane only (Chromium would double the root).
    set -- sh -c 'make -s lint typecheck BOOTSTRAP_FOR=demo && exec .venv/bin/pytest -q -ra -p no:cacheprovider \
        --durations=5 tests/unit tests/local tests/integration tests/e2e \
        --deselect tests/e2e/test_fleet.py::test_flower_task_list_shows_target_deploy_and_outcome'
fi

# Files and folders the machine's pip reads (its config, and whatever that names).
PIPS=""
for p in /etc/pip.conf /etc/xdg/pip /root/.config/pip /root/.pip /opt/wheels /opt/pypi /opt/pypi-more; do
    [ -e "$p" ] && PIPS="$PIPS $p"
done

# Not exec'd: with --as-host the EXIT trap removes the copy; the script's status is unshare's.
unshare --mount --propagation private -- sh -eu -c '
ROOT=$1; shift; PIPS=$1; shift; AS_HOST=$1; shift; KIND=$1; shift
mount --bind "$ROOT" "$ROOT"
mount -t proc proc "$ROOT/proc"
mount --rbind /dev "$ROOT/dev"
if [ -n "$AS_HOST" ]; then
    mount --rbind /sys "$ROOT/sys"
    mkdir -p /var/cache/mailtls-tests "$ROOT/var/cache/mailtls-tests"
    mount --bind /var/cache/mailtls-tests "$ROOT/var/cache/mailtls-tests"
    # podman'"'"'s images and build cache outlive the copy: the compose suite builds once
    mkdir -p /var/cache/mailtls-tests/trixie-containers "$ROOT/var/lib/containers"
    mount --bind /var/cache/mailtls-tests/trixie-containers "$ROOT/var/lib/containers"
fi
mount -t tmpfs -o mode=1777 tmpfs "$ROOT/tmp"
mount -t tmpfs -o mode=0755 tmpfs "$ROOT/run"
if [ "$KIND" != trixie ]; then
    # The Exim suite writes Exim'"'"'s own configuration (trusted_configs, localmacros,
    # /etc/default/exim4, update-exim4.conf'"'"'s output): over a copy of it for this run
    # alone, so that the cached root keeps the files as the package left them.
    for d in /etc/exim4 /var/lib/exim4; do
        mkdir -p "$ROOT/tmp/.keep$d" && cp -a "$ROOT$d/." "$ROOT/tmp/.keep$d/"
        mount -t tmpfs -o mode=0755 tmpfs "$ROOT$d" && cp -a "$ROOT/tmp/.keep$d/." "$ROOT$d/"
    done
    cp -a "$ROOT/etc/default/exim4" "$ROOT/tmp/.keep-default-exim4"
    mount --bind "$ROOT/tmp/.keep-default-exim4" "$ROOT/etc/default/exim4"
fi
mkdir -p "$ROOT/run/lock"
# this machine'"'"'s PIP_* settings (an index URL may hold a password): through a file of
# this run'"'"'s /run, 0600, never on a command line that ps shows
(umask 077; env | grep "^PIP_" | sed "s/'"'"'/'"'"'\\\\'"'"''"'"'/g; s/=/='"'"'/; s/\$/'"'"'/" > "$ROOT/run/mailtls-pip.env" || true)
for p in $PIPS; do
    if [ -d "$p" ]; then mkdir -p "$ROOT$p"; else mkdir -p "$ROOT$(dirname "$p")"; touch "$ROOT$p"; fi
    mount --bind "$p" "$ROOT$p" && mount -o remount,bind,ro "$ROOT$p"
done
# this machine may reach the package index through a CA of its own: trust its bundle inside
mount --bind /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
mount -o remount,bind,ro "$ROOT/etc/ssl/certs/ca-certificates.crt"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
# the tree, copied into a /src of this run alone (a tmpfs in this mount namespace): two
# lanes at once never see the other tree, and nothing of it stays in the root
mkdir -p "$ROOT/src" && mount -t tmpfs -o mode=0755 tmpfs "$ROOT/src"
tar -C . --exclude=./.venv --exclude="*.egg-info" --exclude=__pycache__ --exclude=.pytest_cache \
    --exclude=.mypy_cache --exclude=.ruff_cache --exclude=./build --exclude=./dist -cf - . | tar -C "$ROOT/src" -xf -
# one venv per pyproject.toml, kept in the root between runs
sum=$(sha256sum pyproject.toml | cut -c1-12)
if [ -n "$AS_HOST" ]; then
    # The root becomes this mount namespace'"'"'s root (pivot_root), not a chroot in it: the
    # kernel refuses a user namespace to a chrooted process (systemd'"'"'s PrivateUsers= in the
    # nspawn machines inside), and nspawn'"'"'s own root moves would land on the chroot.
    cd "$ROOT" && mkdir -p .host && pivot_root . .host && umount -l /.host && rmdir /.host && cd /
    ROOT=/
fi
exec chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 CI="${CI:-}" MAILTLS_LANE="$KIND" VENV_SUM="$sum" sh -eu -c "
set -a; . /run/mailtls-pip.env; set +a
cd /src
venv=/opt/mailtls-venv-\$VENV_SUM
if [ ! -x \$venv/bin/python ]; then
    rm -rf /opt/mailtls-venv-*
    python3 -m venv \$venv
    \$venv/bin/pip install -q --upgrade pip >/tmp/pip.log 2>&1 || { cat /tmp/pip.log; exit 1; }
fi
# the dependencies are in place after the first run: seconds
\$venv/bin/pip install -q -e \".[dev]\" >/tmp/pip.log 2>&1 || { cat /tmp/pip.log; exit 1; }
rm -rf .venv && ln -s \$venv .venv
echo \"\$MAILTLS_LANE lane: \$(. /etc/os-release; echo \$PRETTY_NAME), \$(python3 --version), postfix \$(postconf -h mail_version 2>/dev/null), exim \$(exim4 -bV 2>/dev/null | head -n 1 | cut -d\\  -f3), dovecot \$(dovecot --version | cut -d\\  -f1), \$(redis-server --version | cut -d\\  -f3)\"
exec \"\$@\"
" sh "$@"
' sh "$ROOT" "$PIPS" "$AS_HOST" "$KIND" "$@"

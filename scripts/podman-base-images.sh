#!/bin/sh
# Base images for compose/ under podman where no container registry is reachable: the
# Debian 13 root that scripts/trixie-root.sh builds (Postfix, Dovecot, Redis, Python 3),
# imported as localhost/mailtls-debian:trixie, once per root. Prints the image's name;
# compose/docker-compose.yml takes it as MAILTLS_BASE_IMAGE and MAILTLS_REDIS_IMAGE.
set -eu
cd "$(dirname "$0")/.."
ROOT=$(sh scripts/trixie-root.sh)
IMAGE=localhost/mailtls-debian:trixie
STAMP=$(sha256sum "$ROOT/.mailtls-root" | cut -c1-16)
if [ "$(podman image inspect --format '{{index .Labels "mailtls.root"}}' "$IMAGE" 2>/dev/null || true)" = "$STAMP" ]; then
    echo "$IMAGE"
    exit 0
fi
# a plain Debian root: what the other tests put into it stays out. Through a file, not a
# pipe: a tar that fails must not leave an image labelled as whole.
tarball=$(mktemp /var/tmp/mailtls-base.XXXXXX.tar)
trap 'rm -f "$tarball"' EXIT
tar -C "$ROOT" --exclude=./proc --exclude=./dev --exclude=./sys --exclude=./src --exclude='./opt/*' \
    --exclude=./usr/local/bin/mailtls --exclude=./root/.cache --exclude=./etc/resolv.conf -cf "$tarball" .
podman import --change "LABEL mailtls.root=$STAMP" --change 'CMD ["/bin/bash"]' "$tarball" "$IMAGE" >/dev/null
echo "$IMAGE"

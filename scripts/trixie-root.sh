#!/bin/sh
# The Debian 13 root of the second test lane (scripts/debian-root.sh trixie): prints its path.
exec sh "$(dirname "$0")/debian-root.sh" trixie

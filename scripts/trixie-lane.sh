#!/bin/sh
# The Debian 13 lane (scripts/root-lane.sh in the trixie root); its arguments are root-lane.sh's.
exec sh "$(dirname "$0")/root-lane.sh" "$@"

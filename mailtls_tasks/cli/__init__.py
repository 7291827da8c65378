"""The ``mailtls`` command: one module per command group, click as the parser.

    root       the click group, every command attached; exit codes; the fast exit
    deploy     deploy (--local or through Redis), rollout, rollout-status
    fleet      status, history, targets, audit, forget: what Redis knows of the fleet
    services   worker, recover, flower, check-config: what a host's units run
    discover   a targets file proposed from the daemons' own configuration
    certbot    certbot-hook
    dane       dane next
    keys       keys init-host, init-pipeline, public, trusted
    common     what they share: inputs, output, exit codes, options
    early      the early start of a local deploy's validate_command

Exit codes: 0 deployed/unchanged, 2 rejected, 3 rolled_back, 4 failed, 1 usage or
infrastructure error (config unreadable, broker down, target busy too long).

A command module parses and prints; the work is the core's (in-process) or the
distributed adapter's (through Redis). Importing this package loads nothing but
this file: ``main`` starts a local deploy's validate_command before click and the
rest load (``early``).
"""

from __future__ import annotations

import sys


def main() -> None:
    """The ``mailtls`` entry point: the early start, then the command line; whatever
    ends the command, an early run nobody collected is killed."""
    from .early import cancel_early, start_early

    try:
        start_early(sys.argv[1:])
        from .root import main as run

        run()
    finally:
        cancel_early()

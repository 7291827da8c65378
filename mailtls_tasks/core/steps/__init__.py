"""The six steps of a deploy, as plain functions over the host's filesystem, one
module each, in the order a deploy runs them:

    stage -> validate -> commit -> reload -> verify        rollback: the compensation

and what they share: ``context`` (the ``StepContext`` every step takes), ``phases``
(the phase ladder, the step's record, how a deploy ends), ``live`` (what a live file
holds, for the compare-and-swap) and ``served`` (what the daemon serves on the wire).
No Celery here: the in-process runner and the Celery tasks call the same functions.
A new check a step makes goes in that step's module; what a daemon does differently
goes in ``daemons/``, never here.

The protocol they implement is docs/protocol.md. In short:

* each step is keyed by ``deploy_id`` and recorded in the host journal; running it
  again returns the record (idempotent), a finished deploy is never touched again,
  and forward steps never act on a deploy that is rolling back;
* stage **claims** the deploy's real files (owner entries); the deploy owns them until
  it finishes; the caller holds their flocks around every call (``ownership.holding``
  for stage, ``Journal.lock_files(rec.claimed)`` after it);
* commit and rollback are **compare-and-swap** on the files: they act only on files
  that hold exactly the bytes they expect, and stop (reporting what is live) otherwise;
* a step marks ``in_step`` while it runs and renews a distributed deploy's lease, so
  recovery can tell a deploy that died from one that is waiting for its next message.
"""

"""The core: config, files, material, the journal and the deploy protocol, the steps
(``steps/``, one module each), probes, the local runner and a host's side of
distributed deploys.

No Celery, no Redis here (an import-linter contract checks it). What one daemon does
differently from another is asked of ``daemons/``, below; messages, queues and the
fleet's view are the ``distributed`` adapter's, above.
"""

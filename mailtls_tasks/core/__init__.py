"""The core: config, files, material, the journal and the deploy protocol, steps, probes,
the local runner and a host's side of distributed deploys. No Celery, no Redis here."""

"""The Celery + Redis adapter: app, tasks, workflow, coordination, worker. It passes
names and references to the core and never touches a file."""

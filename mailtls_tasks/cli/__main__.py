"""``python -m mailtls_tasks.cli``: the command line without the early start (what the
test harnesses and the fault matrix run; the ``mailtls`` entry point adds it)."""

from .root import main

if __name__ == "__main__":
    main()

"""Real executables standing in for `postfix reload` and friends.

Each script appends its argv to ``<dir>/<name>.log``, exits with the number in
``<dir>/<name>.rc`` (0 if absent), sleeps ``<dir>/<name>.sleep`` seconds first if that
exists (``.sleep-once`` sleeps once and is removed: a transient hang), and touches
``<dir>/<name>.touch`` target paths listed in ``<dir>/<name>.touches`` (how a fake
reload tells a test TLS server to re-read its files).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = '''#!{python}
import os, sys, time
d, name = {d!r}, {name!r}
p = lambda ext: os.path.join(d, name + ext)
with open(p(".log"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if os.path.exists(p(".sleep-once")):
    s = float(open(p(".sleep-once")).read() or 0); os.unlink(p(".sleep-once")); time.sleep(s)
if os.path.exists(p(".sleep")):
    time.sleep(float(open(p(".sleep")).read() or 0))
if os.path.exists(p(".touches")):
    for line in open(p(".touches")).read().split():
        open(line, "a").close()
rc = int(open(p(".rc")).read().strip()) if os.path.exists(p(".rc")) else 0
if os.path.exists(p(".rc-once")):
    rc = int(open(p(".rc-once")).read().strip()); os.unlink(p(".rc-once"))
print(name, "ran", rc)
sys.exit(rc)
'''


class FakeCommand:
    def __init__(self, directory: Path, name: str) -> None:
        self.dir = directory
        self.name = name
        self.path = directory / name
        self.path.write_text(SCRIPT.format(python=sys.executable, d=str(directory), name=name))
        os.chmod(self.path, 0o755)

    def _f(self, ext: str) -> Path:
        return self.dir / (self.name + ext)

    @property
    def calls(self) -> list[str]:
        f = self._f(".log")
        return f.read_text().splitlines() if f.exists() else []

    def fail(self, rc: int = 1) -> None:
        self._f(".rc").write_text(str(rc))

    def fail_once(self, rc: int = 1) -> None:
        self._f(".rc-once").write_text(str(rc))

    def succeed(self) -> None:
        self._f(".rc").unlink(missing_ok=True)

    def hang_once(self, seconds: float) -> None:
        self._f(".sleep-once").write_text(str(seconds))

    def hang(self, seconds: float) -> None:
        self._f(".sleep").write_text(str(seconds))

    def touches(self, *paths: Path) -> None:
        self._f(".touches").write_text("\n".join(str(p) for p in paths))

    def running(self, settle: float = 5.0) -> list[int]:
        """Pids of processes still running this command, once they have had up to
        ``settle`` seconds to go (a killed group takes a moment; a zombie, its command
        line gone, does not count)."""
        deadline = time.monotonic() + settle
        while True:
            out = subprocess.run(["pgrep", "-f", str(self.path)], capture_output=True, text=True).stdout
            pids = [int(p) for p in out.split()]
            if not pids or time.monotonic() >= deadline:
                return pids
            time.sleep(0.02)

    def reset(self) -> None:
        self._f(".log").unlink(missing_ok=True)

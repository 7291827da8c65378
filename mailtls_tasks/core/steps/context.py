"""What every step is given: the target, the host journal, the host's name.

``StepContext`` is the one argument of every step function; ``HostContexts`` makes
them for a host's targets on first use. ``target_reals``: the real files a deploy
owns while it runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...commands import CommandResult, Running
from ...errors import Rejected
from ...ids import check_deploy_id
from .. import files
from ..config import HostConfig, Target
from ..journal import DeployRecord, Journal

if TYPE_CHECKING:
    from ..sni import TableRead

DEFAULT_LEASE = 600.0


@dataclass
class BatchRun:
    """What the members of one batch share while it runs (``core.batch``): the
    members' targets; each validate_command's verdict, run once for them all; the
    reload commands run once for them all; and, per member whose record carries an
    SNI table, the members whose entries that table was built with. And what every
    member would otherwise read or probe again: each SNI table's source as read
    (``tables_read``; a batch writes compiled tables, never a source), and what each
    listener serves without SNI (``default_now``; forgotten at each reload), so that a
    batch of a hundred names reads a table of a thousand once, not a hundred times."""

    members: tuple[str, ...]
    targets: dict[str, Target] = field(default_factory=dict)
    # the members' own deploy ids and the batch's, when they differ (a batch through
    # the workers: DeployRecord.batch_ids); empty when every member has the batch's id
    ids: dict[str, str] = field(default_factory=dict)
    batch_id: str | None = None
    verdicts: dict[str, CommandResult] = field(default_factory=dict)
    reloaded: set[tuple[str, str, str]] = field(default_factory=set)
    tables: dict[str, tuple[str, ...]] = field(default_factory=dict)
    tables_read: dict[str, TableRead] = field(default_factory=dict)
    checked: set[str] = field(default_factory=set)  # members whose staged files check_staged loaded
    # each validate_command, started as the batch began (as a single deploy starts its
    # own, ``StepContext.early_validate``): its verdict is ready when validate asks
    early: dict[str, Running] = field(default_factory=dict)
    default_now: dict[tuple[str, str], str] = field(default_factory=dict)


@dataclass(frozen=True)
class StepContext:
    """What every step needs: the target's config, the host journal and host name.

    ``lease``: how long a distributed deploy stays alive between two of its steps.
    ``early_validate``: the target's validate_command, started before the deploy
    staged (it checks the daemon's config, which a deploy never changes); validate
    collects its verdict instead of running it again.
    ``sharing``: the host's other targets that read at least one of this target's
    files; stage refuses to leave one of them with files its daemon cannot serve.
    """

    target: Target
    journal: Journal
    host: str = ""
    lease: float = DEFAULT_LEASE
    early_validate: Running | None = field(default=None, compare=False)
    sharing: tuple[Target, ...] = ()  # the host's other targets reading one of these files
    # A member of a batch: stage leaves the SNI table to the batch, validate and reload
    # run each command once for all members, verify leaves the ending to the batch.
    batch: BatchRun | None = field(default=None, compare=False)

    @property
    def tables_read(self) -> dict[str, TableRead] | None:
        """The SNI table sources a batch has read already (``sni.plan``'s memo); None alone."""
        return self.batch.tables_read if self.batch is not None else None

    def load(self, deploy_id: str) -> DeployRecord:
        rec = self.journal.load(self.target.name, check_deploy_id(deploy_id))
        if rec is None:
            raise Rejected(f"deploy {deploy_id} is unknown on this host for target {self.target.name!r} "
                           "(stage never ran here)")
        return rec

    def save(self, rec: DeployRecord) -> DeployRecord:
        return self.journal.save(rec)


class HostContexts(Mapping[str, StepContext]):
    """Every target's StepContext by name, each made on first use: a run touches one or
    two of a host's targets, and making all of them cost every in-process run time in
    proportion to the size of the host."""

    def __init__(self, cfg: HostConfig, journal: Journal) -> None:
        self.cfg, self.journal = cfg, journal
        self._made: dict[str, StepContext] = {}

    def __getitem__(self, name: str) -> StepContext:
        ctx = self._made.get(name)
        if ctx is None:
            t = self.cfg.targets[name]
            ctx = self._made[name] = StepContext(t, self.journal, self.cfg.host, self.cfg.deploy_lease,
                                                 sharing=self.cfg.sharing_with(name))
        return ctx

    def __iter__(self) -> Iterator[str]:
        return iter(self.cfg.targets)

    def __len__(self) -> int:
        return len(self.cfg.targets)


def target_reals(t: Target, *, table: bool = True) -> list[str]:
    """The real files a deploy of ``t`` writes (symlinks resolved): what it must own.
    An SNI target's compiled table is one (``table``): two targets of one table take
    turns, or go in one batch, whose table one member's record carries."""
    from ..sni import compiled_real

    compiled = compiled_real(t) if t.sni is not None and table else None
    return [files.real_path(path) for _, path in t.files()] + ([compiled] if compiled else [])

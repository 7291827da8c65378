from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.host import MailHost
from tests.support.keys import Pipeline
from tests.support.pki import PKI, make_pki
from tests.support.services import RedisServer


@pytest.fixture(scope="session")
def pki() -> PKI:
    return make_pki("ec")


@pytest.fixture
def host(tmp_path: Path) -> Iterator[MailHost]:
    h = MailHost(tmp_path)
    yield h
    h.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server per test session, on a free loopback port."""
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """The pipeline's signing key and pinned host keys; deploy() and the CLI find it
    through $MAILTLS_PIPELINE, as an operator's pipeline would."""
    p = Pipeline(tmp_path_factory.mktemp("pipeline"))
    old = os.environ.get("MAILTLS_PIPELINE")
    os.environ["MAILTLS_PIPELINE"] = str(p.path)
    yield p
    if old is None:
        os.environ.pop("MAILTLS_PIPELINE", None)
    else:
        os.environ["MAILTLS_PIPELINE"] = old

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.host import MailHost
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

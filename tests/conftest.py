from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.host import MailHost
from tests.support.pki import PKI, make_pki


@pytest.fixture(scope="session")
def pki() -> PKI:
    return make_pki("ec")


@pytest.fixture
def host(tmp_path: Path) -> Iterator[MailHost]:
    h = MailHost(tmp_path)
    yield h
    h.close()

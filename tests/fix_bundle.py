"""The daemons of one test (daemons.bench.private.PrivateBundle), killed at its end."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons.bench.private import PrivateBundle


@pytest.fixture
def bundle(db_url: str, tmp_path: Path) -> Iterator[PrivateBundle]:
    b = PrivateBundle(db_url, tmp_path)
    yield b
    b.close()

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.harness import Bundle


@pytest.fixture
def bundle(db_url: str, tmp_path: Path) -> Iterator[Bundle]:
    b = Bundle(db_url, tmp_path)
    yield b
    b.close()

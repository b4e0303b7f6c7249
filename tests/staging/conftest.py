from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.staging import Staging


@pytest.fixture
def make_staging(tmp_path: Path) -> Iterator:
    """Build Stagings on tmp_path (several may share the root, like worker processes); all closed at the end."""
    made: list[Staging] = []

    def make(**kw) -> Staging:
        kw.setdefault("min_free_bytes", 0)
        kw.setdefault("seal_after_seconds", 60.0)
        st = Staging(kw.pop("root", tmp_path / "staging"), **kw)
        made.append(st)
        return st

    yield make
    for st in made:
        st.close()


@pytest.fixture
def staging(make_staging) -> Staging:
    return make_staging()

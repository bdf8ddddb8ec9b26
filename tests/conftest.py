"""Root fixtures shared by every test level."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.harness.registry import LocalRegistry


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """One docker-registry on 127.0.0.1 for the whole session (stopped even on failure).

    Tests share it, so each test pushes to its own repository name.
    """
    if shutil.which("docker-registry") is None:
        # Fail, never skip: CI installs the package, and a silently skipped registry suite
        # would hide every registry regression.
        pytest.fail(
            "docker-registry is not installed (apt-get install docker-registry); "
            "the registry tests need it",
            pytrace=False,
        )
    reg = LocalRegistry()
    try:
        reg.start(tmp_path_factory.mktemp("registry"))
        yield reg
    finally:
        reg.close()

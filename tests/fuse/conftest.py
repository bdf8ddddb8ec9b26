"""Fixtures for the FUSE-level tests: a real `layerstore serve` against the local registry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.store import StoreProcess


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreProcess]:
    work = tmp_path_factory.mktemp("store")
    with StoreProcess(work / "root", work / "mnt") as proc:  # stopped even on failure
        yield proc


@pytest.fixture
def mount(store: StoreProcess) -> Path:
    return store.mountpoint

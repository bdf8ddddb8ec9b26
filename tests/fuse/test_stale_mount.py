"""A store killed with SIGKILL leaves a dead FUSE mount (ENOTCONN) that breaks every Podman
command; the next `layerstore serve` on the same mount point must clear it and mount again."""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import pytest

from store.fuse.mount import mounted_at
from tests.harness.store import StoreProcess


def test_next_start_clears_a_dead_mount(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    first = StoreProcess(tmp_path / "root1", mnt)
    second = StoreProcess(tmp_path / "root2", mnt)
    try:
        first.start()
        assert first.proc is not None
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=30)
        assert mounted_at(mnt)  # still in the mount table ...
        with pytest.raises(OSError) as exc:
            os.listdir(mnt)  # ... but dead
        assert exc.value.errno == errno.ENOTCONN

        # A dead mount can still look mounted to ismount(), so wait for the store's own word.
        second.start()
        deadline = time.monotonic() + 30
        while not second.events("store.mounted") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert second.events("store.mounted"), second.log_tail()
        assert os.path.ismount(mnt)
        assert os.listdir(mnt) == []
        assert os.statvfs(mnt).f_namemax == 255
        assert second.events("mount.stale_cleared")
    finally:
        second.stop()
        first.stop()
    assert not mounted_at(mnt)

"""Restart survival with real Podman: pull through the store, kill the store (SIGKILL), start it
again on the same root, and the image Podman recorded still runs without a new pull, also after
its tag moved to a different image."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.harness import images
from tests.harness.podman import PodmanEnv
from tests.harness.registry import LocalRegistry
from tests.harness.store import StoreProcess

pytestmark = pytest.mark.e2e


def push_app(registry: LocalRegistry, repo: str, message: bytes) -> images.TestImage:
    big = images.big_data(4 << 20)  # several chunks, so the data really is fetched lazily
    tar = images.busybox_layer([("data/message", message), ("data/big.bin", big)]).bytes()
    layer, diff_id = images.estargz_layer(tar)
    return images.push(registry, repo, "v1", [layer], [diff_id], images.apply_layers([tar]))


def test_podman_run_after_store_sigkill_and_tag_move(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    """One test covers both: a moved tag is the harder case of a restart (CI time is dear)."""
    repo = "restart-moved"
    image = push_app(registry, repo, b"first image\n")
    ref = f"{registry.host}/{repo}:v1"
    store = StoreProcess(tmp_path / "store-root", tmp_path / "als")
    second: StoreProcess | None = None
    env: PodmanEnv | None = None
    try:
        store.start()
        env = PodmanEnv(tmp_path / "podman", registry.host, als=store.mountpoint)
        env.pull(ref)
        assert store.events("layer.prepared"), "the layer was not served by the store"
        cmd = ["/bin/sh", "-c", "cat /data/message; sha256sum /data/big.bin"]
        first_out = env.run_container(ref, cmd).stdout
        assert first_out.startswith("first image\n")
        expected_big = image.tree.entries["/data/big.bin"].content.split(":", 1)[1]
        assert expected_big in first_out

        assert store.proc is not None
        store.proc.send_signal(signal.SIGKILL)
        store.proc.wait(30)
        store.stop()  # clears the dead mount

        moved = push_app(registry, repo, b"second image\n")
        assert moved.manifest_digest != image.manifest_digest

        second = StoreProcess(tmp_path / "store-root", tmp_path / "als")
        log_mark = second.mark()  # same log file as the first run
        second.start()
        mark = registry.mark()
        out = env.run_container(ref, cmd).stdout
        assert out == first_out
        # served from what was recorded: the registry was not asked what the tag means now
        manifest_gets = [e for e in registry.requests_since(mark) if "/manifests/" in e.path]
        assert manifest_gets == []
        prepared = second.events("layer.prepared", since=log_mark)
        assert prepared and all(e.get("from_state") for e in prepared)
        levels = [e.get("level") for e in second.events(since=log_mark)]
        assert "error" not in levels and "critical" not in levels
    finally:
        if env is not None:
            env.cleanup()  # before the store stops: podman releases the ALS layers
        if second is not None:
            second.stop()
        store.stop()

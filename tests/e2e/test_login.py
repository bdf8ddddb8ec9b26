"""`podman login` to an htpasswd registry, then a lazy pull and run: the store finds the
credentials where Podman put them, with no store-specific configuration."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import images
from tests.harness.podman import PodmanEnv
from tests.harness.registry import LocalRegistry, write_htpasswd
from tests.harness.store import StoreProcess

pytestmark = pytest.mark.e2e

USER, PASSWORD = "podman-user", "pw-Very-Secret-42"


@pytest.fixture
def private_registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", USER, PASSWORD)
    reg = LocalRegistry()
    try:
        reg.start(tmp_path / "registry", htpasswd=htpasswd, credentials=(USER, PASSWORD))
        yield reg
    finally:
        reg.close()


def test_podman_login_then_lazy_run(
    tmp_path: Path, private_registry: LocalRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = b"only for logged-in users\n" * 1000
    tar = images.busybox_layer(extra=[("private/marker.txt", marker)]).bytes()
    layer, diff_id = images.estargz_layer(tar)
    img = images.push(
        private_registry, "private/app", "v1", [layer], [diff_id], images.apply_layers([tar])
    )
    auth_file = tmp_path / "auth" / "auth.json"
    auth_file.parent.mkdir()
    # What a user's shell would have; both podman and the store inherit it from here.
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    store = StoreProcess(tmp_path / "store-root", tmp_path / "als")
    env = None
    try:
        store.start()
        env = PodmanEnv(tmp_path / "podman", private_registry.host, als=store.mountpoint)
        # anonymous: the store cannot resolve, so Podman would fall back and fail itself
        assert env.run("pull", "-q", img.ref, check=False, timeout=120).returncode != 0
        assert not store.events("layer.prepared")

        env.run(
            "login",
            "--username",
            USER,
            "--password-stdin",
            private_registry.host,
            input=PASSWORD + "\n",
            timeout=60,
        )
        assert private_registry.host in json.loads(auth_file.read_text())["auths"]

        env.pull(img.ref, timeout=120)
        prepared = [e for e in store.events("layer.prepared") if e.get("ref") == img.ref]
        assert prepared and prepared[0]["lazy"] is True
        out = env.run_container(img.ref, ["sha256sum", "/private/marker.txt"], timeout=120)
        assert out.stdout.split()[0] == images.sha256_hex(marker)
        log_text = store.log_path.read_text()
        assert PASSWORD not in log_text
    finally:
        if env is not None:
            env.cleanup()
        code = store.stop()
    assert code == 0, store.log_tail()

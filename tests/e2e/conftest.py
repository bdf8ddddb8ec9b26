"""Fixtures for the end-to-end tests: real Podman 4.3.1, docker-registry, containerd/ctr-remote
and the store mounted with FUSE. Images are built once per session; every test gets a fresh
store and fresh Podman environments, torn down (processes stopped, mounts removed) even when the
test fails.

These tests need root, /dev/fuse and the packages of scripts/install.sh. When something is missing
they fail with a message instead of being skipped: a suite that silently ran nothing must not pass.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import images
from tests.harness.containerd import Containerd
from tests.harness.podman import PodmanEnv, cleanup_all
from tests.harness.registry import LocalRegistry
from tests.harness.store import StoreProcess

REQUIRED_TOOLS = ("podman", "runc", "fusermount3", "containerd", "ctr-remote", "docker-registry")


@pytest.fixture(scope="session", autouse=True)
def _e2e_prerequisites() -> None:
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    problems = []
    if missing:
        problems.append(f"missing tools: {', '.join(missing)} (run scripts/install.sh)")
    if os.geteuid() != 0:
        problems.append("the e2e tests run rootful podman and must run as root")
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing")
    if not os.path.exists("/bin/busybox"):
        problems.append("/bin/busybox is missing (apt-get install busybox-static)")
    if problems:
        pytest.fail("e2e prerequisites: " + "; ".join(problems), pytrace=False)


# -- session: tools and images --------------------------------------------------------------------


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    ctd = Containerd(tmp_path_factory.mktemp("containerd"))
    try:
        ctd.start()
        yield ctd
    finally:
        ctd.stop()


@pytest.fixture(scope="session")
def e2e_tars() -> list[bytes]:
    """The three uncompressed layer tars of the e2e image."""
    return [images.base_layer(), images.changes_layer(), images.data_layer()]


@pytest.fixture(scope="session")
def e2e_tree(e2e_tars: list[bytes]) -> images.Tree:
    """The file tree every variant of the e2e image must produce."""
    return images.apply_layers(e2e_tars)


@pytest.fixture(scope="session")
def e2e_gzip(registry: LocalRegistry, e2e_tars: list[bytes], e2e_tree) -> images.TestImage:
    """`e2e:gzip`: the three layers as plain gzip, pushed as an OCI image."""
    return images.push(
        registry, "e2e", "gzip",
        [images.gzip_layer(t) for t in e2e_tars],
        ["sha256:" + images.sha256_hex(t) for t in e2e_tars],
        e2e_tree,
    )


@pytest.fixture(scope="session")
def e2e_esgz_ctr(registry, containerd, e2e_gzip, e2e_tree) -> images.TestImage:
    """`e2e:esgz-ctr`: `e2e:gzip` converted by `ctr-remote image convert --estargz --oci`."""
    containerd.convert_estargz(e2e_gzip.ref, f"{registry.host}/e2e:esgz-ctr")
    return images.fetch_image(registry.host, "e2e", "esgz-ctr", e2e_tree)


@pytest.fixture(scope="session")
def e2e_esgz_ours(registry, e2e_tars, e2e_tree) -> images.TestImage:
    """`e2e:esgz-ours`: the same layers written by store.estargz.writer.build_estargz."""
    built = [images.estargz_layer(t) for t in e2e_tars]
    return images.push(
        registry, "e2e", "esgz-ours", [b[0] for b in built], [b[1] for b in built], e2e_tree
    )


VARIANT_FIXTURES = {"gzip": "e2e_gzip", "esgz-ctr": "e2e_esgz_ctr", "esgz-ours": "e2e_esgz_ours"}


@pytest.fixture(scope="session")
def e2e_image_of(request: pytest.FixtureRequest) -> Callable[[str], images.TestImage]:
    """`e2e_image_of("esgz-ctr")`: a variant of the e2e image, built on first use."""
    return lambda variant: request.getfixturevalue(VARIANT_FIXTURES[variant])


@pytest.fixture(scope="session")
def busybox_gzip(registry: LocalRegistry) -> images.TestImage:
    """`busybox:latest`: a small single-layer gzip image for quick tests."""
    return images.push_busybox(registry)


@pytest.fixture(scope="session")
def busybox_esgz(registry: LocalRegistry) -> images.TestImage:
    """`busybox:esgz`: the same layer written by our eStargz writer."""
    return images.push_busybox(registry, estargz=True)


# -- per test: store and podman -------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StoreProcess]:
    """The store serving at `<tmp>/als`; after the test it must exit 0 and must not have logged
    errors."""
    proc = StoreProcess(tmp_path / "store-root", tmp_path / "als")
    try:
        proc.start()
        yield proc
    finally:
        code = proc.stop()
    errors = [e for e in proc.events() if e.get("level") in ("error", "critical")]
    assert code == 0, f"store exited with {code}:\n{proc.log_tail()}"
    assert not errors, f"store logged errors: {errors[:5]}"


@pytest.fixture
def podman_store(tmp_path: Path, registry: LocalRegistry, store: StoreProcess):
    """Podman whose storage.conf names the store as additional layer store (`<mount>:ref`)."""
    env = PodmanEnv(tmp_path / "podman-store", registry.host, als=store.mountpoint)
    try:
        yield env
    finally:
        env.cleanup()  # before the store stops: `system reset` releases ALS layers


@pytest.fixture
def podman_plain(tmp_path: Path, registry: LocalRegistry):
    """Podman without an additional layer store."""
    env = PodmanEnv(tmp_path / "podman-plain", registry.host)
    try:
        yield env
    finally:
        env.cleanup()


@pytest.fixture
def podman_factory(tmp_path: Path, registry: LocalRegistry):
    """Make extra PodmanEnvs: `podman_factory("name", als=None)`; all cleaned up afterwards."""
    envs: list[PodmanEnv] = []

    def make(name: str, als: Path | None = None) -> PodmanEnv:
        env = PodmanEnv(tmp_path / f"podman-{name}", registry.host, als=als)
        envs.append(env)
        return env

    try:
        yield make
    finally:
        cleanup_all(envs)

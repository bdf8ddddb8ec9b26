"""End to end on both Podman generations: the machine's Podman and the other generation in a
Debian chroot (tests/harness/podman5.py: trixie's Podman 5.4 on a Debian 12 machine, bookworm's
Podman 4.3 on a Debian 13 machine). Together they use both key schemes of the protocol:
compressed-blob-digest keys (Podman <= 5.0) and TOC-digest keys (Podman >= 5.1).

For each Podman and each eStargz producer (ctr-remote, our writer): lazy pull (no whole layer
GET, the store prepared every layer under the key scheme of that Podman), `podman run` sees
every file with the original content, `podman save` layers hash to the config's diff_ids, and a
`podman push` to another repository, pulled normally by a Podman without the store, gives the
same tree. Each outcome is recorded for the README compatibility table (tests/harness/compat.py).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import compat, images
from tests.harness.checks import (
    assert_expected_tree,
    expected_key_kind,
    layer_gets,
    saved_layer_digests,
)
from tests.harness.images import TestImage
from tests.harness.podman import PodmanEnv, cleanup_all
from tests.harness.podman5 import ChrootPodman, host_podman_version, shared_chroot
from tests.harness.registry import LocalRegistry
from tests.harness.store import StoreProcess

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_RESULT = REPO_ROOT / "bench" / "results" / "e2e-pull-times-podman5.json"
VARIANTS = {"esgz-ctr": compat.ESGZ_CTR, "esgz-ours": compat.ESGZ_OURS}
ENGINES = ("host", "chroot")


# -- the two Podmans ------------------------------------------------------------------------------


def expected_keys(img: TestImage, kind: str) -> list[str]:
    if kind == "toc":
        return [d["annotations"][images.TOC_DIGEST] for d in img.manifest["layers"]]
    return img.layer_digests


@dataclass
class Engine:
    """One Podman installation: `make(name, als)` returns a PodmanEnv (cleaned up by the caller)."""

    name: str
    version: str
    where: str  # "host" or "chroot <suite>"
    make: Callable[[str, Path | None], PodmanEnv]
    als_dir: Callable[[], Path]  # a fresh mount point for the store, visible to this Podman

    @property
    def key_kind(self) -> str:
        return expected_key_kind(self.version)


@pytest.fixture(scope="session")
def chroot() -> Iterator[ChrootPodman]:
    """The other Podman generation, built (or reused from the cache) and mounted once."""
    with shared_chroot() as c:
        yield c


@pytest.fixture(scope="session")
def host_version() -> str:
    return host_podman_version()


@pytest.fixture(params=ENGINES)
def engine(
    request: pytest.FixtureRequest, tmp_path: Path, registry: LocalRegistry, host_version: str
) -> Engine:
    if request.param == "host":
        return Engine(
            "host",
            host_version,
            "host",
            lambda name, als: PodmanEnv(tmp_path / f"podman-{name}", registry.host, als=als),
            lambda: tmp_path / "als",
        )
    c: ChrootPodman = request.getfixturevalue("chroot")
    return Engine(
        "chroot",
        c.version,
        f"chroot {c.suite}",
        lambda name, als: c.env(name, registry.host, als=als),
        lambda: c.mkdtemp("als-"),
    )


@pytest.fixture(params=list(VARIANTS))
def image(request: pytest.FixtureRequest, e2e_image_of) -> TestImage:
    return e2e_image_of(request.param)


def _stop_checked(proc: StoreProcess) -> None:
    code = proc.stop()
    errors = [e for e in proc.events() if e.get("level") in ("error", "critical")]
    assert code == 0, f"store exited with {code}:\n{proc.log_tail()}"
    assert not errors, f"store logged errors: {errors[:5]}"


@pytest.fixture
def als_store(tmp_path: Path, engine: Engine) -> Iterator[StoreProcess]:
    """The store, mounted where this Podman can see it; must exit 0 without logged errors."""
    proc = StoreProcess(tmp_path / "store-root", engine.als_dir())
    try:
        proc.start()
        yield proc
    finally:
        _stop_checked(proc)


@pytest.fixture
def podman_envs() -> Iterator[list[PodmanEnv]]:
    """Every PodmanEnv a test makes, cleaned up (before the store stops) even on failure."""
    envs: list[PodmanEnv] = []
    try:
        yield envs
    finally:
        cleanup_all(envs)


@pytest.fixture
def lazy(engine: Engine, als_store: StoreProcess, podman_envs) -> PodmanEnv:
    env = engine.make("lazy", als_store.mountpoint)
    podman_envs.append(env)
    return env


@pytest.fixture
def plain(engine: Engine, podman_envs) -> PodmanEnv:
    env = engine.make("plain", None)
    podman_envs.append(env)
    return env


# -- checks ---------------------------------------------------------------------------------------


def assert_lazy_pull(
    env: PodmanEnv, img: TestImage, registry: LocalRegistry, store: StoreProcess, kind: str
) -> None:
    """Pull `img`: no whole layer GET, every layer prepared by the store under key kind `kind`,
    and the `info` it served is what that Podman generation needs."""
    mark, events = registry.mark(), store.mark()
    env.pull(img.ref)
    assert layer_gets(registry.requests_since(mark), img, 200) == [], "layer downloaded whole"
    prepared = store.events("layer.prepared", since=events)
    keys = expected_keys(img, kind)
    assert sorted(e["key"] for e in prepared) == sorted(keys), prepared
    assert {e["key_kind"] for e in prepared} == {kind}, prepared
    assert all(e.get("lazy") is True and e["ref"] == img.ref for e in prepared), prepared
    for i, key in enumerate(keys):
        info = json.loads(
            (store.mountpoint / images.b64ref(img.ref) / key / "info").read_bytes()
        )
        if kind == "toc":  # podman5-chroot.md: toc-digest mandatory, the flag needed by save
            assert info["toc-digest"] == key
            assert info["flags"]["expected-layer-diffid"] == img.diff_ids[i]
        else:
            assert info["compressed-diff-digest"] == key
            assert info["diff-digest"] == img.diff_ids[i]
        assert info["diff-size"] == int(img.manifest["layers"][i]["annotations"][
            images.UNCOMPRESSED_SIZE
        ])
    # images are addressed by name: under TOC keys the image ID is not the config digest
    assert env.inspect_image(img.ref)["Digest"] == img.manifest_digest


def cell(engine: Engine, img: TestImage, operation: str, **extra: object):
    return compat.check(
        engine.version, VARIANTS[img.tag], operation, where=engine.where, **extra
    )


# -- the suite ------------------------------------------------------------------------------------


def test_pull_is_lazy(
    engine: Engine, image: TestImage, registry: LocalRegistry, als_store: StoreProcess,
    lazy: PodmanEnv,
) -> None:
    with cell(engine, image, "pull", keys=engine.key_kind):
        assert_lazy_pull(lazy, image, registry, als_store, engine.key_kind)


def test_run_sees_original_files(
    engine: Engine, image: TestImage, registry: LocalRegistry, als_store: StoreProcess,
    lazy: PodmanEnv,
) -> None:
    """Every file the container sees hashes like the original; reading them all still
    downloads no whole layer."""
    with cell(engine, image, "run"):
        mark = registry.mark()
        lazy.pull(image.ref)
        got = images.list_container(lazy, image.ref)
        assert layer_gets(registry.requests_since(mark), image, 200) == []
        assert got.entries["/data/big.bin"] == image.tree.entries["/data/big.bin"]
        assert "/etc/motd" not in got.entries, "whiteout not applied"
        assert_expected_tree(got, image)
        out = lazy.run_container(
            image.ref, ["sh", "-c", "id -u; head -1 /data/small/f007.txt"], "--user", "1000:1000"
        )
        assert out.stdout.splitlines() == ["1000", "file 007 line 000: lazily pulled"]


def test_save_layers_hash_to_diff_ids(
    engine: Engine, image: TestImage, tmp_path: Path, als_store: StoreProcess, lazy: PodmanEnv
) -> None:
    with cell(engine, image, "save"):
        lazy.pull(image.ref)
        out = lazy.tmpdir / "saved.tar"  # inside the chroot for the chroot's podman
        diff_ids, digests = saved_layer_digests(lazy.save(image.ref, out))
        assert diff_ids == image.diff_ids
        assert digests == image.diff_ids


def test_push_then_normal_pull(
    engine: Engine, image: TestImage, registry: LocalRegistry, als_store: StoreProcess,
    lazy: PodmanEnv, plain: PodmanEnv,
) -> None:
    """A lazily pulled image pushed to another repository; a Podman without the store pulls
    the copy the normal way and sees the same tree."""
    with cell(engine, image, "push"):
        lazy.pull(image.ref)
        seen_lazy = images.list_container(lazy, image.ref)
        copy = f"{registry.host}/gen-{engine.name}-{image.tag}:copy"
        lazy.push(image.ref, copy)
        plain.pull(copy)
        pulled = images.list_container(plain, copy)
        assert images.tree_diff(seen_lazy.entries, pulled.entries) == []
        assert_expected_tree(pulled, image)


def test_gzip_image_is_pulled_normally(
    engine: Engine, e2e_gzip: TestImage, registry: LocalRegistry, als_store: StoreProcess,
    lazy: PodmanEnv,
) -> None:
    """A layer without TOC is not the store's: Podman downloads it as usual (Podman 5 does not
    even ask the store) and the container works."""
    ok = False
    try:
        mark, events = registry.mark(), als_store.mark()
        lazy.pull(e2e_gzip.ref)
        fetched = layer_gets(registry.requests_since(mark), e2e_gzip, 200)
        assert sorted(e.path.rsplit("/", 1)[-1] for e in fetched) == sorted(
            e2e_gzip.layer_digests
        )
        assert als_store.events("layer.prepared", since=events) == []
        assert_expected_tree(images.list_container(lazy, e2e_gzip.ref), e2e_gzip)
        ok = True
    finally:
        for op in ("pull", "run"):
            compat.record(engine.version, compat.GZIP, op, ok, where=engine.where)


def test_one_store_serves_both_generations(
    tmp_path: Path, chroot: ChrootPodman, host_version: str, registry: LocalRegistry,
    e2e_esgz_ctr: TestImage, podman_envs: list[PodmanEnv],
) -> None:
    """One store, mounted inside the chroot, serves the host's Podman and the chroot's Podman
    at the same time: each asks with its own key scheme, and both run the image."""
    img = e2e_esgz_ctr
    kinds = {host_version: expected_key_kind(host_version)}
    kinds[chroot.version] = expected_key_kind(chroot.version)
    assert set(kinds.values()) == {"toc", "blob"}, f"one key scheme is not covered: {kinds}"
    store = StoreProcess(tmp_path / "store-root", chroot.mkdtemp("als-both-"))
    store.start()
    try:
        host_env = PodmanEnv(tmp_path / "podman-host", registry.host, als=store.mountpoint)
        podman_envs.append(host_env)
        chroot_env = chroot.env("both", registry.host, als=store.mountpoint)
        podman_envs.append(chroot_env)
        for version, env in ((host_version, host_env), (chroot.version, chroot_env)):
            assert_lazy_pull(env, img, registry, store, kinds[version])
            out = env.run_container(img.ref, ["sha256sum", "/data/small/f042.txt"])
            want = img.tree.entries["/data/small/f042.txt"].content
            assert out.stdout.split()[0] == want.split(":", 1)[1]
        # the same layers under both keys; the store resolved each by its own key
        prepared = store.events("layer.prepared")
        assert {e["key_kind"] for e in prepared} == {"toc", "blob"}
    finally:
        for env in podman_envs:
            env.cleanup()  # safe twice; must run before the store stops
        _stop_checked(store)


# -- pull times (recorded, never asserted) --------------------------------------------------------

REPEATS = 3


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def test_record_pull_times(
    tmp_path: Path, chroot: ChrootPodman, registry: LocalRegistry, e2e_image_of,
    podman_envs: list[PodmanEnv],
) -> None:
    """Cold `podman pull` (and the first `podman run`) with the chroot's Podman, without and with
    the store, measured in the same run; written to bench/results/. Only checks that every
    measured pull worked and the lazy ones downloaded no whole layer."""
    cmd = ["cat", "/data/small/f001.txt"]
    result: dict = {
        "measured_by": "tests/e2e/test_podman_generations.py::test_record_pull_times",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "podman": chroot.version,
        "where": f"debootstrap chroot, Debian {chroot.suite}",
        "key_kind": expected_key_kind(chroot.version),
        "chroot_built_this_run": chroot.built_now,
        "chroot_build_s": round(chroot.build_seconds, 1) if chroot.built_now else None,
        "registry": "docker-registry on 127.0.0.1 (loopback)",
        "repeats": REPEATS,
        "images": {},
    }
    n = 0
    for variant in VARIANTS:
        img = e2e_image_of(variant)
        runs = []
        for _ in range(REPEATS):
            n += 1
            plain = chroot.env(f"bench-plain-{n}", registry.host)
            podman_envs.append(plain)
            t_plain_pull = _timed(plain.pull, img.ref)
            t_plain_run = _timed(plain.run_container, img.ref, cmd)
            plain.cleanup()
            st = StoreProcess(tmp_path / f"bench-store-{n}", chroot.mkdtemp("bench-als-"))
            st.start()
            lazy = None
            try:
                lazy = chroot.env(f"bench-lazy-{n}", registry.host, als=st.mountpoint)
                mark = registry.mark()
                t_lazy_pull = _timed(lazy.pull, img.ref)
                assert layer_gets(registry.requests_since(mark), img, 200) == []
                t_lazy_run = _timed(lazy.run_container, img.ref, cmd)
            finally:
                if lazy is not None:
                    lazy.cleanup()  # before the store stops: releases its layers
                _stop_checked(st)
            runs.append(
                {
                    "pull_s": {"without_store": t_plain_pull, "with_store": t_lazy_pull},
                    "first_run_s": {"without_store": t_plain_run, "with_store": t_lazy_run},
                }
            )

        def med(kind: str, which: str, runs=runs) -> float:
            return statistics.median(r[kind][which] for r in runs)

        result["images"][variant] = {
            "ref": img.ref,
            "layers": len(img.layer_digests),
            "compressed_bytes": sum(img.layer_sizes),
            "uncompressed_bytes": sum(
                int(d["annotations"][images.UNCOMPRESSED_SIZE]) for d in img.manifest["layers"]
            ),
            "runs": runs,
            "median_pull_s": {w: med("pull_s", w) for w in ("without_store", "with_store")},
            "median_first_run_s": {
                w: med("first_run_s", w) for w in ("without_store", "with_store")
            },
            "pull_ratio_with_over_without": med("pull_s", "with_store")
            / med("pull_s", "without_store"),
        }
    BENCH_RESULT.parent.mkdir(parents=True, exist_ok=True)
    BENCH_RESULT.write_text(json.dumps(result, indent=2) + "\n")
    assert set(result["images"]) == set(VARIANTS)

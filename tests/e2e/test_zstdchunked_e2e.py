"""End to end: zstd:chunked images served lazily through the store, on both Podman generations.

Images (one tree, three producers, all from the same source tars):

- `podman4`: pushed by Podman 4.x (`--compression-format zstd:chunked`): 40-byte footer, the old
  `io.containers.zstd-chunked.*` annotations, no tar-split and no size annotation;
- `podman5`: pushed by Podman 5.x: 64-byte footer, tar-split, `io.github.containers.*` keys;
- `ctr`: `ctr-remote image convert --zstdchunked` (stargz-snapshotter's zstd eStargz).

Podmans: the machine's and the other generation's in a Debian chroot (tests/harness/podman5.py).
Podman 4.x asks the store by compressed blob digest; Podman >= 5.1 by TOC digest
(`io.github...manifest-checksum`, or `toc.digest` for ctr-remote's layers). Podman >= 5.1 never
asks any store about `podman4` images (their annotations carry no key it knows), so that pair is
not a lazy-pull case.

Per (Podman, image): lazy pull (no whole-layer GET, every layer prepared by the store under that
Podman's key scheme, `info` with `compression` 4 and the exact size), `podman run` sees every file
as the source tars have it (still no whole-layer GET), `podman save` layers hash to the diff_ids,
and a push to another repository pulled by a Podman without the store gives the same tree. Each
outcome is recorded for the README table (tests/harness/compat.py).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from tests.harness import compat, images
from tests.harness.checks import (
    assert_expected_tree,
    expected_key_kind,
    layer_gets,
    version_tuple,
)
from tests.harness.containerd import Containerd
from tests.harness.images import TestImage
from tests.harness.podman import PodmanEnv
from tests.harness.podman5 import ChrootPodman, host_podman_version, shared_chroot
from tests.harness.registry import LocalRegistry
from tests.harness.store import StoreProcess
from tests.harness.zstdchunked import fetch_zstd_chunked, go_tar, podman_push_zstd_chunked

pytestmark = pytest.mark.e2e

REPO = "zc-e2e"
BIG = 16 << 20  # the data layer's random file: enough for many chunks, cheap to push
GH_CHECKSUM = "io.github.containers.zstd-chunked.manifest-checksum"
FORMATS = {
    "podman4": "zstd:chunked (podman 4.x push)",
    "podman5": "zstd:chunked (podman 5.x push)",
    "ctr": compat.ZSTD_CHUNKED_CTR,
}


@dataclass
class Engine:
    name: str  # "host" or "chroot"
    version: str
    where: str
    make: Callable[[str, Path | None], PodmanEnv]
    als_dir: Callable[[], Path]

    @property
    def key_kind(self) -> str:
        return expected_key_kind(self.version)

    @property
    def generation(self) -> str:
        return "podman5" if version_tuple(self.version) >= (5, 0) else "podman4"


# -- session: the two Podmans and the images ------------------------------------------------------


@pytest.fixture(scope="session")
def zc_chroot() -> Iterator[ChrootPodman]:
    with shared_chroot() as c:  # the same mount as the other e2e modules, if they run too
        yield c


@pytest.fixture(scope="session")
def zc_engines(
    zc_chroot: ChrootPodman, registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Engine]:
    base = tmp_path_factory.mktemp("zc-host")
    counter = iter(range(1_000_000))
    host = Engine(
        "host",
        host_podman_version(),
        "host",
        lambda name, als: PodmanEnv(base / f"{name}-{next(counter)}", registry.host, als=als),
        lambda: base / f"als-{next(counter)}",
    )
    chroot = Engine(
        "chroot",
        zc_chroot.version,
        f"chroot {zc_chroot.suite}",
        lambda name, als: zc_chroot.env(name, registry.host, als=als),
        lambda: zc_chroot.mkdtemp("zc-als-"),
    )
    engines = {"host": host, "chroot": chroot}
    kinds = {e.key_kind for e in engines.values()}
    assert kinds == {"blob", "toc"}, f"one key scheme is not covered: {engines}"
    return engines


@pytest.fixture(scope="session")
def zc_tars() -> list[bytes]:
    # Go-style tars: Podman 4.3's writer drops anything after the end-of-archive blocks
    return [go_tar(t) for t in (images.base_layer(), images.changes_layer(),
                                images.data_layer(big_size=BIG))]


@pytest.fixture(scope="session")
def zc_tree(zc_tars: list[bytes]) -> images.Tree:
    return images.apply_layers(zc_tars)


@pytest.fixture(scope="session")
def zc_gzip(registry: LocalRegistry, zc_tars: list[bytes], zc_tree: images.Tree) -> TestImage:
    return images.push(
        registry, REPO, "gzip", [images.gzip_layer(t) for t in zc_tars],
        ["sha256:" + images.sha256_hex(t) for t in zc_tars], zc_tree,
    )


@pytest.fixture(scope="session")
def zc_images(
    registry: LocalRegistry,
    zc_engines: dict[str, Engine],
    zc_gzip: TestImage,
    zc_tree: images.Tree,
    containerd: Containerd,
) -> dict[str, TestImage]:
    out: dict[str, TestImage] = {}
    for engine in zc_engines.values():
        tag = engine.generation
        env = engine.make(f"push-{tag}", None)
        try:
            podman_push_zstd_chunked(env, zc_gzip.ref, f"{registry.host}/{REPO}:{tag}")
        finally:
            env.cleanup()
        out[tag] = fetch_zstd_chunked(registry.host, REPO, tag, zc_tree)
    containerd.convert_zstdchunked(zc_gzip.ref, f"{registry.host}/{REPO}:ctr")
    out["ctr"] = fetch_zstd_chunked(registry.host, REPO, "ctr", zc_tree)
    assert set(out) == set(FORMATS)
    return out


CASES = [
    ("host", "podman4"), ("host", "podman5"), ("host", "ctr"),
    ("chroot", "podman4"), ("chroot", "podman5"), ("chroot", "ctr"),
]


# -- checks ---------------------------------------------------------------------------------------


def expected_keys(img: TestImage, kind: str) -> list[str]:
    if kind == "blob":
        return img.layer_digests
    return [d["annotations"].get(GH_CHECKSUM) or d["annotations"][images.TOC_DIGEST]
            for d in img.manifest["layers"]]


def layer_tar_sizes(img: TestImage, tars: list[bytes]) -> list[int]:
    """What each layer blob decompresses to: the source tars, except for ctr-remote, which
    rewrites them and records the size in an annotation (checked against the blob in tests/fuse)."""
    if img.tag == "ctr":
        return [int(d["annotations"][images.UNCOMPRESSED_SIZE]) for d in img.manifest["layers"]]
    return [len(t) for t in tars]


def saved_layer_digests(archive: Path) -> tuple[list[str], list[str]]:
    """(config diff_ids, sha256 of each decompressed layer) of an oci-archive.

    oci-archive, because a zstd image cannot be saved as docker-archive by Podman 4.3 even
    when pulled normally ("zstd compression is not supported for docker images"); Podman
    writes the layers recompressed, so each is decompressed before hashing.
    """
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> bytes:
            return tar.extractfile("blobs/" + digest.replace(":", "/")).read()

        index = json.loads(tar.extractfile("index.json").read())
        assert len(index["manifests"]) == 1
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        digests = []
        for desc in manifest["layers"]:
            data = blob(desc["digest"])
            if data[:3] == b"\x1f\x8b\x08":
                data = gzip.decompress(data)
            elif data[:4] == b"\x28\xb5\x2f\xfd":
                reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
                data = b"".join(iter(lambda r=reader: r.read(1 << 20), b""))
            digests.append("sha256:" + hashlib.sha256(data).hexdigest())
    return config["rootfs"]["diff_ids"], digests


def stop_checked(proc: StoreProcess) -> None:
    code = proc.stop()
    errors = [e for e in proc.events() if e.get("level") in ("error", "critical")]
    assert code == 0, f"store exited with {code}:\n{proc.log_tail()}"
    assert not errors, f"store logged errors: {errors[:5]}"


# -- the suite ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("engine_name", "producer"), CASES)
def test_pull_run_save_push(
    engine_name: str,
    producer: str,
    zc_engines: dict[str, Engine],
    zc_images: dict[str, TestImage],
    zc_tars: list[bytes],
    registry: LocalRegistry,
    tmp_path: Path,
) -> None:
    engine = zc_engines[engine_name]
    img = zc_images[producer]
    fmt = FORMATS[producer]
    if engine.key_kind == "toc" and producer == "podman4":
        check_not_asked(engine, img, registry, tmp_path)
        return

    def cell(operation: str, **extra: object):
        return compat.check(engine.version, fmt, operation, where=engine.where, **extra)

    store = StoreProcess(tmp_path / "store-root", engine.als_dir())
    store.start()
    envs: list[PodmanEnv] = []
    try:
        lazy = engine.make("lazy", store.mountpoint)
        envs.append(lazy)
        with cell("pull", keys=engine.key_kind):
            mark, events = registry.mark(), store.mark()
            lazy.pull(img.ref)
            assert layer_gets(registry.requests_since(mark), img, 200) == [], "layer downloaded"
            prepared = store.events("layer.prepared", since=events)
            keys = expected_keys(img, engine.key_kind)
            assert sorted(e["key"] for e in prepared) == sorted(keys), prepared
            assert {e["key_kind"] for e in prepared} == {engine.key_kind}, prepared
            sizes = layer_tar_sizes(img, zc_tars)
            for i, key in enumerate(keys):
                info = json.loads(
                    (store.mountpoint / images.b64ref(img.ref) / key / "info").read_bytes()
                )
                assert info["compression"] == 4
                assert info["diff-size"] == sizes[i]
                if engine.key_kind == "toc":
                    assert info["toc-digest"] == key
                    assert info["flags"]["expected-layer-diffid"] == img.diff_ids[i]
                else:
                    assert info["diff-digest"] == img.diff_ids[i]
            assert lazy.inspect_image(img.ref)["Digest"] == img.manifest_digest

        with cell("run"):
            mark = registry.mark()
            got = images.list_container(lazy, img.ref)
            assert layer_gets(registry.requests_since(mark), img, 200) == []
            assert got.entries["/data/big.bin"] == img.tree.entries["/data/big.bin"]
            assert "/etc/motd" not in got.entries, "whiteout not applied"
            assert_expected_tree(got, img)
            out = lazy.run_container(
                img.ref, ["sh", "-c", "id -u; head -1 /data/small/f007.txt"], "--user", "1000:1000"
            )
            assert out.stdout.splitlines() == ["1000", "file 007 line 000: lazily pulled"]

        with cell("save"):
            saved = lazy.save(img.ref, lazy.tmpdir / "saved.tar", fmt="oci-archive")
            diff_ids, digests = saved_layer_digests(saved)
            assert diff_ids == img.diff_ids
            assert digests == img.diff_ids

        with cell("push"):
            plain = engine.make("plain", None)
            envs.append(plain)
            copy = f"{registry.host}/{REPO}-copy-{engine.name}-{producer}:v1"
            lazy.push(img.ref, copy)
            plain.pull(copy)
            pulled = images.list_container(plain, copy)
            assert images.tree_diff(got.entries, pulled.entries) == []
            assert_expected_tree(pulled, img)
    finally:
        for env in reversed(envs):
            env.cleanup()  # before the store stops: `system reset` releases the ALS layers
        stop_checked(store)


def check_not_asked(engine: Engine, img: TestImage, registry: LocalRegistry, tmp: Path) -> None:
    """Podman >= 5.1 and a Podman 4.x zstd:chunked image: no key it knows, so it never asks the
    store and pulls normally; the image still works with the store configured."""
    store = StoreProcess(tmp / "store-root", engine.als_dir())
    store.start()
    env = engine.make("not-asked", store.mountpoint)
    try:
        mark, events = registry.mark(), store.mark()
        env.pull(img.ref)
        fetched = layer_gets(registry.requests_since(mark), img, 200)
        assert sorted(e.path.rsplit("/", 1)[-1] for e in fetched) == sorted(img.layer_digests)
        assert store.events("layer.prepared", since=events) == []
        assert_expected_tree(images.list_container(env, img.ref), img)
    finally:
        env.cleanup()
        stop_checked(store)

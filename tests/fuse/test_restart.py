"""Restart survival: what `<ref>/<key>` resolved to is kept under ROOT and used after a
restart (SIGTERM or SIGKILL) without asking the registry for the tag again, even if the tag
moved; verified chunks are served from the disk cache without range requests."""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from store.estargz import build_estargz_bytes
from tests.harness.images import TarLayer, b64ref
from tests.harness.registry import LayerBlob, LocalRegistry, PushedImage
from tests.harness.store import StoreProcess

TOC_ANN = "containerd.io/snapshot/stargz/toc.digest"
SIZE_ANN = "io.containers.estargz.uncompressed-size"


def esgz_image(
    registry: LocalRegistry, repo: str, tag: str, files: dict[str, bytes]
) -> PushedImage:
    t = TarLayer()
    for name, data in files.items():
        t.file(name, data)
    blob, res = build_estargz_bytes(t.bytes(), chunk_size=64 * 1024)
    ann = {TOC_ANN: res.toc_digest, SIZE_ANN: str(res.uncompressed_size)}
    layer = LayerBlob(blob, annotations=ann)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [res.diff_id]},
    }
    return registry.push_image(repo, tag, [layer], config)


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[list[StoreProcess]]:
    """Store processes sharing one root and mount point; all stopped at the end."""
    made: list[StoreProcess] = []
    yield made
    for s in made:
        s.stop()


def start(stores: list[StoreProcess], tmp_path: Path) -> StoreProcess:
    s = StoreProcess(tmp_path / "root", tmp_path / "mnt")
    stores.append(s)
    return s.start()


def crash(s: StoreProcess, sig: signal.Signals) -> None:
    assert s.proc is not None
    s.proc.send_signal(sig)
    s.proc.wait(30)
    s.stop()  # clears the mount a SIGKILL left behind


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
@pytest.mark.parametrize("key_kind", ["blob", "toc"])
def test_layer_survives_restart_and_tag_move(
    registry: LocalRegistry,
    tmp_path: Path,
    stores: list[StoreProcess],
    sig: signal.Signals,
    key_kind: str,
) -> None:
    repo = f"fuse/restart-{key_kind}-{sig.name.lower()}"
    big = hashlib.shake_256(repo.encode()).digest(500_000)
    old = esgz_image(registry, repo, "v1", {"app/big.bin": big, "app/conf": b"old\n"})
    desc = old.manifest["layers"][0]
    key = desc["digest"] if key_kind == "blob" else desc["annotations"][TOC_ANN]

    s1 = start(stores, tmp_path)
    layer = s1.mountpoint / b64ref(old.ref) / key
    info_before = (layer / "info").read_bytes()
    assert (layer / "diff" / "app" / "big.bin").read_bytes() == big
    if sig == signal.SIGKILL:
        s1.wait_cached(8)  # big.bin's 64 KiB chunks, written once reads pause
    crash(s1, sig)  # SIGTERM writes what is still queued before the store exits

    # the tag moves to a different image before the store comes back
    new = esgz_image(registry, repo, "v1", {"app/conf": b"new\n"})
    assert new.manifest["layers"][0]["digest"] != desc["digest"]

    s2 = start(stores, tmp_path)
    mark = registry.mark()
    since = s2.mark()
    layer = s2.mountpoint / b64ref(old.ref) / key
    assert (layer / "info").read_bytes() == info_before
    assert (layer / "diff" / "app" / "conf").read_bytes() == b"old\n"
    assert (layer / "diff" / "app" / "big.bin").read_bytes() == big
    requests = registry.requests_since(mark)
    # no tag lookup and no footer+TOC fetch (kept under ROOT/tocs): only conf's one chunk,
    # of the recorded blob; big.bin came from the disk cache
    assert [e for e in requests if "/manifests/" in e.path] == []
    assert all(desc["digest"] in e.path for e in requests), requests
    assert len(requests) == 1, requests
    prepared = s2.events("layer.prepared", since=since)
    assert [e.get("from_state") for e in prepared] == [True]
    # the moved tag serves its new layer under its own key
    new_key = new.manifest["layers"][0]["digest"]
    new_layer = s2.mountpoint / b64ref(old.ref) / new_key
    assert (new_layer / "diff" / "app" / "conf").read_bytes() == b"new\n"


def test_cache_survives_restart_and_corrupt_entries_are_refetched(
    registry: LocalRegistry, tmp_path: Path, stores: list[StoreProcess]
) -> None:
    data = hashlib.shake_256(b"corrupt-me").digest(300_000)
    img = esgz_image(registry, "fuse/restart-corrupt", "v1", {"d.bin": data})
    key = img.manifest["layers"][0]["digest"]
    s1 = start(stores, tmp_path)
    assert (s1.mountpoint / b64ref(img.ref) / key / "diff" / "d.bin").read_bytes() == data
    s1.wait_cached(5)
    crash(s1, signal.SIGKILL)
    entries = s1.cached_chunks()
    assert len(entries) == 5  # 300 kB in 64 KiB chunks
    entries[0].write_bytes(b"\xff" * entries[0].stat().st_size)
    s2 = start(stores, tmp_path)
    mark = registry.mark()
    assert (s2.mountpoint / b64ref(img.ref) / key / "diff" / "d.bin").read_bytes() == data
    chunk_gets = [e for e in registry.blob_gets(mark, key) if e.status == 206]
    # exactly one chunk request, for the damaged entry (footer+TOC come from the kept tail)
    assert len(chunk_gets) == 1, chunk_gets
    assert s2.events("chunk_cache.corrupt")


def test_after_a_restart_cached_files_need_no_registry(
    tmp_path: Path, stores: list[StoreProcess]
) -> None:
    """What the state DB recorded, the kept footer+TOC and the disk cache together serve a
    layer read before the restart with the registry gone (here: stopped for good)."""
    files = {"app/big.bin": hashlib.shake_256(b"offline").digest(200_000), "app/conf": b"c\n"}
    own = LocalRegistry()
    own.start(tmp_path / "registry")
    try:
        img = esgz_image(own, "fuse/offline", "v1", files)
        key = img.manifest["layers"][0]["digest"]
        s1 = start(stores, tmp_path)
        layer = s1.mountpoint / b64ref(img.ref) / key
        info = (layer / "info").read_bytes()
        for name, data in files.items():
            assert (layer / "diff" / name).read_bytes() == data
        crash(s1, signal.SIGTERM)  # writes the chunks still queued for the disk cache
    finally:
        own.close()
    s2 = start(stores, tmp_path)
    since = s2.mark()
    layer = s2.mountpoint / b64ref(img.ref) / key
    assert (layer / "info").read_bytes() == info
    for name, data in files.items():
        assert (layer / "diff" / name).read_bytes() == data
    prepared = s2.events("layer.prepared", since=since)
    assert [e.get("from_state") for e in prepared] == [True]
    assert not s2.problems()

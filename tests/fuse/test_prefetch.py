"""Prefetch of the `.prefetch.landmark` region at a layer's first use, and background fetch of
the rest, against a real mount and registry (requests are counted in the registry's log)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from store.estargz import build_estargz_bytes
from tests.harness.images import TarLayer, b64ref
from tests.harness.procutil import wait_for
from tests.harness.registry import LayerBlob, LocalRegistry, PushedImage
from tests.harness.store import StoreProcess

TOC_ANN = "containerd.io/snapshot/stargz/toc.digest"
SIZE_ANN = "io.containers.estargz.uncompressed-size"
WAIT = 60.0  # generous: a bound for a hung store, not a speed check

FILES = {
    "app/run.sh": b"#!/bin/sh\necho run\n",
    "app/lib.bin": hashlib.shake_256(b"lib").digest(400_000),
    "data/cold.bin": hashlib.shake_256(b"cold").digest(900_000),
    "data/notes.txt": b"rarely read\n" * 100,
}
PRIORITIZED = ["app/run.sh", "app/lib.bin"]


def push_image(registry: LocalRegistry, repo: str) -> PushedImage:
    t = TarLayer()
    for name, data in FILES.items():
        t.file(name, data)
    blob, res = build_estargz_bytes(t.bytes(), chunk_size=64 * 1024, prioritized=PRIORITIZED)
    ann = {TOC_ANN: res.toc_digest, SIZE_ANN: str(res.uncompressed_size)}
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers",
              "diff_ids": [res.diff_id]}}
    return registry.push_image(repo, "v1", [LayerBlob(blob, annotations=ann)], config)


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator:
    made: list[StoreProcess] = []

    def make(name: str, config: str) -> StoreProcess:
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(config)
        s = StoreProcess(tmp_path / name / "root", tmp_path / name / "mnt", ["--config", str(cfg)])
        made.append(s)
        return s.start()

    yield make
    for s in made:
        s.stop()


def chunk_gets(registry: LocalRegistry, mark: int, digest: str) -> list:
    return [e for e in registry.blob_gets(mark, digest) if e.status == 206]


def test_prefetch_fetches_the_landmark_region_in_one_request(
    registry: LocalRegistry, make_store
) -> None:
    img = push_image(registry, "fuse/prefetch-on")
    digest = img.manifest["layers"][0]["digest"]
    store = make_store("on", "[prefetch]\nenabled = true\nbackground = false\n")
    mark = registry.mark()
    layer = store.mountpoint / b64ref(img.ref) / digest
    assert (layer / "info").exists()  # first use: the layer is prepared, prefetch starts
    assert wait_for(lambda: store.events("prefetch.done"), WAIT, alive=store.alive)
    (done,) = store.events("prefetch.done")
    assert done["chunks"] == 8  # run.sh + 7 chunks of lib.bin
    gets = chunk_gets(registry, mark, digest)
    assert len(gets) == 2, gets  # footer+TOC, then the whole region at once
    after = registry.mark()
    for name in PRIORITIZED:
        assert (layer / "diff" / name).read_bytes() == FILES[name]
    assert chunk_gets(registry, after, digest) == []  # the workload's files were there
    assert (layer / "diff" / "data/notes.txt").read_bytes() == FILES["data/notes.txt"]
    assert len(chunk_gets(registry, after, digest)) == 1  # the rest stays lazy
    assert not store.events("background.done")


def test_prefetch_can_be_switched_off(registry: LocalRegistry, make_store) -> None:
    img = push_image(registry, "fuse/prefetch-off")
    digest = img.manifest["layers"][0]["digest"]
    store = make_store("off", "[prefetch]\nenabled = false\n")
    layer = store.mountpoint / b64ref(img.ref) / digest
    mark = registry.mark()
    assert (layer / "diff" / "app/run.sh").read_bytes() == FILES["app/run.sh"]
    # footer+TOC and the one small chunk that was read, nothing else
    assert len(chunk_gets(registry, mark, digest)) == 2
    assert not store.events("prefetch.done")


def test_background_fetch_fills_the_disk_cache(registry: LocalRegistry, make_store) -> None:
    img = push_image(registry, "fuse/prefetch-bg")
    digest = img.manifest["layers"][0]["digest"]
    store = make_store(
        "bg",
        "[prefetch]\nenabled = true\nbackground = true\nbackground_concurrency = 2\n"
        "background_mbps = 400.0\n",
    )
    mark = registry.mark()
    layer = store.mountpoint / b64ref(img.ref) / digest
    assert (layer / "info").exists()
    assert wait_for(lambda: store.events("background.done"), WAIT, alive=store.alive)
    (done,) = store.events("background.done")
    assert done["chunks"] == 14 + 1 + 1  # cold.bin in 64 KiB chunks, notes.txt, landmark
    # merged: far fewer requests than chunks (TOC, prefetch region, background groups)
    assert len(chunk_gets(registry, mark, digest)) <= 4
    after = registry.mark()
    for name, data in FILES.items():
        assert (layer / "diff" / name).read_bytes() == data
    assert chunk_gets(registry, after, digest) == []  # everything came from the caches
    assert len(store.wait_cached(8 + 16, WAIT)) == 8 + 16

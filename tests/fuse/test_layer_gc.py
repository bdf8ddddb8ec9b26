"""Layers Podman no longer uses are dropped from memory, and come back when asked for.

Podman signals use by creating `<ref>/<key>/use` and release by `rmdir <ref>/<key>` (both
answered ENOENT). At a count of zero the store asks the kernel to let go of the layer's cached
entries; once the kernel has forgotten every inode of the layer, it is dropped (`layer.dropped`)
and a later lookup resolves it again from the state DB. Nothing the kernel still holds (an open
file, an overlay lower dir) is ever dropped.
"""

from __future__ import annotations

import errno
import hashlib
import os
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
WAIT = 60.0  # a bound for a hung store, not a speed check


def esgz_image(registry: LocalRegistry, repo: str, files: dict[str, bytes]) -> PushedImage:
    t = TarLayer()
    for name, data in files.items():
        t.file(name, data)
    blob, res = build_estargz_bytes(t.bytes(), chunk_size=64 * 1024)
    ann = {TOC_ANN: res.toc_digest, SIZE_ANN: str(res.uncompressed_size)}
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [res.diff_id]}}
    return registry.push_image(repo, "v1", [LayerBlob(blob, annotations=ann)], config)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StoreProcess]:
    s = StoreProcess(tmp_path / "root", tmp_path / "mnt")
    try:
        yield s.start()
    finally:
        s.stop()


def use(layer: Path) -> None:
    """What c/storage does to say it uses a layer: create `use`, expecting ENOENT."""
    with pytest.raises(FileNotFoundError):
        os.close(os.open(layer / "use", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666))


def release(layer: Path) -> None:
    """What c/storage does to release it: rmdir the layer directory, expecting ENOENT."""
    with pytest.raises(OSError) as err:
        os.rmdir(layer)
    assert err.value.errno == errno.ENOENT


def dropped(store: StoreProcess, blob: str, since: int) -> list[dict]:
    return [e for e in store.events("layer.dropped", since=since) if e.get("blob") == blob]


def drop_kernel_caches() -> None:
    """Make the kernel forget every inode nobody holds (as memory pressure would)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


def test_released_layer_is_dropped_and_resolved_again(
    registry: LocalRegistry, store: StoreProcess
) -> None:
    data = hashlib.shake_256(b"gc-released").digest(200_000)
    img = esgz_image(registry, "fuse/gc-released", {"app/data.bin": data})
    blob = img.manifest["layers"][0]["digest"]
    layer = store.mountpoint / b64ref(img.ref) / blob
    info = (layer / "info").read_bytes()
    assert (layer / "diff" / "app" / "data.bin").read_bytes() == data
    mark = store.mark()
    use(layer)  # pull: lookup handle
    use(layer)  # commit: the local layer exists
    release(layer)  # end of pull: still one use left
    release(layer)  # podman rmi: none left
    # the kernel lets go of the layer's entries at the store's request; the layer goes
    assert wait_for(lambda: dropped(store, blob, mark), WAIT, alive=store.alive), \
        store.log_tail()
    # and comes back, from what the state DB recorded, when asked for again
    again = store.mark()
    assert (layer / "info").read_bytes() == info
    assert (layer / "diff" / "app" / "data.bin").read_bytes() == data
    prepared = store.events("layer.prepared", since=again)
    assert [e.get("from_state") for e in prepared] == [True]
    assert not store.problems()


def test_layer_in_use_by_the_kernel_is_kept(
    registry: LocalRegistry, store: StoreProcess
) -> None:
    held_data = hashlib.shake_256(b"gc-held").digest(300_000)
    held = esgz_image(registry, "fuse/gc-held", {"held.bin": held_data})
    other = esgz_image(registry, "fuse/gc-other", {"other.bin": b"other\n"})
    held_blob = held.manifest["layers"][0]["digest"]
    other_blob = other.manifest["layers"][0]["digest"]
    held_layer = store.mountpoint / b64ref(held.ref) / held_blob
    other_layer = store.mountpoint / b64ref(other.ref) / other_blob
    assert (other_layer / "diff" / "other.bin").read_bytes() == b"other\n"
    mark = store.mark()
    # an open file stands for any kernel reference (an overlay lower dir holds them too)
    fd = os.open(held_layer / "diff" / "held.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 1000, 0) == held_data[:1000]
        # released while the kernel still holds it (and a restart lost the earlier uses)
        release(held_layer)
        drop_kernel_caches()
        # the unheld layer of another image goes: the kernel's forgets have been seen...
        assert wait_for(lambda: dropped(store, other_blob, mark), WAIT, alive=store.alive)
        # ...but the held one stays, and the open file reads on, verified
        assert dropped(store, held_blob, mark) == []
        assert os.pread(fd, len(held_data), 0) == held_data
    finally:
        os.close(fd)
    drop_kernel_caches()
    assert wait_for(lambda: dropped(store, held_blob, mark), WAIT, alive=store.alive)
    assert (held_layer / "diff" / "held.bin").read_bytes() == held_data
    assert not store.problems()


def test_every_unused_path_to_a_released_layer_is_let_go(
    registry: LocalRegistry, store: StoreProcess
) -> None:
    """One layer seen under both key kinds (blob digest, TOC digest): releasing the path
    Podman used lets the kernel drop the other, unused one too, so the layer goes."""
    data = hashlib.shake_256(b"gc-two-paths").digest(100_000)
    img = esgz_image(registry, "fuse/gc-two-paths", {"f.bin": data})
    desc = img.manifest["layers"][0]
    by_blob = store.mountpoint / b64ref(img.ref) / desc["digest"]
    by_toc = store.mountpoint / b64ref(img.ref) / desc["annotations"][TOC_ANN]
    assert (by_blob / "diff" / "f.bin").read_bytes() == data
    assert (by_toc / "diff" / "f.bin").read_bytes() == data
    assert os.stat(by_blob / "diff" / "f.bin").st_ino == os.stat(by_toc / "diff" / "f.bin").st_ino
    mark = store.mark()
    use(by_blob)
    release(by_blob)
    assert wait_for(lambda: dropped(store, desc["digest"], mark), WAIT, alive=store.alive), \
        store.log_tail()
    (event,) = dropped(store, desc["digest"], mark)
    assert event["paths"] == 2
    assert (by_toc / "diff" / "f.bin").read_bytes() == data

"""A real mount of `layerstore serve` against the real local registry.

Layers are built here (tarfile), converted with our eStargz writer, pushed to the registry,
and the store's `diff/` tree is compared entry by entry with the tar it came from.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from store.estargz import build_estargz_bytes, encode_footer, read_toc_bytes
from tests.harness.images import MTIME, TarLayer, b64ref
from tests.harness.registry import LayerBlob, LocalRegistry, PushedImage
from tests.harness.store import StoreProcess

TOC_ANN = "containerd.io/snapshot/stargz/toc.digest"
SIZE_ANN = "io.containers.estargz.uncompressed-size"


def sample_tar() -> bytes:
    big = hashlib.sha256(b"seed").digest() * (300_000 // 32)  # spans several 64 KiB chunks
    layer = (
        TarLayer()
        .dir("etc")
        .file("etc/hostname", b"layerstore\n")
        .file("etc/empty", b"")
        .dir("bin")
        .file("bin/tool", b"#!/bin/sh\necho tool\n", mode=0o4755)
        .hardlink("bin/tool-link", "bin/tool")
        .symlink("bin/sh", "tool")
        .symlink("abs", "/etc/hostname")
        .dir("tmp", mode=0o1777)
        .file("data/big.bin", big, uid=1000, gid=1000)
        .file("data/attr.txt", b"x", xattrs={"user.layerstore": "yes"})
        .fifo("data/pipe")
        .whiteout("etc/motd")
        .dir("opt/replaced")
        .opaque("opt/replaced")
        .file("opt/replaced/new.txt", b"new\n")
    )
    return layer.bytes()


def esgz_layer(tar: bytes, **options: object) -> tuple[LayerBlob, str]:
    blob, res = build_estargz_bytes(tar, chunk_size=64 * 1024, **options)
    ann = {TOC_ANN: res.toc_digest, SIZE_ANN: str(res.uncompressed_size)}
    return LayerBlob(blob, annotations=ann), res.diff_id


def push(registry: LocalRegistry, repo: str, layers: list[tuple[LayerBlob, str]]) -> PushedImage:
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]},
    }
    return registry.push_image(repo, "v1", [b for b, _ in layers], config)


@pytest.fixture(scope="module")
def image(registry: LocalRegistry) -> tuple[PushedImage, bytes, str]:
    tar = sample_tar()
    layer, diff_id = esgz_layer(tar)
    return push(registry, "fuse/sample", [(layer, diff_id)]), tar, diff_id


def layer_dir(mount: Path, pushed: PushedImage, key: str) -> Path:
    return mount / b64ref(pushed.ref) / key


def expected_view(tar: bytes) -> dict[str, tuple]:
    """What diff/ must show: the tar, with whiteouts as 0:0 char devices, markers hidden."""
    out: dict[str, tuple] = {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        members = tf.getmembers()
        data = {m.name: tf.extractfile(m).read() for m in members if m.isfile()}
    names = {m.name for m in members}
    for m in members:
        base = os.path.basename(m.name)
        parent = os.path.dirname(m.name)
        if base == ".wh..wh..opq":
            continue
        if base.startswith(".wh."):
            target = os.path.join(parent, base[4:])
            if target not in names:
                out[target] = ("chr", 0, 0, 0, None)
            continue
        if m.isdir():
            out[m.name] = ("dir", m.mode, m.uid, m.gid, None)
        elif m.issym():
            out[m.name] = ("lnk", m.mode, m.uid, m.gid, m.linkname)
        elif m.isfifo():
            out[m.name] = ("fifo", m.mode, m.uid, m.gid, None)
        elif m.islnk():
            src = next(x for x in members if x.name == m.linkname)
            out[m.name] = (
                "reg",
                src.mode,
                src.uid,
                src.gid,
                hashlib.sha256(data[src.name]).hexdigest(),
            )
        else:
            out[m.name] = ("reg", m.mode, m.uid, m.gid, hashlib.sha256(data[m.name]).hexdigest())
    # implicit parents ("data", "opt") are synthesised with mode 0755
    for path in list(out):
        p = os.path.dirname(path)
        while p and p not in out:
            out[p] = ("dir", 0o755, 0, 0, None)
            p = os.path.dirname(p)
    return out


def walk(diff: Path) -> dict[str, tuple]:
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(diff):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(diff))
            st = os.lstat(full)
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", perm, st.st_uid, st.st_gid, None)
            elif stat.S_ISLNK(st.st_mode):
                found[rel] = ("lnk", perm, st.st_uid, st.st_gid, os.readlink(full))
            elif stat.S_ISFIFO(st.st_mode):
                found[rel] = ("fifo", perm, st.st_uid, st.st_gid, None)
            elif stat.S_ISCHR(st.st_mode):
                assert st.st_rdev == 0, rel
                found[rel] = ("chr", perm, st.st_uid, st.st_gid, None)
            else:
                digest = hashlib.sha256(full.read_bytes()).hexdigest()
                found[rel] = ("reg", perm, st.st_uid, st.st_gid, digest)
    return found


def test_diff_tree_equals_the_tar(mount: Path, image: tuple[PushedImage, bytes, str]) -> None:
    pushed, tar, _ = image
    key = pushed.manifest["layers"][0]["digest"]
    diff = layer_dir(mount, pushed, key) / "diff"
    assert walk(diff) == expected_view(tar)


def test_special_attributes(mount: Path, image: tuple[PushedImage, bytes, str]) -> None:
    pushed, _, _ = image
    diff = layer_dir(mount, pushed, pushed.manifest["layers"][0]["digest"]) / "diff"
    tool, link = os.lstat(diff / "bin/tool"), os.lstat(diff / "bin/tool-link")
    assert tool.st_ino == link.st_ino and tool.st_nlink == 2
    assert tool.st_mode & stat.S_ISUID
    assert os.lstat(diff / "bin/sh").st_size == len("tool")
    assert os.lstat(diff / "data/big.bin").st_mtime == MTIME
    assert os.lstat(diff / "etc").st_mtime == MTIME
    assert os.getxattr(diff / "data/attr.txt", "user.layerstore") == b"yes"
    assert os.getxattr(diff / "opt/replaced", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(diff / "opt/replaced", "user.overlay.opaque") == b"y"
    assert set(os.listxattr(diff / "opt/replaced")) >= {
        "trusted.overlay.opaque",
        "user.overlay.opaque",
    }
    with pytest.raises(OSError) as exc:
        os.getxattr(diff / "etc/hostname", "user.absent")
    assert exc.value.errno == errno.ENODATA
    # markers and landmarks are hidden from listings and lookups
    assert not (diff / ".no.prefetch.landmark").exists()
    assert not (diff / "etc/.wh.motd").exists()
    assert sorted(os.listdir(diff / "opt/replaced")) == ["new.txt"]
    # inode numbers are stable
    assert os.lstat(diff / "etc/hostname").st_ino == os.lstat(diff / "etc/hostname").st_ino


def test_reads_at_any_offset(mount: Path, image: tuple[PushedImage, bytes, str]) -> None:
    pushed, tar, _ = image
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        want = tf.extractfile("data/big.bin").read()
    path = layer_dir(mount, pushed, pushed.manifest["layers"][0]["digest"]) / "diff/data/big.bin"
    with open(path, "rb") as f:
        for off, size in [
            (0, 1),
            (65535, 2),
            (65536, 65536),
            (100_000, 150_000),
            (len(want) - 3, 100),
            (len(want), 10),
        ]:
            f.seek(off)
            assert f.read(size) == want[off : off + size], (off, size)


def test_info_for_both_key_kinds(mount: Path, image: tuple[PushedImage, bytes, str]) -> None:
    pushed, _, diff_id = image
    desc = pushed.manifest["layers"][0]
    toc = desc["annotations"][TOC_ANN]
    usize = int(desc["annotations"][SIZE_ANN])
    by_blob = json.loads((layer_dir(mount, pushed, desc["digest"]) / "info").read_bytes())
    assert by_blob == {
        "compressed-diff-digest": desc["digest"],
        "compressed-size": desc["size"],
        "diff-digest": diff_id,
        "diff-size": usize,
        "compression": 2,
    }
    by_toc = json.loads((layer_dir(mount, pushed, toc) / "info").read_bytes())
    assert by_toc == {
        "toc-digest": toc,
        "compressed-size": desc["size"],
        "diff-size": usize,
        "compression": 2,
        "flags": {"expected-layer-diffid": diff_id},
    }
    # the TOC-keyed layer shows the same files
    assert (layer_dir(mount, pushed, toc) / "diff/etc/hostname").read_bytes() == b"layerstore\n"


def test_blob_is_the_registry_blob(mount: Path, image: tuple[PushedImage, bytes, str]) -> None:
    pushed, _, _ = image
    desc = pushed.manifest["layers"][0]
    blob = layer_dir(mount, pushed, desc["digest"]) / "blob"
    assert os.stat(blob).st_size == desc["size"]
    data = blob.read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == desc["digest"]
    # and it is still a valid gzip stream whose content is the layer's DiffID
    assert "sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest() == image[2]


def test_use_and_release_are_counted_and_answer_enoent(
    store: StoreProcess, mount: Path, image: tuple[PushedImage, bytes, str]
) -> None:
    pushed, _, _ = image
    key = pushed.manifest["layers"][0]["digest"]
    ldir = layer_dir(mount, pushed, key)
    mark = store.mark()
    assert not (ldir / "use").exists()
    for _ in range(2):
        with pytest.raises(FileNotFoundError):
            os.close(os.open(ldir / "use", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666))
    with pytest.raises(FileNotFoundError):
        os.rmdir(ldir)
    counts = [e["count"] for e in store.events("layer.use", since=mark)]
    assert counts == [1, 2]
    assert [e["count"] for e in store.events("layer.release", since=mark)] == [1]


def test_writes_are_refused(mount: Path, image: tuple[PushedImage, bytes, str]) -> None:
    pushed, _, _ = image
    diff = layer_dir(mount, pushed, pushed.manifest["layers"][0]["digest"]) / "diff"
    for action in (
        lambda: os.open(diff / "etc/hostname", os.O_WRONLY),
        lambda: os.mkdir(diff / "newdir"),
        lambda: os.unlink(diff / "etc/hostname"),
        lambda: os.symlink("x", diff / "newlink"),
        lambda: os.setxattr(diff / "etc/hostname", "user.x", b"1"),
    ):
        with pytest.raises(OSError) as exc:
            action()
        assert exc.value.errno == errno.EROFS


def test_statfs_works(mount: Path) -> None:
    st = os.statvfs(mount)
    assert st.f_namemax == 255


def test_kernel_read_ahead_is_raised_after_init(mount: Path) -> None:
    """The store sets its mount's read-ahead once the kernel took its INIT reply (any value set
    before that is capped back to the kernel default of 128 KiB)."""
    from store.fuse.mount import READ_AHEAD_KB, mount_device

    (mount / "not-base64!").exists()  # a lookup: the first one applies the setting
    device = mount_device(os.path.realpath(mount))
    assert device is not None
    ra = Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text().strip()
    assert int(ra) == READ_AHEAD_KB


@pytest.mark.parametrize(
    "name",
    [
        "not-base64!",
        b64ref("127.0.0.1:1/nothing:here"),  # unreachable registry
    ],
)
def test_unknown_refs_are_enoent_fast(mount: Path, name: str) -> None:
    assert not (mount / name / ("sha256:" + "0" * 64) / "diff").exists()


def test_not_served_layers_are_enoent(
    registry: LocalRegistry, mount: Path, image: tuple[PushedImage, bytes, str]
) -> None:
    tar = sample_tar()
    esgz, diff_id = esgz_layer(tar)
    plain = LayerBlob(gzip.compress(tar, mtime=0))
    no_size = LayerBlob(esgz.data, annotations={TOC_ANN: esgz.annotations[TOC_ANN]})
    plain_diff = "sha256:" + hashlib.sha256(tar).hexdigest()
    pushed = push(registry, "fuse/notserved", [(plain, plain_diff), (no_size, diff_id)])
    mark = registry.mark()
    for desc in pushed.manifest["layers"]:
        assert not (layer_dir(mount, pushed, desc["digest"]) / "diff").exists()
    # an unknown digest in a known image
    assert not (layer_dir(mount, pushed, "sha256:" + "1" * 64) / "diff").exists()
    # deciding that must not touch layer blobs
    layer_digests = {d["digest"] for d in pushed.manifest["layers"]}
    touched = [e for e in registry.requests_since(mark) if any(d in e.path for d in layer_digests)]
    assert touched == []


def _tamper_chunk_digest(blob: bytes, victim: str) -> tuple[bytes, str]:
    """Rewrite the TOC so *victim*'s chunk digest is wrong; return blob and new TOC digest."""
    toc = read_toc_bytes(lambda off, n: blob[off : off + n], len(blob))
    doc = json.loads(toc.json)
    for entry in doc["entries"]:
        if entry.get("name") == victim:
            entry["chunkDigest"] = "sha256:" + "f" * 64
            entry["digest"] = "sha256:" + "f" * 64
    new_json = json.dumps(doc).encode()
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        ti = tarfile.TarInfo("stargz.index.json")
        ti.size = len(new_json)
        tf.addfile(ti, io.BytesIO(new_json))
    member = gzip.compress(tar_buf.getvalue(), mtime=0)
    out = blob[: toc.toc_offset] + member + encode_footer(toc.toc_offset)
    return out, "sha256:" + hashlib.sha256(new_json).hexdigest()


def test_content_failing_verification_is_never_served(
    registry: LocalRegistry, store: StoreProcess, mount: Path
) -> None:
    tar = TarLayer().file("good.txt", b"good\n").file("bad.txt", b"bad\n").bytes()
    layer, diff_id = esgz_layer(tar)
    blob, toc_digest = _tamper_chunk_digest(layer.data, "bad.txt")
    tampered = LayerBlob(blob, annotations={TOC_ANN: toc_digest, SIZE_ANN: "1"})
    pushed = push(registry, "fuse/tampered", [(tampered, diff_id)])
    diff = layer_dir(mount, pushed, pushed.manifest["layers"][0]["digest"]) / "diff"
    assert (diff / "good.txt").read_bytes() == b"good\n"
    mark = store.mark()
    with pytest.raises(OSError) as exc:
        (diff / "bad.txt").read_bytes()
    assert exc.value.errno == errno.EIO
    failures = store.events("read.failed", since=mark)
    assert failures and "DigestMismatch" in failures[0]["cause"]
    # the mount is still alive afterwards
    assert (diff / "good.txt").read_bytes() == b"good\n"


def test_toc_digest_mismatch_is_not_served(registry: LocalRegistry, mount: Path) -> None:
    tar = TarLayer().file("a.txt", b"a\n").bytes()
    layer, diff_id = esgz_layer(tar)
    wrong = LayerBlob(
        layer.data,
        annotations={TOC_ANN: "sha256:" + "e" * 64, SIZE_ANN: layer.annotations[SIZE_ANN]},
    )
    pushed = push(registry, "fuse/wrongtoc", [(wrong, diff_id)])
    assert not (layer_dir(mount, pushed, pushed.manifest["layers"][0]["digest"]) / "diff").exists()

"""Self-tests of the e2e harness that do not need the store.

They prove that the pieces the lazy-pull tests stand on are right: the test images, the expected
tree computed from their tars, Podman's isolated configuration and the ctr-remote conversion.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
import requests

from tests.harness import images
from tests.harness.podman import PodmanEnv
from tests.harness.store import StoreError, StoreProcess

pytestmark = pytest.mark.e2e


def test_expected_tree_model(e2e_tree: images.Tree) -> None:
    """The tree computed from the tars applies whiteouts, opaque dirs and hardlinks."""
    t = e2e_tree.entries
    assert "/etc/motd" not in t
    assert sorted(p for p in t if p.startswith("/opt/replaced/")) == ["/opt/replaced/new.txt"]
    assert t["/data/bin/suid-tool"].mode == 0o4755
    assert t["/data/sticky"] == images.Entry("dir", 0o1777, 0, 0, 0, "")
    assert t["/tmp"].mode == 0o1777
    assert t["/data/links/relative"].content == "../hl/original.txt"
    assert t["/data/links/absolute"].content == "/etc/passwd"
    assert t["/data/fifo"].type == "fifo"
    assert t["/data/owned-by-app.txt"][2:4] == (1000, 1000)
    big = images.big_data()
    assert t["/data/big.bin"] == images.Entry(
        "reg", 0o644, 0, 0, images.BIG_SIZE, "sha256:" + hashlib.sha256(big).hexdigest()
    )
    assert frozenset({"/data/hl/original.txt", "/data/hl/second-name.txt"}) in e2e_tree.hardlinks
    assert e2e_tree.xattrs == {"/data/xattr.txt": {"user.layerstore": b"yes"}}
    assert len([p for p in t if p.startswith("/data/small/")]) == images.SMALL_FILES


def test_podman_env_is_isolated(podman_plain: PodmanEnv, busybox_gzip) -> None:
    """Config files are the test's own, and nothing lands in the machine's podman dirs."""
    var_lib_before = os.path.exists("/var/lib/containers")
    info = podman_plain.run("info", "--format", "{{.Store.GraphRoot}} {{.Store.RunRoot}}")
    graphroot, runroot = info.stdout.split()
    assert Path(graphroot) == podman_plain.graphroot
    assert Path(runroot) == podman_plain.runroot
    podman_plain.pull(busybox_gzip.ref)
    out = podman_plain.run_container(busybox_gzip.ref, ["echo", "hello from busybox"])
    assert out.stdout == "hello from busybox\n"
    assert not os.path.exists("/run/libpod")
    if podman_plain.var_lib_isolated:
        assert (podman_plain.blob_info_cache / "blob-info-cache-v1.boltdb").is_file()
        assert os.path.exists("/var/lib/containers") == var_lib_before


def test_plain_podman_gzip_image_tree(podman_plain: PodmanEnv, e2e_gzip) -> None:
    """A normal pull of `e2e:gzip` produces exactly the expected tree (validates the model)."""
    podman_plain.pull(e2e_gzip.ref)
    got = images.list_container(podman_plain, e2e_gzip.ref)
    want = e2e_gzip.tree.restrict(images.E2E_ROOTS, images.E2E_TOPS)
    assert images.tree_diff(want, got.entries) == []
    for group in e2e_gzip.tree.hardlinks:
        assert len({got.inodes[p] for p in group}) == 1, got.inodes
        assert {got.inodes[p][1] for p in group} == {len(group)}
    # xattrs: busybox has no getfattr, so look at the extracted layer on the host
    top = podman_plain.image_layers(e2e_gzip.ref)[-1]
    assert os.getxattr(top / "diff" / "data" / "xattr.txt", "user.layerstore") == b"yes"


@pytest.mark.parametrize("variant", ["esgz-ctr", "esgz-ours"])
def test_plain_podman_estargz_image_tree(podman_plain: PodmanEnv, e2e_image_of, variant) -> None:
    """Without the store, Podman pulls the eStargz variants as gzip; the tree is the same."""
    img = e2e_image_of(variant)
    podman_plain.pull(img.ref)
    got = images.list_container(podman_plain, img.ref)
    want = img.tree.restrict(images.E2E_ROOTS, images.E2E_TOPS)
    assert images.tree_diff(want, got.entries) == []
    top = podman_plain.image_layers(img.ref)[-1]
    assert os.getxattr(top / "diff" / "data" / "xattr.txt", "user.layerstore") == b"yes"


def _estargz_facts(host: str, repo: str, digest: str) -> tuple[int, str]:
    """(uncompressed size, sha256 of stargz.index.json) of an eStargz blob."""
    blob = requests.get(f"http://{host}/v2/{repo}/blobs/{digest}", timeout=60).content
    assert hashlib.sha256(blob).hexdigest() == digest.split(":", 1)[1]
    tar_bytes = gzip.decompress(blob)  # eStargz is a multi-member gzip stream of one tar
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        toc = tar.extractfile("stargz.index.json").read()
    return len(tar_bytes), "sha256:" + hashlib.sha256(toc).hexdigest()


@pytest.mark.parametrize("variant", ["esgz-ctr", "esgz-ours"])
def test_estargz_annotations(e2e_image_of, variant) -> None:
    """Each eStargz layer carries toc.digest and uncompressed-size, and both are true."""
    img = e2e_image_of(variant)
    assert len(img.manifest["layers"]) == 3
    for desc, diff_id in zip(img.manifest["layers"], img.diff_ids, strict=True):
        ann = desc.get("annotations", {})
        assert images.TOC_DIGEST in ann and images.UNCOMPRESSED_SIZE in ann, desc
        size, toc = _estargz_facts(img.host, img.repo, desc["digest"])
        assert int(ann[images.UNCOMPRESSED_SIZE]) == size
        assert ann[images.TOC_DIGEST] == toc
        assert diff_id.startswith("sha256:")


def test_store_process_reports_early_exit(tmp_path: Path) -> None:
    """A store that dies before mounting fails fast with its log, and leaves nothing mounted."""
    proc = StoreProcess(tmp_path / "root", tmp_path / "mnt", ["--no-such-option"])
    with pytest.raises(StoreError, match="exited with 2"):
        proc.start(timeout=15)
    assert proc.stop() == 2
    assert not os.path.ismount(tmp_path / "mnt")


def test_busybox_quick(podman_plain: PodmanEnv, busybox_gzip) -> None:
    podman_plain.pull(busybox_gzip.ref)
    out = podman_plain.run_container(
        busybox_gzip.ref, ["sh", "-c", "stat -c '%a' /tmp; id -u; cat /etc/passwd | head -1"]
    )
    assert out.stdout.split("\n")[:3] == ["1777", "0", "root:x:0:0:root:/root:/bin/sh"]
    mode = os.stat(podman_plain.image_layers(busybox_gzip.ref)[0] / "diff" / "tmp").st_mode
    assert stat.S_IMODE(mode) == 0o1777


def test_ctr_remote_zstdchunked(containerd, registry, busybox_gzip) -> None:
    """`convert_zstdchunked` pushes zstd layers carrying the zstd:chunked TOC annotations."""
    dst = f"{registry.host}/busybox:zstdchunked-ctr"
    containerd.convert_zstdchunked(busybox_gzip.ref, dst)
    img = images.fetch_image(registry.host, "busybox", "zstdchunked-ctr", busybox_gzip.tree)
    (desc,) = img.manifest["layers"]
    assert desc["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
    ann = desc["annotations"]
    assert images.TOC_DIGEST in ann
    assert any(k.startswith("io.containers.zstd-chunked.manifest-") for k in ann), ann


def test_podman_env_paths_for_a_chroot_prefix(tmp_path: Path) -> None:
    """With `root=R` (a chroot prefix), config paths are written as podman inside R sees them."""
    root = tmp_path / "root"
    (root / "tmp").mkdir(parents=True)
    env = PodmanEnv(
        root / "tmp" / "env", "127.0.0.1:5000", als=root / "tmp" / "als",
        prefix=("chroot", str(root), "podman"),
        root=root,
    )
    try:
        assert env.command == ("chroot", str(root), "podman")
        assert not env.var_lib_isolated
        conf = env.storage_conf.read_text()
        assert 'graphroot = "/tmp/env/storage"' in conf
        assert 'additionallayerstores = ["/tmp/als:ref"]' in conf
        assert f'runroot = "/tmp/{env.runroot.name}"' in conf
        assert env.env["CONTAINERS_STORAGE_CONF"] == "/tmp/env/storage.conf"
        assert (root / "tmp" / "als").is_dir()
    finally:
        env.runroot.rmdir()

"""`layerstore convert` registry to registry, checked by `layerstore serve` and by the registry.

Every conversion runs the real command (`python -m store convert`) as a subprocess; results
are read back from the registry and through a real FUSE mount of the store.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.harness import images
from tests.harness.registry import LayerBlob, LocalRegistry, write_htpasswd
from tests.harness.store import StoreProcess
from tests.unit.test_convert_support import (
    MT_GZIP,
    OCI_INDEX,
    OCI_MANIFEST,
    TOC_DIGEST,
    USIZE,
    content_files,
    image_config,
    make_tar,
    read_estargz,
    sha,
    tar_files,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST])


def run_convert(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "store", "convert", *args],
        capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL,
    )


def get_manifest(reg: LocalRegistry, repo: str, ref: str) -> requests.Response:
    return requests.get(f"{reg.url}/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT},
                        timeout=30)


def get_blob(reg: LocalRegistry, repo: str, digest: str) -> bytes:
    r = requests.get(f"{reg.url}/v2/{repo}/blobs/{digest}", timeout=60)
    r.raise_for_status()
    return r.content


@pytest.fixture(scope="module")
def source_tars() -> list[bytes]:
    """busybox + a data layer with a multi-chunk file, hardlinks, symlinks, xattrs, a fifo."""
    return [images.busybox_layer().bytes(), images.data_layer(big_size=9 << 20)]


@pytest.fixture(scope="module")
def source_image(registry: LocalRegistry, source_tars: list[bytes]) -> str:
    layers = [LayerBlob(gzip.compress(t, compresslevel=1, mtime=0)) for t in source_tars]
    return registry.push_image("conv/src", "v1", layers, image_config(
        [sha(t) for t in source_tars])).ref


@pytest.fixture(scope="module")
def converted(registry: LocalRegistry, source_image: str) -> dict:
    dst = f"{registry.host}/conv/dst:esgz"
    proc = run_convert("--chunk-size", str(1 << 20), source_image, dst)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # not a TTY: quiet
    r = get_manifest(registry, "conv/dst", "esgz")
    r.raise_for_status()
    manifest = r.json()
    config = json.loads(get_blob(registry, "conv/dst", manifest["config"]["digest"]))
    return {"ref": dst, "manifest": manifest, "config": config,
            "digest": r.headers["Docker-Content-Digest"], "stdout": proc.stdout}


def test_registry_to_registry(registry, converted, source_tars) -> None:
    manifest, config = converted["manifest"], converted["config"]
    assert manifest["mediaType"] == OCI_MANIFEST
    assert config["history"] == image_config(["x"] * 2)["history"]
    for desc, tar, diff_id in zip(manifest["layers"], source_tars, config["rootfs"]["diff_ids"],
                                  strict=True):
        assert desc["mediaType"] == MT_GZIP
        blob = get_blob(registry, "conv/dst", desc["digest"])
        _, files = read_estargz(blob, desc["annotations"][TOC_DIGEST])
        assert content_files(files) == tar_files(tar)
        inner = gzip.decompress(blob)
        assert sha(inner) == diff_id and int(desc["annotations"][USIZE]) == len(inner)
    assert converted["digest"] in converted["stdout"]


def test_reproducible(registry, converted, source_image) -> None:
    proc = run_convert("--chunk-size", str(1 << 20), source_image,
                       f"{registry.host}/conv/again:esgz")
    assert proc.returncode == 0, proc.stderr
    again = get_manifest(registry, "conv/again", "esgz").headers["Docker-Content-Digest"]
    assert again == converted["digest"]


def test_already_estargz_is_kept_and_mounted(registry, converted) -> None:
    mark = registry.mark()
    proc = run_convert(converted["ref"], f"{registry.host}/conv/copy:v1")
    assert proc.returncode == 0, proc.stderr
    r = get_manifest(registry, "conv/copy", "v1")
    assert r.headers["Docker-Content-Digest"] == converted["digest"]
    mounts = [e for e in registry.requests_since(mark) if e.method == "POST" and "mount=" in e.path]
    assert sorted(e.status for e in mounts) == [201, 201]  # both layers mounted, not uploaded


def test_multi_platform_index(registry) -> None:
    tars = [make_tar({"arch": a.encode()}) for a in ("amd64", "arm64")]
    pushed = [
        registry.push_image("conv/multi", a, [LayerBlob(gzip.compress(t, mtime=0))],
                            image_config([sha(t)], arch=a))
        for t, a in zip(tars, ("amd64", "arm64"), strict=True)
    ]
    registry.push_index("conv/multi", "index", [
        (p.manifest_digest, len(p.manifest_bytes), {"os": "linux", "architecture": a})
        for p, a in zip(pushed, ("amd64", "arm64"), strict=True)
    ])
    proc = run_convert("--all-platforms", f"{registry.host}/conv/multi:index",
                       f"{registry.host}/conv/multi-esgz:index")
    assert proc.returncode == 0, proc.stderr
    index = get_manifest(registry, "conv/multi-esgz", "index").json()
    assert index["mediaType"] == OCI_INDEX
    for entry, tar in zip(index["manifests"], tars, strict=True):
        manifest = get_manifest(registry, "conv/multi-esgz", entry["digest"]).json()
        desc = manifest["layers"][0]
        blob = get_blob(registry, "conv/multi-esgz", desc["digest"])
        assert content_files(read_estargz(blob, desc["annotations"][TOC_DIGEST])[1]) == \
            tar_files(tar)
    proc = run_convert("--platform", "linux/arm64", f"{registry.host}/conv/multi:index",
                       f"{registry.host}/conv/multi-esgz:arm64")
    assert proc.returncode == 0, proc.stderr
    manifest = get_manifest(registry, "conv/multi-esgz", "arm64").json()
    assert manifest["mediaType"] == OCI_MANIFEST
    config = json.loads(get_blob(registry, "conv/multi-esgz", manifest["config"]["digest"]))
    assert config["architecture"] == "arm64"


# --- served by `layerstore serve` -------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreProcess]:
    work = tmp_path_factory.mktemp("convert-store")
    with StoreProcess(work / "root", work / "mnt") as proc:  # stopped even on failure
        yield proc


def _tree_of(root: Path) -> tuple[dict[str, images.Entry], dict[str, dict[str, bytes]]]:
    entries: dict[str, images.Entry] = {}
    xattrs: dict[str, dict[str, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            st = os.lstat(full)
            rel = "/" + str(full.relative_to(root))
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                e = images.Entry("dir", mode, st.st_uid, st.st_gid, 0, "")
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
                e = images.Entry("symlink", mode, st.st_uid, st.st_gid, len(target.encode()),
                                 target)
            elif stat.S_ISFIFO(st.st_mode):
                e = images.Entry("fifo", mode, st.st_uid, st.st_gid, 0, "")
            else:
                digest = "sha256:" + hashlib.sha256(full.read_bytes()).hexdigest()
                e = images.Entry("reg", mode, st.st_uid, st.st_gid, st.st_size, digest)
            entries[rel] = e
            names = [] if stat.S_ISLNK(st.st_mode) else os.listxattr(full)
            if names:
                xattrs[rel] = {n: os.getxattr(full, n) for n in names}
    return entries, xattrs


def test_served_by_the_store(store: StoreProcess, converted, source_tars) -> None:
    """Every file of every converted layer, read through the FUSE mount, equals the source;
    the info records carry the rewritten DiffIDs and the annotated sizes."""
    ref = converted["ref"]
    for i, (desc, tar) in enumerate(zip(converted["manifest"]["layers"], source_tars,
                                        strict=True)):
        layer_dir = store.mountpoint / images.b64ref(ref) / desc["digest"]
        info = json.loads((layer_dir / "info").read_bytes())
        assert info["compressed-diff-digest"] == desc["digest"]
        assert info["compressed-size"] == desc["size"]
        assert info["diff-digest"] == converted["config"]["rootfs"]["diff_ids"][i]
        assert info["diff-size"] == int(desc["annotations"][USIZE])
        expected = images.apply_layers([tar])
        entries, xattrs = _tree_of(layer_dir / "diff")
        want = {p: e for p, e in expected.entries.items() if p != "/"}
        assert images.tree_diff(want, entries) == []
        assert xattrs == expected.xattrs
        for group in expected.hardlinks:
            inodes = {os.lstat(layer_dir / "diff" / p.lstrip("/")).st_ino for p in group}
            assert len(inodes) == 1, group
        toc_dir = store.mountpoint / images.b64ref(ref) / desc["annotations"][TOC_DIGEST]
        by_toc = json.loads((toc_dir / "info").read_bytes())
        assert by_toc["toc-digest"] == desc["annotations"][TOC_DIGEST]


# --- bad input --------------------------------------------------------------------------------


def _evil_tar(name: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        ti = tarfile.TarInfo(name)
        ti.size = 4
        tar.addfile(ti, io.BytesIO(b"evil"))
    return buf.getvalue()


def _push_bad(registry: LocalRegistry, case: str) -> str:
    good = make_tar({"ok": b"fine"})
    gz = gzip.compress(good, mtime=0)
    repo = f"conv/bad-{case}"
    if case in ("dotdot", "absolute"):
        tar = _evil_tar("../../etc/evil" if case == "dotdot" else "/etc/evil")
        layers, tars = [LayerBlob(gzip.compress(tar, mtime=0))], [tar]
    elif case == "corrupt-gzip":
        layers, tars = [LayerBlob(gz[:20] + bytes(b ^ 0x5A for b in gz[20:]))], [good]
    elif case == "unsupported":
        layers, tars = [LayerBlob(gz, "application/vnd.example.unknown.layer")], [good]
    else:  # missing blob: pushed, then deleted from the repository
        layers, tars = [LayerBlob(gz)], [good]
    # a good layer first: a failure in the second must still push nothing under the tag
    first = make_tar({"first": b"layer"})
    pushed = registry.push_image(repo, "v1", [LayerBlob(gzip.compress(first, mtime=0)), *layers],
                                 image_config([sha(first), *(sha(t) for t in tars)]))
    if case == "missing":
        digest = pushed.manifest["layers"][1]["digest"]
        r = requests.delete(f"{registry.url}/v2/{repo}/blobs/{digest}", timeout=30)
        assert r.status_code == 202, r.text
    return pushed.ref


@pytest.mark.parametrize(
    "case", ["dotdot", "absolute", "corrupt-gzip", "unsupported", "missing"]
)
def test_bad_input_fails_cleanly(registry: LocalRegistry, case: str) -> None:
    src = _push_bad(registry, case)
    mark = registry.mark()
    proc = run_convert(src, f"{registry.host}/conv/bad-dst:{case}")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerstore: convert: "), proc.stderr
    assert get_manifest(registry, "conv/bad-dst", case).status_code == 404
    # converted in a work directory first: nothing at all was written to DST
    writes = [e for e in registry.requests_since(mark) if e.method in ("POST", "PUT", "PATCH")]
    assert writes == []


def test_push_denied(registry: LocalRegistry, source_image: str, tmp_path: Path) -> None:
    try:
        htpasswd = write_htpasswd(tmp_path / "htpasswd", "alice", "secret")
    except (ImportError, RuntimeError) as exc:
        pytest.fail(f"cannot write an htpasswd file here: {exc}")
    with LocalRegistry().start(tmp_path / "reg", htpasswd=htpasswd) as locked:
        proc = run_convert(source_image, f"{locked.host}/conv/denied:v1")
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Basic credentials" in lines[0], proc.stderr
        r = requests.get(f"{locked.url}/v2/conv/denied/manifests/v1", auth=("alice", "secret"),
                         headers={"Accept": ACCEPT}, timeout=30)
        assert r.status_code == 404

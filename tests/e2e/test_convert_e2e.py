"""`layerstore convert` output end to end: lazily pulled and run by real Podman through the store,
and checked against the reference tooling (containerd + ctr-remote) in both directions."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.harness import images
from tests.harness.containerd import Containerd
from tests.harness.podman import PodmanEnv
from tests.harness.registry import LocalRegistry
from tests.unit.test_convert_support import TOC_DIGEST, USIZE, content_files, read_estargz, sha

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_convert(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "store", "convert", *args],
        capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL,
    )


def blob(reg: LocalRegistry, repo: str, digest: str) -> bytes:
    r = requests.get(f"{reg.url}/v2/{repo}/blobs/{digest}", timeout=120)
    r.raise_for_status()
    return r.content


def regular_files(tar: bytes) -> dict[str, bytes]:
    from tests.unit.test_convert_support import tar_files

    return tar_files(tar)


@pytest.fixture(scope="module")
def e2e_converted(registry: LocalRegistry, e2e_gzip: images.TestImage, e2e_tree):
    """`e2e:esgz-conv`: `e2e:gzip` converted by `layerstore convert`."""
    proc = run_convert(e2e_gzip.ref, f"{registry.host}/e2e:esgz-conv")
    assert proc.returncode == 0, proc.stderr
    return images.fetch_image(registry.host, "e2e", "esgz-conv", e2e_tree)


def test_podman_lazy_pulls_and_runs_converted_image(
    registry: LocalRegistry, store, podman_store: PodmanEnv, e2e_converted: images.TestImage,
    e2e_tree: images.Tree,
) -> None:
    mark = registry.mark()
    podman_store.pull(e2e_converted.ref)
    full = [
        e for e in registry.requests_since(mark)
        if e.method == "GET" and e.status == 200
        and any(e.path.endswith(f"/blobs/{d}") for d in e2e_converted.layer_digests)
    ]
    assert full == [], "a layer blob was downloaded in full: the pull was not lazy"
    out = podman_store.run_container(e2e_converted.ref, ["sha256sum", "/data/big.bin"]).stdout
    assert "sha256:" + out.split()[0] == e2e_tree.entries["/data/big.bin"].content
    listing = images.parse_listing(
        podman_store.run_container(e2e_converted.ref, images.listing_command()).stdout
    )
    expected = e2e_tree.restrict(images.E2E_ROOTS, images.E2E_TOPS)
    assert images.tree_diff(expected, listing.entries) == []


def test_containerd_accepts_our_output(
    registry: LocalRegistry, containerd: Containerd, e2e_converted: images.TestImage,
    e2e_tars: list[bytes],
) -> None:
    """containerd pulls and unpacks it (unpacking checks each layer against the config's
    DiffID), `ctr-remote image get-toc-digest` (the Go estargz reader) finds the same TOC
    digest as our annotation, and our reader verifies the TOC and every chunk digest."""
    containerd.ctr("image", "pull", "--plain-http", e2e_converted.ref)
    check = containerd.ctr("image", "check", f"name=={e2e_converted.ref}").stdout
    line = next(ln for ln in check.splitlines() if ln.startswith(e2e_converted.ref))
    # columns: REF TYPE DIGEST STATUS SIZE UNPACKED; unpacking verified every DiffID
    assert "complete" in line and line.split()[-1] == "true", check
    for desc, diff_id, tar in zip(e2e_converted.manifest["layers"], e2e_converted.diff_ids,
                                  e2e_tars, strict=True):
        got = containerd.ctr("image", "get-toc-digest", desc["digest"]).stdout.strip()
        assert got == desc["annotations"][TOC_DIGEST]
        data = blob(registry, "e2e", desc["digest"])
        _, files = read_estargz(data, desc["annotations"][TOC_DIGEST])
        assert content_files(files) == regular_files(tar)
        inner = gzip.decompress(data)
        assert sha(inner) == diff_id and len(inner) == int(desc["annotations"][USIZE])


def test_our_reader_accepts_ctr_remote_output(
    registry: LocalRegistry, e2e_esgz_ctr: images.TestImage, e2e_tars: list[bytes],
) -> None:
    """ctr-remote's conversion of the same source: every file read and verified by our reader,
    and `layerstore convert` keeps every one of its layers byte for byte."""
    for desc, tar in zip(e2e_esgz_ctr.manifest["layers"], e2e_tars, strict=True):
        data = blob(registry, "e2e", desc["digest"])
        _, files = read_estargz(data, desc["annotations"][TOC_DIGEST])
        assert content_files(files) == regular_files(tar)
    proc = run_convert(e2e_esgz_ctr.ref, f"{registry.host}/e2e:esgz-ctr-kept")
    assert proc.returncode == 0, proc.stderr
    r = requests.get(
        f"{registry.url}/v2/e2e/manifests/esgz-ctr-kept",
        headers={"Accept": images.MT_MANIFEST}, timeout=30,
    )
    kept = json.loads(r.content)
    assert [d["digest"] for d in kept["layers"]] == e2e_esgz_ctr.layer_digests
    assert [d["annotations"][TOC_DIGEST] for d in kept["layers"]] == [
        d["annotations"][TOC_DIGEST] for d in e2e_esgz_ctr.manifest["layers"]
    ]

"""Assertions and small facts shared by the end-to-end suites."""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from pathlib import Path

from tests.harness import images
from tests.harness.images import TestImage
from tests.harness.registry import AccessEntry


def layer_gets(entries: list[AccessEntry], img: TestImage, status: int) -> list[AccessEntry]:
    """The GETs of img's layer blobs among *entries* that were answered with *status*
    (200: a whole-layer download, 206: a range)."""
    digests = set(img.layer_digests)
    return [
        e
        for e in entries
        if e.method == "GET" and e.status == status and e.path.rsplit("/", 1)[-1] in digests
    ]


def assert_expected_tree(got: images.Listing, img: TestImage) -> None:
    """What a container listed is the image's tree: entries, metadata, hard-link groups."""
    want = img.tree.restrict(images.E2E_ROOTS, images.E2E_TOPS)
    assert images.tree_diff(want, got.entries) == []
    for group in img.tree.hardlinks:
        assert len({got.inodes[p][0] for p in group}) == 1, {p: got.inodes[p] for p in group}
        assert {got.inodes[p][1] for p in group} == {len(group)}


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def expected_key_kind(version: str) -> str:
    """containers/storage asks an ALS by TOC digest from Podman 5.1 on, by blob digest before."""
    return "toc" if version_tuple(version) >= (5, 1) else "blob"


def saved_layer_digests(archive: Path) -> tuple[list[str], list[str]]:
    """(config diff_ids, sha256 of each layer tar) of a docker-archive."""
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
        assert len(manifest) == 1
        config = json.load(tar.extractfile(manifest[0]["Config"]))
        digests = []
        for name in manifest[0]["Layers"]:
            h = hashlib.sha256()
            with tar.extractfile(name) as f:
                while block := f.read(1 << 20):
                    h.update(block)
            digests.append("sha256:" + h.hexdigest())
    return config["rootfs"]["diff_ids"], digests

"""zstd:chunked test images made by the real tools: `podman push --compression-format
zstd:chunked` (any PodmanEnv: the host's Podman 4.3 or a Podman 5 chroot) and `ctr-remote image
convert --zstdchunked`.

Two traps are handled here, once:

- G4 (test-environment.md §5): Podman 4.3 silently pushes gzip when its blob-info cache knows a
  gzip copy of the layer on the registry, which it does right after pulling the source. The
  cache of the PodmanEnv is removed before the push, and the pushed manifest is checked.
- Podman 4.3's zstd:chunked writer (c/storage 1.43) stops after the tar's end-of-archive blocks,
  so a source tar with more trailing zeros (Python's tarfile pads to 10 KiB records) would not
  decompress to its DiffID. `go_tar` trims a tar the way Go's archive/tar writes it.
"""

from __future__ import annotations

import io
import shutil
import tarfile

import requests

from .images import TestImage, Tree, fetch_image
from .podman import PodmanEnv

MT_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
CHECKSUM_KEYS = (
    "io.github.containers.zstd-chunked.manifest-checksum",
    "io.containers.zstd-chunked.manifest-checksum",
)


def go_tar(tar: bytes) -> bytes:
    """*tar* ending right after its two zero end-of-archive blocks (no record padding)."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        infos = archive.getmembers()
    end = 0
    if infos:
        last = infos[-1]
        end = last.offset_data + (-(-last.size // 512) * 512 if last.isreg() else 0)
    out = tar[:end] + bytes(1024)
    if tar[: len(out)] != out:
        raise ValueError("tar has data after its last member")
    return out


def podman_push_zstd_chunked(env: PodmanEnv, src: str, dst: str) -> None:
    """Pull *src* into *env* and push it to *dst* as zstd:chunked (G4 handled)."""
    env.pull(src)
    cache = env.blob_info_cache
    # Only ever the environment's own copy (the isolated /var/lib overlay): never the machine's.
    # Podman 5 needs none of this (--compression-format implies --force-compression); if the
    # trap still fires, fetch_zstd_chunked says so.
    if env.var_lib_isolated and cache.is_relative_to(env.workdir) and cache.exists():
        shutil.rmtree(cache)
    env.run("push", "-q", "--compression-format", "zstd:chunked", src, dst)


def fetch_zstd_chunked(host: str, repo: str, tag: str, tree: Tree) -> TestImage:
    """The pushed image; raises unless every layer really is zstd:chunked."""
    img = fetch_image(host, repo, tag, tree)
    for desc in img.manifest["layers"]:
        ann = desc.get("annotations") or {}
        if desc["mediaType"] != MT_ZSTD or not any(k in ann for k in CHECKSUM_KEYS):
            raise AssertionError(f"{img.ref}: layer {desc['digest']} is not zstd:chunked: {desc}")
    return img


def blob(host: str, repo: str, digest: str) -> bytes:
    with requests.Session() as session:
        session.trust_env = False  # loopback only, never through a proxy
        r = session.get(f"http://{host}/v2/{repo}/blobs/{digest}", timeout=60)
    r.raise_for_status()
    return r.content

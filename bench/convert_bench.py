#!/usr/bin/env python3
"""Benchmark: `layerstore convert` vs `ctr-remote image convert --estargz --oci`, same image,
same run, same local registry.

    /tmp/venv/bin/python bench/convert_bench.py [--random-mb 100] [--repeat 1]

Builds a ~200 MB gzip image (layer 1: a copy of /usr/lib/python3*, compressible; layer 2:
random bytes, incompressible), pushes it to a docker-registry it starts on 127.0.0.1, then

- layerstore: `python -m store convert SRC DST` (registry to registry: pull, convert and push
  are all inside the one timed command);
- ctr-remote: a private containerd; `ctr content fetch` (download, no unpack), `ctr-remote image
  convert --estargz --oci`, `ctr image push`, each timed. Its end-to-end time is the sum.

The headline ratio compares like with like (registry to registry, end to end); the ratio
against ctr-remote's convert step alone is reported too. Both use gzip level 9 and 4 MiB
chunks (the defaults of both tools). Results go to bench/results/convert.json.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.harness.containerd import Containerd  # noqa: E402
from tests.harness.registry import LayerBlob, LocalRegistry, image_config  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results" / "convert.json"
MTIME = 1_700_000_000


def python_tree_tar() -> bytes:
    """A reproducible tar of /usr/lib/python3* (regular files, dirs and symlinks)."""

    def clean(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if not (ti.isreg() or ti.isdir() or ti.issym()):
            return None
        ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = MTIME, 0, 0, "", ""
        return ti

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(glob.glob("/usr/lib/python3*")):
            tar.add(path, arcname=path.lstrip("/"), filter=clean)
    return buf.getvalue()


def random_tar(size: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, part in enumerate(range(0, size, 32 << 20)):
            data = os.urandom(min(32 << 20, size - part))
            ti = tarfile.TarInfo(f"data/random-{i}.bin")
            ti.size, ti.mtime = len(data), MTIME
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def timed(cmd: list[str], **kw) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, **kw)
    return time.perf_counter() - t0


def manifest_of(reg: LocalRegistry, repo: str, tag: str) -> dict:
    import requests

    r = requests.get(f"{reg.url}/v2/{repo}/manifests/{tag}", timeout=30,
                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    r.raise_for_status()
    return {"digest": r.headers["Docker-Content-Digest"], "manifest": r.json()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--random-mb", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool; the best is kept")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="convert-bench-") as tmp:
        work = Path(tmp)
        tars = [python_tree_tar(), random_tar(args.random_mb << 20)]
        layers = [LayerBlob(gzip.compress(t, compresslevel=6, mtime=0)) for t in tars]
        reg = LocalRegistry().start(work / "registry")
        ctd = Containerd(work / "containerd")
        try:
            ctd.start()
            src = reg.push_image("bench/src", "gzip", layers, image_config(layers)).ref
            env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
            ours, ctr_runs = [], []
            for n in range(args.repeat):
                ours.append(timed(
                    [sys.executable, "-m", "store", "convert", src,
                     f"{reg.host}/bench/ours:esgz{n}"], env=env,
                ))
                dst = f"{reg.host}/bench/ctr:esgz{n}"
                ctd.ctr("image", "rm", src, check=False)
                ctd.ctr("content", "prune", "references", check=False)
                a = ctd.ctr
                t_fetch = _timed_ctr(a, "content", "fetch", "--plain-http", src)
                t_conv = _timed_ctr(a, "image", "convert", "--estargz", "--oci", src, dst)
                t_push = _timed_ctr(a, "image", "push", "--plain-http", dst)
                ctr_runs.append({"fetch": t_fetch, "convert": t_conv, "push": t_push,
                                 "total": t_fetch + t_conv + t_push})
                ctd.ctr("image", "rm", dst, check=False)
            best_ours = min(ours)
            best_ctr = min(ctr_runs, key=lambda r: r["total"])
            ours_m = manifest_of(reg, "bench/ours", "esgz0")
            ctr_m = manifest_of(reg, "bench/ctr", "esgz0")
        finally:
            ctd.stop()
            reg.close()

    def sizes(m: dict) -> list[int]:
        return [d["size"] for d in m["manifest"]["layers"]]

    result = {
        "what": "registry-to-registry eStargz conversion of the same image, same run",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "image": {
            "layers": ["/usr/lib/python3* tree", f"{args.random_mb} MiB random"],
            "uncompressed_bytes": [len(t) for t in tars],
            "gzip_bytes": [len(lay.data) for lay in layers],
        },
        "repeat": args.repeat,
        "layerstore_convert_s": round(best_ours, 3),
        "ctr_remote_s": {k: round(v, 3) for k, v in best_ctr.items()},
        "ratio_end_to_end": round(best_ours / best_ctr["total"], 3),
        "ratio_vs_ctr_convert_step_only": round(best_ours / best_ctr["convert"], 3),
        "output_layer_bytes": {"layerstore": sizes(ours_m), "ctr_remote": sizes(ctr_m)},
        "output_total_bytes": {"layerstore": sum(sizes(ours_m)),
                               "ctr_remote": sum(sizes(ctr_m))},
        "target": "ratio_end_to_end <= 1.5",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def _timed_ctr(ctr, *args: str) -> float:
    t0 = time.perf_counter()
    ctr(*args)
    return time.perf_counter() - t0


if __name__ == "__main__":
    raise SystemExit(main())

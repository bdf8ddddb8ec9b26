"""One benchmark run: every figure next to its baseline, measured in the same run.

    sudo /tmp/venv/bin/python -m bench.run            # from the repository root, as root
    sudo /tmp/venv/bin/python -m bench.run --quick    # smaller images, for a smoke run

Starts its own docker-registry on 127.0.0.1, builds eStargz images with our writer
(store.estargz.build_estargz) from random + compressible data, and drives real Podman and a real
`layerstore serve` through the test harness. Writes bench/results/<name>.json (one per
benchmark) and bench/results/summary.json; `python -m bench.chart` draws docs/bench.png.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from store.estargz import build_estargz
from tests.harness import images
from tests.harness.images import TarLayer, b64ref
from tests.harness.podman import PodmanEnv
from tests.harness.registry import LayerBlob, LocalRegistry
from tests.harness.store import StoreProcess

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1 << 20
READ_ROUNDS = 5  # cold/warm read rounds; the medians are reported
WORKLOAD = ["/bin/sh", "-c", "cat /etc/app.conf /app/start.sh /app/lib/*.txt | wc -c"]


# -- images -----------------------------------------------------------------------------------


def mixed_data(size: int, seed: str) -> Iterator[bytes]:
    """1 MiB blocks alternating pseudo-random and compressible text (roughly 2:1 overall)."""
    text = b"".join(f"{seed} line {i:06d}: lazily pulled and verified\n".encode()
                    for i in range(30_000))[:MiB]
    n = 0
    i = 0
    while n < size:
        block = hashlib.shake_256(f"{seed}/{i}".encode()).digest(MiB) if i % 2 == 0 else text
        block = block[: size - n]
        yield block
        n += len(block)
        i += 1


@dataclass
class BenchImage:
    ref: str
    repo: str
    layer_digest: str
    blob_size: int
    big_files: list[str]


def app_tar(path: Path, data_bytes: int, seed: str, files: int = 1) -> None:
    """busybox + a few small workload files + `files` big files of data_bytes in total."""
    base = images.busybox_layer(
        [("etc/app.conf", b"mode=bench\n"), ("app/start.sh", b"#!/bin/sh\necho start\n")]
        + [(f"app/lib/{i}.txt", f"lib {i}\n".encode() * 50) for i in range(20)]
    ).bytes()
    with open(path, "wb") as out:
        # Append the big files as streamed tar members after the busybox layer's entries.
        with tarfile.open(fileobj=io.BytesIO(base)) as src:
            members = [(m, src.extractfile(m).read() if m.isfile() else None)
                       for m in src.getmembers()]
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for m, data in members:
                tar.addfile(m, io.BytesIO(data) if data is not None else None)
            per = data_bytes // files
            for f in range(files):
                ti = tarfile.TarInfo(f"data/big{f}.bin")
                ti.size = per
                ti.mtime = images.MTIME
                tar.addfile(ti, _Stream(mixed_data(per, f"{seed}/{f}")))


class _Stream(io.RawIOBase):
    def __init__(self, blocks: Iterator[bytes]) -> None:
        self._blocks = blocks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            try:
                self._buf += next(self._blocks)
            except StopIteration:
                break
        if n < 0:
            n = len(self._buf)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


def build_image(registry: LocalRegistry, work: Path, repo: str, data_bytes: int, files: int,
                prioritized: list[str] | None = None) -> BenchImage:
    tar_path = work / f"{repo}.tar"
    blob_path = work / f"{repo}.esgz"
    app_tar(tar_path, data_bytes, repo, files)
    with open(tar_path, "rb") as src, open(blob_path, "wb") as out:
        res = build_estargz(src, out, compression_level=6, prioritized=prioritized)
    tar_path.unlink()
    blob = blob_path.read_bytes()
    layer = LayerBlob(blob, annotations={
        images.TOC_DIGEST: str(res.toc_digest),
        images.UNCOMPRESSED_SIZE: str(res.uncompressed_size),
    })
    pushed = registry.push_image(repo, "v1", [layer], images.image_config([str(res.diff_id)]))
    digest = pushed.manifest["layers"][0]["digest"]
    return BenchImage(pushed.ref, repo, digest, len(blob),
                      [f"data/big{f}.bin" for f in range(files)])


def many_files_image(registry: LocalRegistry, n: int) -> BenchImage:
    t = TarLayer()
    per_dir = 1000
    for d in range(n // per_dir):
        t.dir(f"files/d{d:03d}")
        for f in range(per_dir):
            t.file(f"files/d{d:03d}/f{f:04d}.txt", f"{d}/{f}\n".encode())
    out = io.BytesIO()
    res = build_estargz(io.BytesIO(t.bytes()), out, compression_level=6)
    layer = LayerBlob(out.getvalue(), annotations={
        images.TOC_DIGEST: str(res.toc_digest),
        images.UNCOMPRESSED_SIZE: str(res.uncompressed_size),
    })
    pushed = registry.push_image("many", "v1", [layer], images.image_config([str(res.diff_id)]))
    return BenchImage(pushed.ref, "many", pushed.manifest["layers"][0]["digest"],
                      len(out.getvalue()), [])


# -- measuring ----------------------------------------------------------------------------------


def timed(fn: Callable[..., object], *args: object) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def sh(script: str) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", script], check=True)


def read_file(path: Path) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(MiB):
            n += len(block)
    return n


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def first_output(env: PodmanEnv, ref: str) -> float:
    """Seconds from `podman run` until its first line of output appears."""
    cmd = [*env.command, "run", "--rm", "--pull=never", "--network=none", ref, *WORKLOAD]
    if env.var_lib_isolated:
        cmd = [*env._var_lib_wrapper(), *cmd]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    took = time.perf_counter() - t0
    _, err = proc.communicate(timeout=300)
    if proc.returncode != 0 or not line.strip():
        raise RuntimeError(f"podman run failed: {err.decode()[-2000:]}")
    return took


class Bench:
    def __init__(self, work: Path, quick: bool) -> None:
        self.work = work
        self.quick = quick
        self.results: dict[str, dict] = {}
        self._n = 0

    def record(self, name: str, *, value: float, baseline: float, unit: str, target: str,
               lower_is_better: bool, **extra: object) -> None:
        ratio = value / baseline if baseline else float("inf")
        res = {
            "name": name, "value": round(value, 4), "baseline": round(baseline, 4),
            "unit": unit, "ratio": round(ratio, 4), "target": target,
            "lower_is_better": lower_is_better, **extra,
        }
        self.results[name] = res
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res), flush=True)

    @contextmanager
    def store(self, config: str = "") -> Iterator[StoreProcess]:
        self._n += 1
        d = self.work / f"store{self._n}"
        cfg = d / "config.toml"
        d.mkdir(parents=True)
        cfg.write_text(config)
        s = StoreProcess(d / "root", d / "mnt", ["--config", str(cfg)], log_level="info")
        try:
            yield s.start()
        finally:
            s.stop()

    @contextmanager
    def podman(self, registry: LocalRegistry, name: str,
               als: Path | None = None) -> Iterator[PodmanEnv]:
        env = PodmanEnv(self.work / f"podman-{name}", registry.host, als=als)
        try:
            yield env
        finally:
            env.cleanup()


def run(bench: Bench, registry: LocalRegistry, only: str = "all") -> None:
    if only in ("all", "io"):
        run_io(bench, registry)
    if only in ("all", "memory"):
        run_memory(bench, registry)
    if only == "read":  # a subset of io
        run_read(bench, registry)


def run_io(bench: Bench, registry: LocalRegistry) -> None:
    small, large = (40 * MiB, 160 * MiB) if bench.quick else (200 * MiB, 1024 * MiB)
    prio = ["etc/app.conf", "app/start.sh"] + [f"app/lib/{i}.txt" for i in range(20)]
    img_s = build_image(registry, bench.work, "bench-small", small, 1, prio)
    img_l = build_image(registry, bench.work, "bench-large", large, 4, prio)
    print(f"images built: {img_s.blob_size / MiB:.0f} MiB and {img_l.blob_size / MiB:.0f} MiB "
          "compressed", flush=True)

    # 1. pull, both sizes; then, on the small image: first output, reads, save
    for img, label in ((img_l, "large"), (img_s, "small")):
        with bench.store() as store, \
                bench.podman(registry, f"lazy-{label}", als=store.mountpoint) as lazy, \
                bench.podman(registry, f"plain-{label}") as plain:
            t_plain = timed(plain.pull, img.ref)
            t_lazy = timed(lazy.pull, img.ref)
            bench.record(f"pull_{label}", value=t_lazy, baseline=t_plain, unit="s",
                         target="<= 0.10", lower_is_better=True,
                         image_mib=round(img.blob_size / MiB, 1))
            if label == "large":
                continue
            cold = measure_cold_rounds(bench, registry, img, plain)
            t_first, t_first_plain = cold["first_output"]
            bench.record("first_output", value=t_first, baseline=t_first_plain, unit="s",
                         target="(report)", lower_is_better=True,
                         note="podman run of a command reading a few files, store cold "
                              "(right after the lazy pull) vs a normally pulled image; "
                              f"medians of {READ_ROUNDS} rounds")
            bench.record("pull_plus_first_output", value=t_lazy + t_first,
                         baseline=t_plain + t_first_plain, unit="s", target="(report)",
                         lower_is_better=True)
            t_save, t_save_plain = cold["save"]
            bench.record("save", value=t_save, baseline=t_save_plain, unit="s",
                         target="<= 1.5", lower_is_better=True,
                         note=f"podman save, cold store; medians of {READ_ROUNDS} rounds")
            measure_reads(bench, registry, img, plain)


def measure_cold_rounds(bench: Bench, registry: LocalRegistry, img: BenchImage,
                        plain: PodmanEnv) -> dict[str, tuple[float, float]]:
    """first_output and save: medians of READ_ROUNDS rounds, each with a fresh (cold) store
    and a fresh lazy pull, next to the same on the normally pulled image (*plain*).

    {name: (store median, baseline median)}
    """
    got: dict[str, tuple[list[float], list[float]]] = {"first_output": ([], []), "save": ([], [])}
    for i in range(READ_ROUNDS):
        with bench.store() as store, \
                bench.podman(registry, f"cold-{i}", als=store.mountpoint) as lazy:
            lazy.pull(img.ref)
            got["first_output"][0].append(first_output(lazy, img.ref))
            got["first_output"][1].append(first_output(plain, img.ref))
            # save reads each layer's `blob`: the first read fetches and verifies it whole
            got["save"][0].append(timed(lazy.save, img.ref, bench.work / "lazy.tar"))
            got["save"][1].append(timed(plain.save, img.ref, bench.work / "plain.tar"))
            (bench.work / "lazy.tar").unlink()
            (bench.work / "plain.tar").unlink()
    print(json.dumps({"cold_rounds": {k: [[round(x, 3) for x in v] for v in vs]
                                      for k, vs in got.items()}}), flush=True)
    return {name: (statistics.median(a), statistics.median(b)) for name, (a, b) in got.items()}


def measure_reads(bench: Bench, registry: LocalRegistry, img: BenchImage,
                  plain: PodmanEnv) -> None:
    """read_cold / read_warm of img's first big file; *plain* has img pulled normally.

    A single timed read on a shared 2-core machine varies by +-15%, so each figure is the
    median of READ_ROUNDS rounds, and in each round the baseline and the store are measured
    back to back (a fresh store, so every round is cold).
    """
    normal_file = plain.image_layers(img.ref)[-1] / "diff" / img.big_files[0]
    read_file(normal_file)  # into the page cache, as a warm file would be
    size = normal_file.stat().st_size
    url = f"{registry.url}/v2/{img.repo}/blobs/{img.layer_digest}"
    rounds: list[dict[str, float]] = []
    rss_after_read = 0.0
    for _ in range(READ_ROUNDS):
        t_normal = timed(read_file, normal_file)
        t_curl = timed(sh, f"curl -sf '{url}' | gunzip -c > /dev/null")
        with bench.store("[prefetch]\nenabled = false\n") as cold:
            path = cold.mountpoint / b64ref(img.ref) / img.layer_digest / "diff" \
                / img.big_files[0]
            os.stat(path)  # resolve the layer (manifest + TOC) outside the timing
            t_cold = timed(read_file, path)
            t_warm = timed(read_file, path)
            rss_after_read = max(rss_after_read, rss_mb(cold.proc.pid))
        rounds.append({name: round(size / MiB / t, 1) for name, t in (
            ("cold", t_cold), ("curl_gunzip", t_curl), ("warm", t_warm), ("normal", t_normal))})

    def median(name: str) -> float:
        return statistics.median(r[name] for r in rounds)

    bench.record("read_cold", value=median("cold"), baseline=median("curl_gunzip"),
                 unit="MiB/s", target=">= 0.8", lower_is_better=False,
                 note="baseline: curl | gunzip of the same blob from the same registry; "
                      f"medians of {READ_ROUNDS} rounds",
                 rounds=[{"cold": r["cold"], "baseline": r["curl_gunzip"]} for r in rounds])
    bench.record("read_warm", value=median("warm"), baseline=median("normal"),
                 unit="MiB/s", target=">= 0.5", lower_is_better=False,
                 note="baseline: the same file of the normally pulled image; "
                      f"medians of {READ_ROUNDS} rounds",
                 rounds=[{"warm": r["warm"], "baseline": r["normal"]} for r in rounds],
                 store_rss_mb=round(rss_after_read, 1))


def run_read(bench: Bench, registry: LocalRegistry) -> None:
    """Only the sequential reads (read_cold, read_warm), on the small image."""
    prio = ["etc/app.conf", "app/start.sh"] + [f"app/lib/{i}.txt" for i in range(20)]
    img = build_image(registry, bench.work, "bench-small", 40 * MiB if bench.quick else 200 * MiB,
                      1, prio)
    with bench.podman(registry, "plain-small") as plain:
        plain.pull(img.ref)
        measure_reads(bench, registry, img, plain)


def run_memory(bench: Bench, registry: LocalRegistry) -> None:
    # 3. memory: 10 images mounted; a 100,000-file layer
    many = many_files_image(registry, 20_000 if bench.quick else 100_000)
    tens = []
    for i in range(10):
        tar = TarLayer().file("etc/id", f"image {i}\n".encode()).file(
            "data/blob", hashlib.shake_256(str(i).encode()).digest(2 * MiB)).bytes()
        out = io.BytesIO()
        res = build_estargz(io.BytesIO(tar), out, compression_level=6)
        pushed = registry.push_image(f"ten{i}", "v1", [LayerBlob(out.getvalue(), annotations={
            images.TOC_DIGEST: str(res.toc_digest),
            images.UNCOMPRESSED_SIZE: str(res.uncompressed_size)})],
            images.image_config([str(res.diff_id)]))
        tens.append(pushed)
    with bench.store() as store:
        time.sleep(1)
        idle = rss_mb(store.proc.pid)
        for pushed in tens:
            layer = store.mountpoint / b64ref(pushed.ref) / pushed.manifest["layers"][0]["digest"]
            read_file(layer / "diff" / "etc" / "id")
            read_file(layer / "diff" / "data" / "blob")
        ten = rss_mb(store.proc.pid)
        bench.record("rss_10_images", value=ten, baseline=200.0, unit="MiB", target="<= 1.0",
                     lower_is_better=True, idle_store_mb=round(idle, 1),
                     note="baseline is the 200 MB target")
        layer = store.mountpoint / b64ref(many.ref) / many.layer_digest / "diff"
        count = sum(len(files) for _, _, files in os.walk(layer))
        big = rss_mb(store.proc.pid)
        bench.record("rss_100k_files", value=big, baseline=200.0, unit="MiB", target="<= 1.0",
                     lower_is_better=True, files=count, idle_store_mb=round(idle, 1),
                     note="after walking the whole tree; baseline is the 200 MB target")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small images (smoke run)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--only", choices=("all", "io", "memory", "read"), default="all",
                        help="run one part; its results replace theirs in summary.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root (rootful podman and FUSE)")
    work = Path(tempfile.mkdtemp(prefix="layerstore-bench-", dir=args.workdir))
    bench = Bench(work, args.quick)
    registry = LocalRegistry()
    started = time.time()
    try:
        registry.start(work / "registry")
        run(bench, registry, args.only)
    finally:
        registry.close()
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "quick": args.quick,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(),
                 "python": platform.python_version()},
        "results": bench.results,
    }
    if args.only != "all":
        summary = _merge_summary(summary, args.only)
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def _merge_summary(part: dict, only: str) -> dict:
    """A partial run keeps the other results of the last summary; its own replace theirs."""
    try:
        old = json.loads((RESULTS / "summary.json").read_text())
    except (OSError, ValueError):
        return part
    return {
        **old,
        "results": {**old.get("results", {}), **part["results"]},
        "partial_runs": {**old.get("partial_runs", {}), only: part["when"]},
    }


if __name__ == "__main__":
    raise SystemExit(main())

"""Each fault of the fault proxy x {lookup, first read of a file, `podman run`, `podman save`}.

A cell's outcome is either the correct bytes (sha256 equal) or the documented failure:
lookup -> ENOENT (Podman pulls normally), read after `info` -> EIO with one `read.failed` log
line naming ref, layer, file and cause (and a later read, fault gone, returns the right bytes),
podman -> a failed command. Never wrong bytes; every step runs under a subprocess/OS timeout
and the store's deadlines are short (config below), so nothing hangs. The outcome per cell is
written to bench/results/fault-matrix.json. One store process and one Podman environment per
fault; the four test images are built once.
"""

from __future__ import annotations

import errno
import hashlib
import json
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import images
from tests.harness.faultproxy import FaultProxy, Faults
from tests.harness.podman import PodmanEnv
from tests.harness.registry import LocalRegistry
from tests.harness.store import StoreProcess

pytestmark = pytest.mark.e2e

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "fault-matrix.json"
PHASES = ("lookup", "read", "run", "save")
FAULTS = {
    "5xx-burst": Faults(burst_5xx=3),
    "reset-after-4k": Faults(reset_after=4096),
    "slow-body": Faults(slow_delay=0.003),
    "ignore-range": Faults(ignore_range=True),
    "redirect-blobs": Faults(redirect_blobs=True),
    "token-ttl-2s": Faults(token_ttl=2),
    "flip-byte": Faults(flip_byte=True),
}
# faults the store must absorb completely (its own cells must show correct bytes)
ABSORBED = set(FAULTS) - {"flip-byte"}
STORE_CONFIG = """
[registry]
connect_timeout = 2.0
read_timeout = 5.0
deadline = 20.0
max_attempts = 5
"""
PODMAN_TIMEOUT = 180


@dataclass
class Img:
    image: images.TestImage
    marker: bytes
    diff_id: str

    @property
    def blob(self) -> str:
        return self.image.manifest["layers"][0]["digest"]

    def ref(self, host: str) -> str:
        return f"{host}/{self.image.repo}:{self.image.tag}"


@pytest.fixture(scope="module")
def matrix_images(registry: LocalRegistry) -> dict[str, Img]:
    out = {}
    for phase in PHASES:
        marker = hashlib.sha256(phase.encode()).digest() * (400_000 // 32)  # several chunks
        tar = images.busybox_layer(extra=[("marker.bin", marker)]).bytes()
        layer, diff_id = images.estargz_layer(tar)
        img = images.push(
            registry, "matrix/img", phase, [layer], [diff_id], images.apply_layers([tar])
        )
        out[phase] = Img(img, marker, diff_id)
    return out


@pytest.fixture(scope="module")
def proxy(registry: LocalRegistry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host) as p:
        yield p


@pytest.fixture(scope="module")
def results() -> Iterator[dict[str, dict[str, str]]]:
    table: dict[str, dict[str, str]] = {}
    yield table
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "description": "fault x phase outcome; ok = correct bytes (sha256 equal), "
                "enoent/eio/podman-failed = documented failure; wrong bytes never accepted",
                "faults": {k: repr(v) for k, v in FAULTS.items()},
                "matrix": table,
            },
            indent=2,
        )
        + "\n"
    )


def _als_dir(mount: Path, ref: str, key: str) -> Path:
    return mount / images.b64ref(ref) / key


def _in_thread_with_timeout(fn, timeout: float = 120.0):  # noqa: ANN001, ANN202
    """Run a blocking filesystem call in a worker so that a hang fails the test instead."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(fn).result(timeout=timeout)
    finally:
        pool.shutdown(wait=False)


def _lookup(mount: Path, img: Img, host: str) -> str:
    info = _als_dir(mount, img.ref(host), img.blob) / "info"
    try:
        record = json.loads(_in_thread_with_timeout(info.read_bytes))
    except FileNotFoundError:
        return "enoent"
    assert record["diff-digest"] == img.diff_id, record
    return "ok"


def _read_marker(mount: Path, img: Img, host: str) -> bytes:
    path = _als_dir(mount, img.ref(host), img.blob) / "diff" / "marker.bin"
    return _in_thread_with_timeout(path.read_bytes)


def _first_read(store: StoreProcess, proxy: FaultProxy, faults: Faults, img: Img) -> str:
    proxy.faults = Faults()
    assert _lookup(store.mountpoint, img, proxy.host) == "ok"
    mark = store.mark()
    proxy.faults = faults
    try:
        data = _read_marker(store.mountpoint, img, proxy.host)
        outcome = "ok"
    except OSError as exc:
        assert exc.errno == errno.EIO, exc
        outcome = "eio"
    proxy.faults = Faults()
    if outcome == "ok":
        assert hashlib.sha256(data).digest() == hashlib.sha256(img.marker).digest()
        return outcome
    failed = store.events("read.failed", since=mark)
    assert failed, store.log_tail()
    for key in ("ref", "layer", "file", "cause"):
        assert failed[0].get(key), failed[0]
    # a later read, the fault gone, gets the right bytes
    assert _read_marker(store.mountpoint, img, proxy.host) == img.marker
    return outcome


def _run(env: PodmanEnv, proxy: FaultProxy, faults: Faults, img: Img) -> str:
    proxy.faults = faults
    try:
        pulled = env.run("pull", "-q", img.ref(proxy.host), check=False, timeout=PODMAN_TIMEOUT)
        if pulled.returncode != 0:
            return _failed(pulled)
        out = env.run_container(
            img.ref(proxy.host), ["sha256sum", "/marker.bin"], check=False, timeout=PODMAN_TIMEOUT
        )
    finally:
        proxy.faults = Faults()
    if out.returncode != 0:
        assert out.stdout.strip() == ""
        return _failed(out)
    assert out.stdout.split()[0] == images.sha256_hex(img.marker), out.stdout
    return "ok"


def _failed(proc: subprocess.CompletedProcess[str]) -> str:
    """The documented podman failure, with the gist of its message for the record."""
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return "podman-failed: " + (lines[-1][-240:] if lines else f"exit {proc.returncode}")


def _layer_diff_ids(archive: Path) -> tuple[list[str], list[str]]:
    """(sha256 of each layer tar in a docker-archive, the config's diff_ids)."""
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))[0]  # type: ignore[arg-type]
        config = json.load(tar.extractfile(manifest["Config"]))  # type: ignore[arg-type]
        got = []
        for name in manifest["Layers"]:
            data = tar.extractfile(name).read()  # type: ignore[union-attr]
            if data[:2] == b"\x1f\x8b":
                import gzip

                data = gzip.decompress(data)
            got.append("sha256:" + hashlib.sha256(data).hexdigest())
    return got, config["rootfs"]["diff_ids"]


def _save(env: PodmanEnv, proxy: FaultProxy, faults: Faults, img: Img, out: Path) -> str:
    proxy.faults = Faults()
    env.pull(img.ref(proxy.host), timeout=PODMAN_TIMEOUT)
    proxy.faults = faults
    try:
        proc = env.run(
            "save",
            "-q",
            "--format",
            "docker-archive",
            "-o",
            str(out),
            img.ref(proxy.host),
            check=False,
            timeout=PODMAN_TIMEOUT,
        )
    finally:
        proxy.faults = Faults()
    if proc.returncode != 0:
        return _failed(proc)
    got, want = _layer_diff_ids(out)
    assert got == want
    assert img.diff_id in got
    return "ok"


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_matrix(
    fault: str,
    tmp_path: Path,
    proxy: FaultProxy,
    matrix_images: dict[str, Img],
    results: dict[str, dict[str, str]],
) -> None:
    faults = FAULTS[fault]
    config = tmp_path / "store.toml"
    config.write_text(STORE_CONFIG)
    proxy.faults = Faults()
    store = StoreProcess(tmp_path / "root", tmp_path / "als", ["--config", str(config)])
    env: PodmanEnv | None = None
    row: dict[str, str] = {}
    results[fault] = row
    try:
        store.start()
        env = PodmanEnv(tmp_path / "podman", proxy.host, als=store.mountpoint)
        proxy.faults = faults
        try:
            row["lookup"] = _lookup(store.mountpoint, matrix_images["lookup"], proxy.host)
        finally:
            proxy.faults = Faults()
        row["read"] = _first_read(store, proxy, faults, matrix_images["read"])
        row["run"] = _run(env, proxy, faults, matrix_images["run"])
        row["save"] = _save(env, proxy, faults, matrix_images["save"], tmp_path / "save.tar")
    except subprocess.TimeoutExpired as exc:
        row["timeout"] = str(exc.cmd)[:200]
        raise
    finally:
        proxy.faults = Faults()
        if env is not None:
            env.cleanup()
        code = store.stop()
    assert code == 0, store.log_tail()
    assert proxy.stats["auth_leaked_to_redirect"] == 0
    for phase in ("run", "save"):
        assert row[phase] == "ok" or row[phase].startswith("podman-failed"), row
    if fault in ABSORBED:
        assert row["lookup"] == "ok" and row["read"] == "ok", row
    else:  # flip-byte: nothing unverified is ever served
        assert row["lookup"] == "enoent" and row["read"] == "eio", row

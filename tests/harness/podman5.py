"""The other Podman generation, in a Debian chroot, for tests (podman5-chroot.md).

The store must serve both lookup schemes of the additional-layer-store protocol: Podman <= 5.0
asks for `<ref>/<compressed blob digest>`, Podman >= 5.1 for `<ref>/<TOC digest>`. One machine
has one Podman, so the other generation runs in a `debootstrap --variant=minbase` root of the
other Debian release: trixie (Podman 5.4) on a host with Podman 4.x (Debian 12), bookworm
(Podman 4.3) on a host with Podman 5.x (Debian 13). The store runs on the host, mounted below
the chroot, and serves both Podmans at once.

Lifecycle:

- build: once per machine into `<cache>/<suite>` (default /var/cache/layerstore-tests, env
  LAYERSTORE_CHROOT_CACHE), reused while its stamp file matches suite, mirror, package list and
  recipe version (LAYERSTORE_CHROOT_REBUILD=1 forces a rebuild). The Debian mirror is the one
  the machine's apt sources name; nothing else is contacted.
- session: the cached root is the lower layer of an overlay mounted at
  `<cache>/sessions/<suite>-<pid>-<n>/root`, so runs never change the cache and concurrent
  sessions do not see each other (a shared lock keeps the cache from being rebuilt under a
  running session). Mount order (G1, G2, G9): overlay (so '/' in the chroot is a mount point),
  proc, rbind /sys and /dev made rslave (so an unmount never propagates to the host), a
  private tmpfs /run (never the host's podman state), and a bind of an ext4 work directory on
  /tmp: podman's graphroot cannot be on overlayfs, and FUSE mount points for the store are
  made there afterwards.
- teardown: every process whose root is the chroot is stopped, then `umount -R`; verified,
  and the session directory is removed. Sessions of killed runs are cleaned by the next start.

All podman state of a test lives in that work directory (PodmanEnv with `prefix=("chroot", R,
"podman")`); the chroot's podman never sees the host's /etc/containers, /var/lib/containers or
/run. Containers run with `--network=none` (G7: the default bridge would be created in the host
network namespace).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .podman import PodmanEnv
from .procutil import mounts_under, pid_alive, tail, unmount

CACHE_BASE = Path(os.environ.get("LAYERSTORE_CHROOT_CACHE", "/var/cache/layerstore-tests"))
PACKAGES = ("podman", "runc", "fuse3", "ca-certificates")
# debootstrap does not resolve virtual packages: bookworm's containers-common depends on
# `container-network-stack`, which netavark provides.
EXTRA_PACKAGES = {"bookworm": ("netavark",)}
# Bump when the built root changes in a way the stamp cannot see (files written after debootstrap).
RECIPE_VERSION = 1
STAMP = ".layerstore-stamp"
# The Podman major version each Debian release ships; the chroot gets the generation the host
# lacks (Podman 5.0 looks layers up like 4.x, so "5" here means a 5.x >= 5.1 as in trixie).
SUITE_PODMAN_MAJOR = {"bookworm": 4, "trixie": 5}
DEBOOTSTRAP_TIMEOUT = 900.0
LOCK_TIMEOUT = 1800.0
# G5: podman 5 prints a deprecation warning on every call on a cgroup v1 host.
CHROOT_ENV = {"PODMAN_IGNORE_CGROUPSV1_WARNING": "1"}
SOURCE_FILES = (Path("/etc/apt/sources.list.d"), Path("/etc/apt/sources.list"))


class ChrootError(RuntimeError):
    pass


# -- choosing the release and the mirror ----------------------------------------------------------


def podman_major(version_text: str) -> int | None:
    """4 from 'podman version 4.3.1'; None when no version is found."""
    m = re.search(r"(\d+)\.\d+", version_text)
    return int(m.group(1)) if m else None


def host_podman_version() -> str:
    """'4.3.1' for the machine's podman, '' if there is none."""
    if shutil.which("podman") is None:
        return ""
    out = subprocess.run(["podman", "--version"], capture_output=True, text=True, timeout=60)
    m = re.search(r"(\d+\.\d+(?:\.\d+)?)", out.stdout)
    return m.group(1) if m else ""


def chroot_suite(host_version: str | None = None) -> str:
    """The Debian release whose Podman is the other generation than the host's.

    LAYERSTORE_CHROOT_SUITE overrides the choice (any release debootstrap knows).
    """
    forced = os.environ.get("LAYERSTORE_CHROOT_SUITE")
    if forced:
        return forced
    major = podman_major(host_version if host_version is not None else host_podman_version())
    for suite, suite_major in SUITE_PODMAN_MAJOR.items():
        if major is not None and suite_major != major:
            return suite
    return "trixie"  # no podman (or an unknown one) on the host: test the newest scheme


def _deb822_paragraphs(text: str) -> Iterator[dict[str, str]]:
    para: dict[str, str] = {}
    last = ""
    for line in text.splitlines() + [""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if para:
                yield para
            para, last = {}, ""
        elif line[0] in " \t" and last:
            para[last] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            last = key.strip().lower()
            para[last] = value.strip()


def _is_release_suite(suite: str) -> bool:
    # the main archive (bookworm, trixie, stable ...), not -updates/-security/-backports
    return bool(suite) and "-" not in suite and "/" not in suite


def debian_mirror(sources: Sequence[Path] = SOURCE_FILES) -> str:
    """The main Debian archive URI from the machine's apt sources (deb822 or one-line format).

    LAYERSTORE_DEBIAN_MIRROR overrides it. Raises ChrootError when none is configured; there is
    deliberately no built-in internet default.
    """
    forced = os.environ.get("LAYERSTORE_DEBIAN_MIRROR")
    if forced:
        return forced
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            files += sorted(p for p in src.iterdir() if p.suffix in (".sources", ".list"))
        elif src.is_file():
            files.append(src)
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        if f.suffix == ".sources":
            for para in _deb822_paragraphs(text):
                if para.get("enabled", "yes").lower() == "no":
                    continue
                if "deb" not in para.get("types", "").split():
                    continue
                if "main" not in para.get("components", "").split():
                    continue
                if not any(_is_release_suite(s) for s in para.get("suites", "").split()):
                    continue
                uris = para.get("uris", "").split()
                if uris and "security" not in uris[0]:
                    return uris[0]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
                if (
                    len(words) >= 4 and words[0] == "deb" and _is_release_suite(words[2])
                    and "main" in words[3:] and "security" not in words[1]
                ):
                    return words[1]
    raise ChrootError(
        "no Debian mirror found in /etc/apt/sources.list{,.d/*}; set LAYERSTORE_DEBIAN_MIRROR"
    )


# -- building the cached root ---------------------------------------------------------------------


def packages_for(suite: str) -> list[str]:
    return [*PACKAGES, *EXTRA_PACKAGES.get(suite, ())]


def _stamp_key(suite: str, mirror: str) -> dict[str, object]:
    return {
        "suite": suite,
        "mirror": mirror,
        "packages": packages_for(suite),
        "recipe": RECIPE_VERSION,
        "arch": os.uname().machine,
    }


def _read_stamp(root: Path) -> dict[str, object] | None:
    try:
        return json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _safe_rmtree(path: Path) -> None:
    """rmtree, but never through a mount (a bind of /dev or /sys would empty the host's)."""
    if not path.exists():
        return
    for m in mounts_under(path):
        unmount(m)
    left = mounts_under(path)
    if left:
        raise ChrootError(f"refusing to delete {path}: still mounted: {left}")
    shutil.rmtree(path)


def _write_chroot_files(root: Path) -> None:
    """Files written into the built root once, before any podman call (G3, G6)."""
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
    # no resolver: every address a test uses is 127.0.0.1 (debootstrap copied the host's file)
    (root / "etc" / "resolv.conf").write_text("# layerstore tests: no DNS in this chroot\n")
    conf = root / "etc" / "containers"
    conf.mkdir(parents=True, exist_ok=True)
    # Tests select their own files (PodmanEnv); these defaults only make a manual
    # `chroot R podman ...` safe: runc (crun fails on a cgroup v1/v2 hybrid, G4), state in the root.
    (conf / "storage.conf").write_text(
        '[storage]\ndriver = "overlay"\nrunroot = "/run/containers/storage"\n'
        'graphroot = "/var/lib/containers/storage"\n'
    )
    (conf / "containers.conf").write_text(
        '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n'
        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n'
    )


def _dpkg_version(root: Path, package: str) -> str:
    out = subprocess.run(
        ["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Version}", package],
        capture_output=True, text=True, timeout=60,
    )
    return out.stdout.strip()


def build_root(dest: Path, suite: str, mirror: str, log_path: Path) -> dict[str, object]:
    """debootstrap `suite` into `dest` (replaced if present); returns the stamp written."""
    if shutil.which("debootstrap") is None:
        raise ChrootError("debootstrap is not installed (apt-get install debootstrap)")
    tmp = dest.parent / f"{dest.name}.build-{os.getpid()}"
    _safe_rmtree(tmp)
    cmd = [
        "debootstrap", "--variant=minbase", f"--include={','.join(packages_for(suite))}",
        suite, str(tmp), mirror,
    ]
    t0 = time.monotonic()
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                timeout=DEBOOTSTRAP_TIMEOUT,
            )
        if proc.returncode != 0 or not (tmp / "usr" / "bin" / "podman").exists():
            inner = tmp / "debootstrap" / "debootstrap.log"  # dpkg's side of the story
            if inner.exists():
                shutil.copyfile(inner, log_path.with_suffix(".dpkg.log"))
            raise ChrootError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail(log_path, 30)}\n"
                f"(dpkg log: {log_path.with_suffix('.dpkg.log')})"
            )
        _write_chroot_files(tmp)
        stamp = dict(_stamp_key(suite, mirror))
        stamp["podman"] = _dpkg_version(tmp, "podman")
        stamp["built"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        stamp["build_seconds"] = round(time.monotonic() - t0, 1)
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        old = dest.parent / f"{dest.name}.old-{os.getpid()}"
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        _safe_rmtree(old)
        return stamp
    except BaseException:
        # debootstrap mounts proc/sys in its target; never leave them (or a half root) behind
        with contextlib.suppress(Exception):
            _safe_rmtree(tmp)
        raise


class _Lock:
    """flock on `<cache>/<suite>.lock`: exclusive to build, shared while a session uses it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def acquire(self, mode: int, timeout: float = LOCK_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ChrootError(f"chroot cache lock busy for {timeout:.0f}s") from None
                time.sleep(0.5)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)  # releases the flock


# -- one session ----------------------------------------------------------------------------------


def _procs_rooted_at(root: Path) -> list[int]:
    """PIDs whose root directory is `root` (processes started in this chroot)."""
    want, out = str(Path(root).resolve()), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{entry}/root") == want:
                out.append(int(entry))
    return out


def _session_pid(d: Path) -> int | None:
    m = re.fullmatch(r"[a-z0-9]+-(\d+)-\d+", d.name)
    return int(m.group(1)) if m else None


def clean_stale_sessions(sessions: Path) -> list[str]:
    """Unmount and remove session directories whose pytest process is gone (killed runs).

    Returns what was cleaned. Safe: below a session root everything is private or a slave, and
    nothing is deleted while still mounted.
    """
    cleaned: list[str] = []
    if not sessions.is_dir():
        return cleaned
    lock = _Lock(sessions / ".lock")
    try:
        lock.acquire(fcntl.LOCK_EX, timeout=120)
        for d in sorted(sessions.iterdir()):
            pid = _session_pid(d)
            if pid is None or pid == os.getpid() or pid_alive(pid):
                continue
            root = d / "root"
            if mounts_under(root):
                _kill(_procs_rooted_at(root))
                for m in mounts_under(root / "tmp"):  # FUSE mounts of an orphaned store
                    unmount(m)
                subprocess.run(["umount", "-R", str(root)], capture_output=True)
                if mounts_under(root):
                    subprocess.run(["umount", "-R", "-l", str(root)], capture_output=True)
            with contextlib.suppress(ChrootError, OSError):
                _safe_rmtree(d)
                cleaned.append(str(d))
    finally:
        lock.close()
    return cleaned


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


_session_seq = 0


class ChrootPodman:
    """A mounted chroot of the other Podman generation; `env()` makes PodmanEnvs inside it.

    The session directory (overlay upper, work dirs, the mounted root) lives under
    `<cache>/sessions/`, not in pytest's temp dir: pytest deletes old temp dirs with rmtree, and
    a tree left mounted by a killed run holds binds of /dev and /sys. Sessions of dead runs are
    unmounted and removed by the next start instead.
    """

    def __init__(
        self,
        suite: str | None = None,
        *,
        cache_base: Path = CACHE_BASE,
        mirror: str | None = None,
    ) -> None:
        global _session_seq
        self.suite = suite or chroot_suite()
        self.cache_base = Path(cache_base)
        self.cache_root = self.cache_base / self.suite
        self.sessions = self.cache_base / "sessions"
        _session_seq += 1
        self.workdir = (self.sessions / f"{self.suite}-{os.getpid()}-{_session_seq}").absolute()
        self._mirror = mirror
        self.root = self.workdir / "root"  # the overlay: '/' of the chroot
        self.host_tmp = self.workdir / "tmp"  # bound on <root>/tmp
        self.stamp: dict[str, object] = {}
        self.built_now = False
        self.build_seconds = 0.0
        self.version = ""
        self._mounted: list[Path] = []
        self._lock: _Lock | None = None
        self._envs: list[PodmanEnv] = []
        self._n = 0

    # -- setup ---------------------------------------------------------------------------------

    def start(self) -> ChrootPodman:
        try:
            self.sessions.mkdir(parents=True, exist_ok=True)
            clean_stale_sessions(self.sessions)
            self._ensure_built()
            self._mount()
            self.version = self._probe_version()
        except BaseException:
            self.close()
            raise
        return self

    def _ensure_built(self) -> None:
        mirror = self._mirror or debian_mirror()
        want = _stamp_key(self.suite, mirror)
        rebuild = os.environ.get("LAYERSTORE_CHROOT_REBUILD") == "1"

        def fresh(stamp: dict[str, object] | None) -> bool:
            return stamp is not None and all(stamp.get(k) == v for k, v in want.items())

        self._lock = _Lock(self.cache_base / f"{self.suite}.lock")
        # shared while in use (sessions run side by side); exclusive only to build
        self._lock.acquire(fcntl.LOCK_SH)
        stamp = _read_stamp(self.cache_root)
        if fresh(stamp) and not rebuild:
            self.stamp = stamp or {}
            return
        self._lock.acquire(fcntl.LOCK_EX)  # waits for running sessions to finish
        stamp = _read_stamp(self.cache_root)
        if not fresh(stamp) or rebuild:
            t0 = time.monotonic()
            stamp = build_root(
                self.cache_root, self.suite, mirror,
                self.cache_base / f"{self.suite}.debootstrap.log",
            )
            self.built_now = True
            self.build_seconds = time.monotonic() - t0
        assert stamp is not None
        self.stamp = stamp
        # downgrade: other sessions may share the root, nobody may rebuild it meanwhile
        self._lock.acquire(fcntl.LOCK_SH)

    def _mount_cmd(self, *args: str) -> None:
        proc = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise ChrootError(f"mount {' '.join(args)}: {proc.stderr.strip()}")

    def _mount(self) -> None:
        r = self.root
        upper, work = self.workdir / "upper", self.workdir / "ovl-work"
        for d in (r, upper, work, self.host_tmp):
            d.mkdir(parents=True, exist_ok=True)
        self.host_tmp.chmod(0o1777)
        if mounts_under(r):
            raise ChrootError(f"{r} is already in use")
        # The overlay keeps the cache pristine and makes '/' a mount point (G1: chrootarchive
        # remounts '/' MS_PRIVATE|MS_REC, which fails with EINVAL on a plain directory).
        self._mount_cmd(
            "-t", "overlay", "overlay",
            "-o", f"lowerdir={self.cache_root},upperdir={upper},workdir={work}", str(r),
        )
        self._mounted.append(r)
        # nothing mounted below r may propagate to other mount namespaces, nor back
        self._mount_cmd("--make-private", str(r))
        self._mount_cmd("-t", "proc", "proc", str(r / "proc"))
        for d in ("sys", "dev"):
            self._mount_cmd("--rbind", f"/{d}", str(r / d))
            # rslave: host mounts still show up inside; our `umount -R` never reaches the host
            self._mount_cmd("--make-rslave", str(r / d))
        self._mount_cmd("-t", "tmpfs", "-o", "mode=755", "tmpfs", str(r / "run"))  # G2
        self._mount_cmd("--bind", str(self.host_tmp), str(r / "tmp"))  # ext4 for the graphroot
        self._mount_cmd("--make-private", str(r / "tmp"))

    def _probe_version(self) -> str:
        proc = subprocess.run(
            ["chroot", str(self.root), "podman", "--version"],
            capture_output=True, text=True, timeout=120, env={**os.environ, **CHROOT_ENV},
        )
        m = re.search(r"(\d+\.\d+(?:\.\d+)?)", proc.stdout)
        if proc.returncode != 0 or not m:
            raise ChrootError(f"podman in {self.suite} chroot: {proc.stderr.strip()}")
        return m.group(1)

    # -- use -----------------------------------------------------------------------------------

    @property
    def major(self) -> int:
        return podman_major(self.version) or 0

    def mkdtemp(self, prefix: str) -> Path:
        """A new host directory that the chroot sees as `/tmp/<name>` (e.g. for a store mount)."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.root / "tmp"))

    def env(
        self, name: str, registry_host: str, als: Path | None = None
    ) -> PodmanEnv:
        """A PodmanEnv in the chroot; `als` must be a path below `<root>/tmp` (see mkdtemp)."""
        self._n += 1
        workdir = self.root / "tmp" / f"{name}-{self._n}"
        env = PodmanEnv(
            workdir, registry_host, als=als,
            prefix=("chroot", str(self.root), "podman"), root=self.root,
            extra_env=CHROOT_ENV,
        )
        self._envs.append(env)
        return env

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Clean up PodmanEnvs, stop leftover chroot processes, unmount everything; verified."""
        errors: list[str] = []
        for env in reversed(self._envs):
            try:
                env.cleanup()
            except Exception as exc:  # keep going: the mounts must go regardless
                errors.append(f"podman env cleanup: {exc}")
        self._envs.clear()
        if self._mounted:
            self._stop_chroot_processes()
            errors += self._unmount_all()
        if not mounts_under(self.root):
            try:
                _safe_rmtree(self.workdir)
            except (OSError, ChrootError) as exc:
                errors.append(f"remove {self.workdir}: {exc}")
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if errors:
            raise ChrootError("chroot teardown: " + "; ".join(errors))

    def _stop_chroot_processes(self) -> None:
        # only processes whose root is this chroot: podman, conmon or a container we started
        _kill(_procs_rooted_at(self.root))

    def _unmount_all(self) -> list[str]:
        errors = []
        r = str(self.root)
        for attempt in range(3):
            if not mounts_under(self.root):
                break
            # FUSE mounts below (a store that was not stopped) first, then the whole tree
            for m in mounts_under(self.root / "tmp"):
                if m != str(self.root / "tmp"):
                    unmount(m)
            proc = subprocess.run(["umount", "-R", r], capture_output=True, text=True)
            if proc.returncode != 0 and attempt == 2:
                errors.append(f"umount -R {r}: {proc.stderr.strip()}")
            time.sleep(0.2 * attempt)
        if mounts_under(self.root):
            # last resort, safe because everything below is private or a slave
            subprocess.run(["umount", "-R", "-l", r], capture_output=True)
        left = mounts_under(self.root)
        if left:
            errors.append(f"mounts left under {r}: {left}")
        else:
            self._mounted.clear()
        return errors

    def __enter__(self) -> ChrootPodman:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- sharing one chroot per pytest session ---------------------------------------------------------

_shared: ChrootPodman | None = None
_users = 0
_shared_lock = threading.Lock()


@contextlib.contextmanager
def shared_chroot() -> Iterator[ChrootPodman]:
    """One mounted chroot for every user in this process, closed when the last one leaves.

    Session fixtures defined in different test modules thus share one build and one mount:

        @pytest.fixture(scope="session")
        def chroot():
            with shared_chroot() as c:
                yield c
    """
    global _shared, _users
    with _shared_lock:
        if _shared is None:
            _shared = ChrootPodman().start()
        _users += 1
        chroot = _shared
    try:
        yield chroot
    finally:
        with _shared_lock:
            _users -= 1
            last = _users == 0
            if last:
                _shared = None
        if last:
            chroot.close()

"""A self-contained Podman installation for one test: its own config files, storage and state.

Podman is configured only through files of the test (test-environment.md §2 and §8, G8):
storage.conf, containers.conf and registries.conf are written under `workdir` before the first
podman call and selected through CONTAINERS_STORAGE_CONF / CONTAINERS_CONF /
CONTAINERS_REGISTRIES_CONF. Graph root, tmp dir, volumes, events, networks and locks live under
`workdir`, the run root in a short directory under /tmp (see `runroot` below), so the machine's
/etc/containers, /var/lib/containers and /run/libpod are never touched.

One path cannot be configured in Podman 4.3.1: run as root it keeps its blob-info cache in
/var/lib/containers/cache (c/image picks that fixed path for euid 0 and c/common 0.50 never sets
SystemContext.BlobInfoCacheDir). Every podman call therefore runs in a mount namespace of its own
in which /var/lib is an overlay whose upper layer is in `workdir` (`blob_info_cache`). The cache
is then per environment, so the G4 "silently reuse a known blob" trap cannot leak between tests.
Mounts podman makes (container rootfs, shm) live and die in that namespace; this suits
`podman run --rm`, not detached containers (pass `isolate_var_lib=False` for those).

`prefix` is the argv that runs podman (default `podman`). A Podman 5 chroot fixture plugs in
`prefix=("chroot", R, "podman")` together with `root=R`: paths written into the config files are
then relative to `root`, the directory podman sees as `/` (podman5-chroot.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .procutil import mounts_under, unmount

DEFAULT_TIMEOUT = 300.0

# test-environment.md §2: no CAP_SYS_RESOURCE and a hard nofile limit of 20000, so podman's root
# default (nofile=1048576) fails; crun 1.8.1 rejects the cgroup v1/v2 hybrid layout, runc works.
_ULIMITS = ("nofile=20000:20000", "nproc=4096:4096")


class PodmanError(subprocess.CalledProcessError):
    """A podman command failed; the message carries the command line and its stderr."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip()
        if len(err) > 4000:
            err = "...\n" + err[-4000:]
        return f"{' '.join(map(str, self.cmd))} exited with {self.returncode}:\n{err}"


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


class PodmanEnv:
    """One podman configuration (storage, runtime state, registries) living under `workdir`.

    `registry_host` (`127.0.0.1:PORT`) is marked insecure in registries.conf. When `als` is given it
    is configured as `additionallayerstores = ["<als>:ref"]`; the directory must exist before any
    podman call, so it is created here (a FUSE mount on top of it is fine, and expected).
    """

    def __init__(
        self,
        workdir: Path,
        registry_host: str,
        als: str | os.PathLike[str] | None = None,
        prefix: Sequence[str] = (),
        *,
        root: Path = Path("/"),
        extra_env: Mapping[str, str] | None = None,
        isolate_var_lib: bool | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.registry_host = registry_host
        self.als = Path(als) if als is not None else None
        self.command: tuple[str, ...] = tuple(prefix) or ("podman",)
        self.root = Path(root).resolve()
        self.graphroot = self.workdir / "storage"
        # The run root holds unix sockets below `overlay-containers/<64-hex id>/userdata/`; with
        # a run root longer than ~40 characters (any pytest tmp_path) a socket path exceeds
        # sun_path's 108 bytes, the container's exit goes unnoticed and every `podman run` hangs
        # for conmon's 20 s timeout. So it lives in a short directory of its own.
        self.runroot = Path(tempfile.mkdtemp(prefix="lsp-", dir=self.root / "tmp"))
        self.tmpdir = self.workdir / "tmp"
        self.storage_conf = self.workdir / "storage.conf"
        self.containers_conf = self.workdir / "containers.conf"
        self.registries_conf = self.workdir / "registries.conf"
        self._extra_env = dict(extra_env or {})
        self._closed = False
        # (argv after the podman command, exit code, seconds) of every call, for diagnostics
        self.history: list[tuple[tuple[str, ...], int, float]] = []
        self.cleanup_errors: list[str] = []
        self._write_config()
        if isolate_var_lib is None:
            isolate_var_lib = not prefix
        self.var_lib_isolated = isolate_var_lib and self._probe_var_lib_overlay()

    # -- configuration --------------------------------------------------------------------------

    def _inner(self, path: Path) -> str:
        """`path` as podman sees it (relative to `root` for a chroot prefix)."""
        return "/" + str(Path(path).resolve().relative_to(self.root)).lstrip(".")

    def _write_config(self) -> None:
        for d in (self.graphroot, self.runroot, self.tmpdir, self.workdir / "engine"):
            d.mkdir(parents=True, exist_ok=True)
        if self.als is not None:
            # test-environment.md §8: a missing ALS directory makes every podman command fail.
            self.als.mkdir(parents=True, exist_ok=True)
        i = self._inner
        storage = [
            "[storage]",
            'driver = "overlay"',
            f"graphroot = {_toml_str(i(self.graphroot))}",
            f"runroot = {_toml_str(i(self.runroot))}",
            "",
            "[storage.options]",
        ]
        if self.als is not None:
            storage.append(f"additionallayerstores = [{_toml_str(i(self.als) + ':ref')}]")
        self.storage_conf.write_text("\n".join(storage) + "\n")

        engine = self.workdir / "engine"
        ulimits = ", ".join(_toml_str(u) for u in _ULIMITS)
        self.containers_conf.write_text(
            "\n".join(
                [
                    "[containers]",
                    f"default_ulimits = [{ulimits}]",
                    "",
                    "[engine]",
                    'runtime = "runc"',
                    'cgroup_manager = "cgroupfs"',
                    'events_logger = "file"',
                    f"events_logfile_path = {_toml_str(i(engine / 'events.log'))}",
                    f"tmp_dir = {_toml_str(i(engine / 'tmp'))}",
                    # no static_dir: the default (<graphroot>/libpod) is what conmon's exit
                    # command (`podman --root ... container cleanup`) derives from --root; any
                    # other value makes that cleanup miss the container and `run` hang for 20 s.
                    f"volume_path = {_toml_str(i(engine / 'volumes'))}",
                    f"image_copy_tmp_dir = {_toml_str(i(self.tmpdir))}",
                    # file locks live in tmp_dir; the default shm lock would be machine-wide
                    # (/dev/shm/libpod_lock) and shared by every environment.
                    'lock_type = "file"',
                    "",
                    "[network]",
                    f"network_config_dir = {_toml_str(i(engine / 'networks'))}",
                    "",
                ]
            )
        )
        self.registries_conf.write_text(
            "\n".join(
                [
                    'unqualified-search-registries = []',
                    "",
                    "[[registry]]",
                    f"location = {_toml_str(self.registry_host)}",
                    "insecure = true",
                    "",
                ]
            )
        )

    # see the module docstring: /var/lib as an overlay, in a mount namespace per podman call
    _VAR_LIB_SCRIPT = (
        'mount -t overlay overlay -o "lowerdir=/var/lib,upperdir=$1,workdir=$2" /var/lib'
        ' && shift 2 && exec "$@"'
    )

    def _var_lib_wrapper(self) -> list[str]:
        upper, work = self.workdir / "var-lib" / "upper", self.workdir / "var-lib" / "work"
        upper.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        return [
            "unshare", "--mount", "--propagation", "slave", "--",
            "sh", "-c", self._VAR_LIB_SCRIPT, "sh", str(upper), str(work),
        ]

    def _probe_var_lib_overlay(self) -> bool:
        """Whether the /var/lib overlay can be mounted here (not, e.g., on an overlayfs upper)."""
        try:
            proc = subprocess.run(
                [*self._var_lib_wrapper(), "true"], capture_output=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return proc.returncode == 0

    @property
    def blob_info_cache(self) -> Path:
        if self.var_lib_isolated:
            return self.workdir / "var-lib" / "upper" / "containers" / "cache"
        return Path("/var/lib/containers/cache")

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            CONTAINERS_STORAGE_CONF=self._inner(self.storage_conf),
            CONTAINERS_CONF=self._inner(self.containers_conf),
            CONTAINERS_REGISTRIES_CONF=self._inner(self.registries_conf),
            TMPDIR=self._inner(self.tmpdir),
        )
        # a parent's podman settings must not leak in
        for key in ("CONTAINER_HOST", "CONTAINER_CONNECTION", "CONTAINERS_CONF_OVERRIDE"):
            env.pop(key, None)
        env.update(self._extra_env)
        return env

    # -- commands -------------------------------------------------------------------------------

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `podman ARGS...` in this environment and capture its output as text."""
        if self._closed:
            raise RuntimeError("PodmanEnv used after cleanup()")
        cmd = [*self.command, *map(str, args)]
        if self.var_lib_isolated:
            cmd = [*self._var_lib_wrapper(), *cmd]
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd,
            env=self.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        self.history.append((tuple(map(str, args)), proc.returncode, time.perf_counter() - t0))
        if check and proc.returncode != 0:
            raise PodmanError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def pull(self, image: str, *extra: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Pull `image`; returns the image ID podman prints."""
        out = self.run("pull", "-q", *extra, image, timeout=timeout).stdout.split()
        return out[-1] if out else ""

    def run_container(
        self,
        image: str,
        cmd: Sequence[str],
        *extra: str,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """`podman run --rm` without network access and without pulling."""
        return self.run(
            "run", "--rm", "--pull=never", "--network=none", *extra, image, *cmd,
            check=check, timeout=timeout,
        )

    def push(self, image: str, dest: str, *extra: str) -> None:
        self.run("push", "-q", *extra, image, dest)

    def save(self, image: str, out: Path, fmt: str = "docker-archive") -> Path:
        self.run("save", "-q", "--format", fmt, "-o", self._inner(out), image)
        return out

    def inspect_image(self, image: str) -> dict:
        return json.loads(self.run("image", "inspect", image).stdout)[0]

    def image_layers(self, image: str) -> list[Path]:
        """The local layer directories (`<graphroot>/overlay/<id>`) of `image`, bottom first."""
        data = self.inspect_image(image)["GraphDriver"]["Data"]
        dirs = [Path(data["UpperDir"]).parent]
        dirs += [Path(p).parent for p in data.get("LowerDir", "").split(":") if p]
        return [self.root / d.relative_to("/") for d in reversed(dirs)]

    # -- teardown -------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Remove containers, images and state; unmount whatever is left in our directories.

        Safe to call more than once and after partial failures. Podman commands may fail (e.g. a
        dead ALS makes every command fail at driver init, G7); their errors are kept in
        `cleanup_errors`, and the mount and file clean-up below runs regardless. Raises only if
        a mount cannot be removed.
        """
        if self._closed:
            return
        for args in (("rm", "-af", "-t", "0"), ("rmi", "-af"), ("system", "reset", "-f")):
            try:
                proc = self.run(*args, check=False, timeout=120)
                if proc.returncode != 0:
                    self.cleanup_errors.append(
                        f"podman {' '.join(args)}: {proc.stderr.strip()[-500:]}"
                    )
            except subprocess.TimeoutExpired:
                self.cleanup_errors.append(f"podman {' '.join(args)}: timed out")
        self._closed = True
        left = []
        for base in (self.workdir, self.runroot):
            for m in mounts_under(base):
                unmount(m)
            left += mounts_under(base)
        if left:
            raise RuntimeError(f"mounts left after podman cleanup: {left}; {self.cleanup_errors}")
        for d in (self.graphroot, self.runroot, self.tmpdir, self.workdir / "engine",
                  self.workdir / "var-lib"):
            shutil.rmtree(d, ignore_errors=True)

    def __enter__(self) -> PodmanEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def cleanup_all(envs: list[PodmanEnv]) -> None:
    """Clean up every env (newest first), even if some fail; then raise the first failure."""
    failures = []
    for env in reversed(envs):
        try:
            env.cleanup()
        except Exception as exc:  # clean up the others before reporting
            failures.append(exc)
    if failures:
        raise failures[0]

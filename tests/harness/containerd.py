"""A private containerd 1.6 plus `ctr-remote`, used only to convert images (test-environment.md §6).

Root, state, socket and the `opt` plugin directory all live under `workdir`; without the `opt`
override containerd writes /opt/containerd on the machine (podman5-chroot.md G8).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .procutil import mounts_under, stop_process, tail, unmount, wait_for
from .registry import _death_signal_prefix

START_TIMEOUT = 15.0
CMD_TIMEOUT = 600.0


class ContainerdError(RuntimeError):
    pass


class Containerd:
    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir).resolve()
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.socket = self.workdir / "containerd.sock"
        self.config = self.workdir / "config.toml"
        self.log_path = self.workdir / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> None:
        for d in (self.root, self.state, self.workdir / "opt"):
            d.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            "\n".join(
                [
                    "version = 2",
                    f'root = "{self.root}"',
                    f'state = "{self.state}"',
                    'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
                    "[grpc]",
                    f'  address = "{self.socket}"',
                    "[ttrpc]",
                    f'  address = "{self.workdir / "containerd-ttrpc.sock"}"',
                    "[debug]",
                    '  level = "info"',
                    '[plugins."io.containerd.internal.v1.opt"]',
                    f'  path = "{self.workdir / "opt"}"',
                    "",
                ]
            )
        )

    def start(self, timeout: float = START_TIMEOUT) -> Containerd:
        if self.proc is not None:
            raise ContainerdError("containerd already started")
        self._write_config()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*_death_signal_prefix(), "containerd", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        # the socket appears before the gRPC server answers; `ctr version` proves it serves
        def ready() -> bool:
            if not self.socket.exists():
                return False
            return self.ctr("version", check=False, timeout=10).returncode == 0

        if not wait_for(ready, timeout, interval=0.1, alive=lambda: self.proc.poll() is None):
            self.stop()
            raise ContainerdError(f"containerd did not start:\n{tail(self.log_path)}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=15)
        # snapshot/unpack mounts under root (tmpmounts) if containerd died mid-operation
        for m in mounts_under(self.workdir):
            unmount(m)

    def ctr(
        self, *args: str, check: bool = True, timeout: float = CMD_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        cmd = ["ctr-remote", "--address", str(self.socket), *args]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "CONTAINERD_NAMESPACE": "default"},
        )
        if check and proc.returncode != 0:
            raise ContainerdError(
                f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr.strip()[-3000:]}"
            )
        return proc

    def _convert(self, src_ref: str, dst_ref: str, flags: list[str]) -> None:
        """Pull `src_ref` over plain HTTP, convert it, push the result as `dst_ref`."""
        self.ctr("image", "pull", "--plain-http", src_ref)
        self.ctr("image", "convert", *flags, "--oci", src_ref, dst_ref)
        self.ctr("image", "push", "--plain-http", dst_ref)

    def convert_estargz(self, src_ref: str, dst_ref: str, *extra: str) -> None:
        self._convert(src_ref, dst_ref, ["--estargz", *extra])

    def convert_zstdchunked(self, src_ref: str, dst_ref: str, *extra: str) -> None:
        self._convert(src_ref, dst_ref, ["--zstdchunked", *extra])

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

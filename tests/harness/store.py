"""The layerstore service as a subprocess: `python -m store serve --root ROOT MOUNTPOINT`.

The service logs one JSON object per line on stderr (store/log.py); the harness sends stderr to
`<root>/store.log` and parses it for test hooks such as `layer.prepared`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .procutil import is_mounted, stop_process, tail, unmount, wait_for
from .registry import _death_signal_prefix

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
REPO_ROOT = Path(__file__).resolve().parents[2]


class StoreError(RuntimeError):
    pass


class StoreProcess:
    """Start with `start()` (or as a context manager); `stop()` is always safe to call."""

    def __init__(
        self,
        root: Path,
        mountpoint: Path,
        extra_args: Sequence[str] = (),
        *,
        log_level: str = "debug",
        python: str = sys.executable,
    ) -> None:
        self.root = Path(root).resolve()
        self.mountpoint = Path(mountpoint).absolute()
        self.extra_args = tuple(extra_args)
        self.log_level = log_level
        self.python = python
        self.log_path = self.root / "store.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def command(self) -> list[str]:
        # SIGTERM (clean unmount) if the test runner dies without running finalizers
        return [
            *_death_signal_prefix(),
            self.python, "-m", "store", "serve",
            "--root", str(self.root),
            "--log-level", self.log_level,
            *self.extra_args,
            str(self.mountpoint),
        ]

    def start(self, timeout: float = READY_TIMEOUT) -> StoreProcess:
        if self.proc is not None:
            raise StoreError("store already started")
        self.root.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # run the store of this checkout, whether or not it is pip-installed
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.root,
                env=env,
                start_new_session=True,  # a ^C in the test runner must not hit the store first
            )
        ok = wait_for(
            lambda: os.path.ismount(self.mountpoint),
            timeout,
            alive=lambda: self.proc is not None and self.proc.poll() is None,
        )
        if not ok:
            code = self.proc.poll()
            self.stop()
            state = f"exited with {code}" if code is not None else f"not mounted after {timeout}s"
            raise StoreError(
                f"store {state}: {' '.join(self.command)}\n--- {self.log_path} (tail) ---\n"
                f"{self.log_tail()}"
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; then force away any mount left behind."""
        if self.proc is not None and self.returncode is None:
            self.returncode = stop_process(self.proc, timeout=timeout, sig=signal.SIGTERM)
        if is_mounted(self.mountpoint):
            unmount(self.mountpoint)
        return self.returncode

    def cached_chunks(self) -> list[Path]:
        """The entries of the on-disk chunk cache under the store's root."""
        cache = self.root / "cache" / "sha256"
        return [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []

    def wait_cached(self, n: int, timeout: float = 60.0) -> list[Path]:
        """Wait until at least *n* chunks are on disk: chunks just read are queued and written
        once reads pause (write-behind), and a SIGKILL before that loses them."""
        wait_for(lambda: len(self.cached_chunks()) >= n, timeout, alive=self.alive)
        return self.cached_chunks()

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    def _lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def mark(self) -> int:
        """A position in the log, for `events(since=mark)`."""
        return len(self._lines())

    def events(self, name: str | None = None, *, since: int = 0) -> list[dict[str, Any]]:
        """The JSON log records (optionally only `event == name`, only after mark `since`).

        Lines that are not JSON objects (tracebacks, libfuse messages) are skipped.
        """
        out = []
        for line in self._lines()[since:]:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and (name is None or rec.get("event") == name):
                out.append(rec)
        return out

    def problems(self) -> list[dict[str, Any]]:
        """Records logged at warning level or above."""
        return [e for e in self.events() if e.get("level") in ("warning", "error", "critical")]

    def __enter__(self) -> StoreProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

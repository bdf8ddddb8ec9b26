"""Conversion progress: a status line per layer on a terminal, nothing otherwise; summary table.

Pure presentation: the converter reports byte counts, this module decides whether and how to
show them. Safe to call from worker threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

_MIN_INTERVAL = 0.2


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - loop always returns


@dataclass
class _Layer:
    label: str
    started: float
    bytes_in: int = 0
    bytes_out: int = 0


class Progress:
    """Per-layer progress on *stream* when it is a TTY (or *enabled* forces it)."""

    def __init__(self, stream: TextIO, *, enabled: bool | None = None) -> None:
        self.stream = stream
        if enabled is None:
            try:
                enabled = stream.isatty()
            except (AttributeError, ValueError):
                enabled = False
        self.enabled = enabled
        self._lock = threading.Lock()
        self._layers: dict[str, _Layer] = {}
        self._last = 0.0

    def start(self, key: str, label: str) -> None:
        with self._lock:
            self._layers[key] = _Layer(label, time.monotonic())

    def add(self, key: str, *, bytes_in: int = 0, bytes_out: int = 0) -> None:
        with self._lock:
            layer = self._layers.get(key)
            if layer is None:
                return
            layer.bytes_in += bytes_in
            layer.bytes_out += bytes_out
            now = time.monotonic()
            if not self.enabled or now - self._last < _MIN_INTERVAL:
                return
            self._last = now
            self._status_line(now)

    def done(self, key: str, note: str) -> None:
        with self._lock:
            layer = self._layers.pop(key, None)
            if layer is None or not self.enabled:
                return
            secs = max(1e-6, time.monotonic() - layer.started)
            self.stream.write(
                f"\r\x1b[K{layer.label}: {note} in {human(layer.bytes_in)} out "
                f"{human(layer.bytes_out)} ({human(layer.bytes_in / secs)}/s)\n"
            )
            self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            with self._lock:
                self.stream.write(f"\r\x1b[K{text}\n")
                self.stream.flush()

    def _status_line(self, now: float) -> None:
        parts = []
        for layer in self._layers.values():
            rate = layer.bytes_in / max(1e-6, now - layer.started)
            parts.append(
                f"{layer.label} {human(layer.bytes_in)}->{human(layer.bytes_out)} "
                f"{human(rate)}/s"
            )
        self.stream.write("\r\x1b[K" + " | ".join(parts)[:200])
        self.stream.flush()


def summary_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A plain left-aligned text table (numbers right-aligned)."""
    table = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = []
    for n, row in enumerate(table):
        cells = []
        for i, cell in enumerate(row):
            numeric = n > 0 and cell[:1].isdigit()
            cells.append(cell.rjust(widths[i]) if numeric else cell.ljust(widths[i]))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)

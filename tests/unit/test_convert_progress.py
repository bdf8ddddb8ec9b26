"""Progress lines (terminal only) and the summary table of `layerstore convert`."""

from __future__ import annotations

import io

from store.progress import Progress, human, summary_table


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_quiet_when_not_a_terminal() -> None:
    out = io.StringIO()
    p = Progress(out)
    p.start("k", "layer abc")
    p.add("k", bytes_in=10, bytes_out=5)
    p.done("k", "12 TOC entries")
    assert out.getvalue() == ""


def test_per_layer_lines_on_a_terminal() -> None:
    out = _Tty()
    p = Progress(out)
    p.start("k", "layer abc")
    p.add("k", bytes_in=3 << 20, bytes_out=1 << 20)
    p.done("k", "12 TOC entries")
    text = out.getvalue()
    assert "layer abc: 12 TOC entries in 3.0 MiB out 1.0 MiB" in text
    assert text.endswith("\n")


def test_summary_table_and_sizes() -> None:
    table = summary_table([["abc", "1.0 MiB", "12"]], ["layer", "before", "toc entries"])
    header, row = table.splitlines()
    assert header.split() == ["layer", "before", "toc", "entries"]
    assert row.split() == ["abc", "1.0", "MiB", "12"]
    assert human(512) == "512 B" and human(1536) == "1.5 KiB"

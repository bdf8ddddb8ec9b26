"""The pure parts of the two-generation e2e setup: which Debian release the chroot gets, where
its packages come from, and how recorded outcomes become the README table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import compat_table
from tests.harness import compat, podman5

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("LAYERSTORE_DEBIAN_MIRROR", "LAYERSTORE_CHROOT_SUITE"):
        monkeypatch.delenv(var, raising=False)


def test_mirror_from_deb822_skips_security_and_source_entries(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(DEB822)
    (d / "other.list.disabled").write_text("deb http://wrong.example/debian bookworm main\n")
    assert podman5.debian_mirror([d, tmp_path / "sources.list"]) == "http://mirror.example/debian"


def test_mirror_from_one_line_format(tmp_path: Path) -> None:
    f = tmp_path / "sources.list"
    f.write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb http://sec.example/debian-security trixie-security main\n"
        "deb [signed-by=/usr/share/keyrings/k.gpg] http://one.example/debian trixie main\n"
    )
    assert podman5.debian_mirror([tmp_path / "none.d", f]) == "http://one.example/debian"


def test_no_mirror_is_an_error_not_an_internet_default(tmp_path: Path) -> None:
    with pytest.raises(podman5.ChrootError, match="no Debian mirror"):
        podman5.debian_mirror([tmp_path / "missing.d", tmp_path / "missing.list"])


@pytest.mark.parametrize(
    ("host", "suite"),
    [("4.3.1", "trixie"), ("5.4.2", "bookworm"), ("5.0.3", "bookworm"), ("", "trixie")],
)
def test_chroot_gets_the_other_generation(host: str, suite: str) -> None:
    assert podman5.chroot_suite(host) == suite


def test_suite_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERSTORE_CHROOT_SUITE", "bookworm")
    assert podman5.chroot_suite("4.3.1") == "bookworm"


def test_bookworm_adds_the_network_stack_debootstrap_cannot_resolve() -> None:
    assert "netavark" in podman5.packages_for("bookworm")
    assert podman5.packages_for("trixie") == list(podman5.PACKAGES)


def test_compat_record_and_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = tmp_path / "compat.jsonl"
    monkeypatch.setattr(compat, "RESULTS", results)
    compat.record("5.4.2", compat.ESGZ_CTR, "pull", False, keys="toc", where="chroot trixie")
    with compat.check("5.4.2", compat.ESGZ_CTR, "pull", keys="toc", where="chroot trixie"):
        pass
    with pytest.raises(AssertionError), compat.check("4.3.1", compat.ESGZ_OURS, "save"):
        raise AssertionError("layer digest mismatch")
    with pytest.raises(ValueError):
        compat.record("4.3.1", compat.GZIP, "build", True)
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert [(r["operation"], r["ok"]) for r in lines] == [
        ("pull", False), ("pull", True), ("save", False)
    ]
    assert lines[2]["error"] == "AssertionError"

    table = compat_table.render(compat_table.load(results)).splitlines()
    rows = [r for r in table if r.startswith("| 4.") or r.startswith("| 5.")]
    # newest outcome per cell wins; untested cells show "–"; older Podman first
    assert rows == [
        "| 4.3.1 |  | – | eStargz (layerstore writer) | – | – | ✗ fails | – |",
        "| 5.4.2 | chroot trixie | TOC digest | eStargz (ctr-remote) | ✓ | – | – | – |",
    ]


def test_readme_block_is_replaced_between_markers(tmp_path: Path) -> None:
    results, readme = tmp_path / "c.jsonl", tmp_path / "README.md"
    results.write_text(
        json.dumps({"podman": "4.3.1", "format": compat.GZIP, "operation": "run", "ok": True,
                    "time": "2026-01-01T00:00:00Z"}) + "\n"
        + json.dumps({"podman": "4.3.1", "format": compat.GZIP, "operation": "run", "ok": True,
                      "time": "2026-01-02T00:00:00Z"}) + "\n"
    )
    readme.write_text(f"intro\n{compat_table.BEGIN}\nold\n{compat_table.END}\nrest\n")
    args = ["--results", str(results), "--readme", str(readme)]
    assert compat_table.main([*args, "--check"]) == 1
    assert compat_table.main([*args, "--write"]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{compat_table.END}\nrest\n")
    assert "old" not in text and "| 4.3.1 |" in text
    assert compat_table.main([*args, "--check"]) == 0
    assert len(results.read_text().splitlines()) == 1  # compacted to the newest per cell

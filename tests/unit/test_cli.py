"""The command line as a user meets it (run as a subprocess: `main` configures logging)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def layerstore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "store", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_help_explains_the_storage_conf_line() -> None:
    out = layerstore("serve", "--help")
    assert out.returncode == 0
    assert 'additionallayerstores = ["/var/lib/layerstore/store:ref"]' in out.stdout
    assert "--root" in out.stdout and "--config" in out.stdout


def test_no_command_prints_usage_and_fails() -> None:
    out = layerstore()
    assert out.returncode == 2
    assert "serve" in out.stdout and "convert" in out.stdout


def test_missing_config_is_one_clear_line(tmp_path: Path) -> None:
    out = layerstore(
        "serve",
        "--root",
        str(tmp_path),
        "--config",
        str(tmp_path / "nope.toml"),
        str(tmp_path / "mnt"),
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"layerstore: config file {tmp_path / 'nope.toml'} does not exist"
    ]


def test_bad_setting_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[cache]\nmemroy_mb = 5\n")
    out = layerstore("serve", "--root", str(tmp_path), "--config", str(cfg), str(tmp_path / "m"))
    assert out.returncode == 2
    assert "unknown setting cache.memroy_mb" in out.stderr


def test_mount_point_with_colon_is_refused(tmp_path: Path) -> None:
    out = layerstore("serve", "--root", str(tmp_path), str(tmp_path / "a:b"))
    assert out.returncode == 2
    assert "must not contain ':'" in out.stderr
    assert not (tmp_path / "a:b").exists()

"""Podman's auth-file chain, per-repository keys and docker-credential helpers."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from store.registry.credentials import (
    IDENTITY_TOKEN_USER,
    AuthFileCredentials,
    AuthPath,
    auth_file_chain,
    lookup_keys,
    run_credential_helper,
)


def b64(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def write(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def test_chain_explicit_file_is_the_only_one(tmp_path: Path) -> None:
    env = {"REGISTRY_AUTH_FILE": str(tmp_path / "a.json"), "HOME": str(tmp_path)}
    assert auth_file_chain(env, uid=0) == [AuthPath(tmp_path / "a.json")]


def test_chain_defaults_root_and_user(tmp_path: Path) -> None:
    home = tmp_path / "home"
    chain = [a.path for a in auth_file_chain({"HOME": str(home)}, uid=0)]
    assert chain == [
        Path("/run/containers/0/auth.json"),
        home / ".config/containers/auth.json",
        home / ".docker/config.json",
        home / ".dockercfg",
    ]
    env = {
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
        "DOCKER_CONFIG": str(tmp_path / "dock"),
    }
    chain = [a.path for a in auth_file_chain(env, uid=1000)]
    assert chain[:3] == [
        tmp_path / "run/containers/auth.json",
        tmp_path / "cfg/containers/auth.json",
        tmp_path / "dock/config.json",
    ]


def test_lookup_keys_most_specific_first() -> None:
    assert lookup_keys("reg:5000", "a/b/c") == [
        "reg:5000/a/b/c",
        "reg:5000/a/b",
        "reg:5000/a",
        "reg:5000",
    ]
    assert lookup_keys("reg", None) == ["reg"]


def test_first_file_with_an_entry_wins_and_repo_keys(tmp_path: Path) -> None:
    first = write(
        tmp_path / "run/containers/auth.json",
        {"auths": {"reg.example/team": {"auth": b64("team", "t-pw")}}},
    )
    second = write(
        tmp_path / "home/.docker/config.json",
        {
            "auths": {
                "reg.example": {"auth": b64("host", "h-pw")},
                "other.example": {"auth": b64("o", "o-pw")},
                "https://index.docker.io/v1/": {"auth": b64("hub", "hub-pw")},
            }
        },
    )
    creds = AuthFileCredentials([AuthPath(first), AuthPath(second)])
    assert creds.lookup_repository("reg.example", "team/app") == ("team", "t-pw")
    # the first file has nothing for this repository: the second file's host entry applies
    assert creds.lookup_repository("reg.example", "teamx/app") == ("host", "h-pw")
    assert creds.lookup("reg.example") == ("host", "h-pw")
    assert creds.lookup("other.example") == ("o", "o-pw")
    assert creds.lookup("docker.io") == ("hub", "hub-pw")
    assert creds.lookup("nothing.example") is None


def test_identity_token_and_plain_fields(tmp_path: Path) -> None:
    f = write(
        tmp_path / "auth.json",
        {
            "auths": {
                "a.example": {"identitytoken": "refresh-123"},
                "b.example": {"username": "u", "password": "p"},
                "c.example": {"auth": "!!!not base64"},
            }
        },
    )
    creds = AuthFileCredentials([AuthPath(f)])
    assert creds.lookup("a.example") == (IDENTITY_TOKEN_USER, "refresh-123")
    assert creds.lookup("b.example") == ("u", "p")
    assert creds.lookup("c.example") is None


def test_file_changes_are_picked_up(tmp_path: Path) -> None:
    f = write(tmp_path / "auth.json", {"auths": {}})
    creds = AuthFileCredentials([AuthPath(f)])
    assert creds.lookup("reg") is None
    write(f, {"auths": {"reg": {"auth": b64("late", "login-pw")}}})
    os.utime(f, ns=(1, 1))  # a distinct stamp even within one mtime tick
    assert creds.lookup("reg") == ("late", "login-pw")


def test_broken_file_is_skipped(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    good = write(tmp_path / "good.json", {"auths": {"reg": {"auth": b64("g", "pw")}}})
    assert AuthFileCredentials([AuthPath(bad), AuthPath(good)]).lookup("reg") == ("g", "pw")


def test_legacy_dockercfg(tmp_path: Path) -> None:
    f = write(tmp_path / ".dockercfg", {"legacy.example": {"auth": b64("old", "pw")}})
    assert AuthFileCredentials([AuthPath(f, legacy=True)]).lookup("legacy.example") == ("old", "pw")


def test_helpers_cred_helpers_before_auths_then_creds_store(tmp_path: Path) -> None:
    f = write(
        tmp_path / "auth.json",
        {
            "auths": {"h.example": {"auth": b64("file", "pw")}, "s.example": {}},
            "credHelpers": {"h.example": "special"},
            "credsStore": "desktop",
        },
    )
    asked: list[tuple[str, str]] = []

    def helper(name: str, server: str) -> tuple[str, str] | None:
        asked.append((name, server))
        return {"special": ("sp", "sp-pw"), "desktop": ("ds", "ds-pw")}[name]

    creds = AuthFileCredentials([AuthPath(f)], helper=helper)
    assert creds.lookup("h.example") == ("sp", "sp-pw")
    assert creds.lookup("s.example") == ("ds", "ds-pw")
    assert creds.lookup("s.example") == ("ds", "ds-pw")  # cached: asked once
    assert asked == [("special", "h.example"), ("desktop", "s.example")]


def _fake_helper(bindir: Path, name: str, script: str) -> None:
    bindir.mkdir(exist_ok=True)
    p = bindir / f"docker-credential-{name}"
    p.write_text("#!/bin/sh\n" + script)
    p.chmod(p.stat().st_mode | stat.S_IXUSR)


def test_real_helper_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    _fake_helper(
        bindir,
        "fake",
        'read server\n[ "$1" = get ] || exit 3\n'
        'if [ "$server" = "reg.example" ]; then\n'
        '  echo \'{"ServerURL":"reg.example","Username":"hu","Secret":"hs"}\'\n'
        "else echo 'credentials not found in native keychain'; exit 1; fi\n",
    )
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    assert run_credential_helper("fake", "reg.example") == ("hu", "hs")
    assert run_credential_helper("fake", "other.example") is None
    assert run_credential_helper("absent-helper-xyz", "reg.example") is None


def test_secrets_never_in_repr(tmp_path: Path) -> None:
    f = write(tmp_path / "auth.json", {"auths": {"reg": {"auth": b64("user", "TOPSECRET")}}})
    creds = AuthFileCredentials([AuthPath(f)])
    assert creds.lookup("reg") == ("user", "TOPSECRET")
    assert "TOPSECRET" not in repr(creds)
    assert "TOPSECRET" not in repr(creds.__dict__)

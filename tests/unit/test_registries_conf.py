"""registries.conf v2: prefix matching, rewrites, mirrors, insecure/blocked, drop-ins."""

from __future__ import annotations

from pathlib import Path

import pytest

from store.errors import ConfigError
from store.registry import registries_conf as rc
from store.registry.registries_conf import Endpoint, RegistriesConf

CONF = """
unqualified-search-registries = ["docker.io"]
short-name-mode = "enforcing"

[[registry]]
prefix = "example.com/team"
location = "internal.example:5000/mirror/team"

[[registry.mirror]]
location = "m1.local:5000/cache/team"
insecure = true

[[registry.mirror]]
location = "m2.local"
pull-from-mirror = "digest-only"

[[registry]]
location = "example.com"
insecure = true

[[registry]]
prefix = "example.com/team/secret"
location = "example.com/team/secret"
blocked = true

[[registry]]
prefix = "*.wild.example"
[[registry.mirror]]
location = "wm.local:5000"

[[registry]]
location = "digest-only.example"
mirror-by-digest-only = true
[[registry.mirror]]
location = "dm.local"
"""


@pytest.fixture
def conf() -> RegistriesConf:
    return RegistriesConf(rc.parse(CONF))


def test_longest_prefix_and_rewrite(conf: RegistriesConf) -> None:
    assert conf.endpoints("example.com", "team/app") == [
        Endpoint("m1.local:5000", "cache/team/app", insecure=True, mirror=True),
        Endpoint("m2.local", "app", mirror=True),
        Endpoint("internal.example:5000", "mirror/team/app"),
    ]
    # a tag pull skips the digest-only mirror
    assert [e.host for e in conf.endpoints("example.com", "team/app", digested=False)] == [
        "m1.local:5000",
        "internal.example:5000",
    ]
    assert conf.endpoints("example.com", "other/app") == [
        Endpoint("example.com", "other/app", insecure=True)
    ]


def test_prefix_matches_only_at_component_boundaries(conf: RegistriesConf) -> None:
    # "example.com/teammate" is not under "example.com/team"
    assert conf.endpoints("example.com", "teammate/x") == [
        Endpoint("example.com", "teammate/x", insecure=True)
    ]
    assert conf.endpoints("unknown.example", "a") == [Endpoint("unknown.example", "a")]


def test_blocked(conf: RegistriesConf) -> None:
    assert conf.blocked("example.com", "team/secret")
    assert conf.blocked("example.com", "team/secret/deeper")
    assert not conf.blocked("example.com", "team/secretive")
    assert not conf.blocked("example.com", "team/app")


def test_wildcard(conf: RegistriesConf) -> None:
    assert conf.endpoints("a.wild.example", "x/y") == [
        Endpoint("wm.local:5000", "x/y", mirror=True),
        Endpoint("a.wild.example", "x/y"),
    ]
    assert conf.endpoints("wild.example", "x") == [Endpoint("wild.example", "x")]


def test_mirror_by_digest_only(conf: RegistriesConf) -> None:
    assert [e.host for e in conf.endpoints("digest-only.example", "r")] == [
        "dm.local",
        "digest-only.example",
    ]
    assert [e.host for e in conf.endpoints("digest-only.example", "r", digested=False)] == [
        "digest-only.example"
    ]


def test_insecure_hosts(conf: RegistriesConf) -> None:
    assert conf.insecure_host("example.com")
    assert conf.insecure_host("m1.local:5000")
    assert not conf.insecure_host("m2.local")
    assert not conf.insecure_host("internal.example:5000")


@pytest.mark.parametrize(
    "text",
    [
        '[[registry]]\nprefix = "*.x.example"\nlocation = "y"\n',
        "[[registry]]\ninsecure = true\n",
        '[[registry]]\nlocation = "a"\ninsecure = "yes"\n',
        '[[registry]]\nlocation = "a"\n[[registry.mirror]]\nlocation = "m"\n'
        'pull-from-mirror = "sometimes"\n',
        "[[registry]\n",
        '[registries.search]\nregistries = []\n[[registry]]\nlocation = "a"\n',
    ],
)
def test_invalid(text: str) -> None:
    with pytest.raises(ConfigError):
        rc.parse(text)


def test_v1_format() -> None:
    conf = RegistriesConf(
        rc.parse(
            "[registries.search]\nregistries = ['docker.io']\n"
            "[registries.insecure]\nregistries = ['old.example:5000']\n"
            "[registries.block]\nregistries = ['bad.example']\n"
        )
    )
    assert conf.insecure_host("old.example:5000")
    assert conf.blocked("bad.example", "x")


def test_files_and_drop_ins(tmp_path: Path) -> None:
    main = tmp_path / "registries.conf"
    main.write_text('[[registry]]\nlocation = "a.example"\nblocked = true\n')
    d = tmp_path / "registries.conf.d"
    d.mkdir()
    (d / "20-b.conf").write_text(
        '[[registry]]\nlocation = "a.example"\n[[registry.mirror]]\nlocation = "late"\n'
    )
    (d / "10-a.conf").write_text('[[registry]]\nlocation = "b.example"\ninsecure = true\n')
    (d / "ignored.txt").write_text("not toml")
    env = {"CONTAINERS_REGISTRIES_CONF": str(main), "HOME": str(tmp_path / "home")}
    files = rc.config_files(env, conf_dirs=[d])
    assert files == [main, d / "10-a.conf", d / "20-b.conf"]
    conf = rc.load(env, conf_dirs=[d])
    # 20-b.conf replaced the main file's entry for a.example: no longer blocked, has a mirror
    assert not conf.blocked("a.example", "x")
    assert [e.host for e in conf.endpoints("a.example", "x")] == ["late", "a.example"]
    assert conf.insecure_host("b.example")


def test_user_file_replaces_system(tmp_path: Path) -> None:
    home = tmp_path / "home"
    user = home / ".config/containers/registries.conf"
    user.parent.mkdir(parents=True)
    user.write_text('[[registry]]\nlocation = "u.example"\ninsecure = true\n')
    files = rc.config_files({"HOME": str(home)})
    assert files == [user]

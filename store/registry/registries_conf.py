"""registries.conf (v2 TOML) as containers/image reads it: which hosts to pull a reference from.

Files: `$CONTAINERS_REGISTRIES_CONF` if set, else `$HOME/.config/containers/registries.conf` if
it exists, else `/etc/containers/registries.conf`; then the drop-ins `*.conf` of
`/etc/containers/registries.conf.d` and `$HOME/.config/containers/registries.conf.d`, in name
order. A `[[registry]]` from a later file replaces one with the same prefix.

    [[registry]]
    prefix = "example.com/team"          # default: location; "*.example.com" matches subdomains
    location = "internal.example:5000/mirror/team"   # rewrite (prefix replaced by location)
    insecure = false                     # HTTPS without certificate checks, HTTP as fallback
    blocked = false                      # never pull anything matching the prefix
    mirror-by-digest-only = false
    [[registry.mirror]]                  # tried in order before the location
    location = "mirror.local:5000/team"
    insecure = true
    pull-from-mirror = "all"             # or "digest-only", "tag-only"

The longest matching prefix wins. `unqualified-search-registries`, `short-name-mode`, aliases
and credential-helpers are accepted and ignored (references reach the store fully qualified).
The v1 format (`[registries.insecure]`, `[registries.block]`) is read for its host lists.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from store.errors import ConfigError

SYSTEM_CONF = Path("/etc/containers/registries.conf")
SYSTEM_CONF_DIR = Path("/etc/containers/registries.conf.d")
_PULL_FROM = ("all", "digest-only", "tag-only")


@dataclass(frozen=True)
class Endpoint:
    """One place to try: `host` and the repository there, already rewritten."""

    host: str
    repository: str
    insecure: bool = False
    mirror: bool = False

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repository}"


@dataclass(frozen=True)
class Mirror:
    location: str
    insecure: bool = False
    pull_from: str = "all"


@dataclass(frozen=True)
class RegistryEntry:
    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False
    mirrors: tuple[Mirror, ...] = ()

    @property
    def wildcard(self) -> bool:
        return self.prefix.startswith("*.")


def _match_len(ref: str, prefix: str) -> int:
    """Length of *ref* that *prefix* matches (containers/image refMatchingPrefix), or -1."""
    if prefix.startswith("*."):
        host = ref.split("/", 1)[0]
        if host.endswith(prefix[1:]):  # ".example.com": a proper subdomain only
            return len(host)
        return -1
    if not ref.startswith(prefix):
        return -1
    if len(ref) == len(prefix) or ref[len(prefix)] in "/:@":
        return len(prefix)
    return -1


def _split_location(location: str) -> tuple[str, str]:
    host, _, path = location.partition("/")
    return host, path


class RegistriesConf:
    """The merged configuration; `endpoints()` answers the only question the store asks."""

    def __init__(self, entries: list[RegistryEntry] | None = None, sources: tuple[str, ...] = ()):
        self.entries = list(entries or [])
        self.sources = sources

    def find(self, name: str) -> RegistryEntry | None:
        best: RegistryEntry | None = None
        best_len = -1
        for entry in self.entries:
            n = _match_len(name, entry.prefix)
            if n > best_len:
                best, best_len = entry, n
        return best

    def blocked(self, registry: str, repository: str) -> bool:
        entry = self.find(f"{registry}/{repository}")
        return entry is not None and entry.blocked

    def insecure_host(self, host: str) -> bool:
        """Whether *host* (a location or mirror host) is marked insecure anywhere."""
        for entry in self.entries:
            if not entry.wildcard and _split_location(entry.location)[0] == host:
                if entry.insecure:
                    return True
            elif entry.wildcard and _match_len(host, entry.prefix) >= 0 and entry.insecure:
                return True
            for m in entry.mirrors:
                if m.insecure and _split_location(m.location)[0] == host:
                    return True
        return False

    def endpoints(self, registry: str, repository: str, *, digested: bool = True) -> list[Endpoint]:
        """Mirrors (in order) then the (possibly rewritten) origin, for `registry/repository`.

        *digested*: whether the pull is by digest (the store's blob and config reads always
        are; a manifest by tag is not), for `pull-from-mirror` / `mirror-by-digest-only`.
        Raises nothing for blocked entries: callers check `blocked()` first.
        """
        name = f"{registry}/{repository}"
        entry = self.find(name)
        if entry is None:
            return [Endpoint(registry, repository)]
        n = _match_len(name, entry.prefix)
        rest = name[n:]
        out: list[Endpoint] = []
        for m in entry.mirrors:
            if entry.mirror_by_digest_only and not digested:
                continue
            if (m.pull_from == "digest-only" and not digested) or (
                m.pull_from == "tag-only" and digested
            ):
                continue
            out.append(self._endpoint(m.location + rest, m.insecure, mirror=True))
        if entry.location and not entry.wildcard:
            out.append(self._endpoint(entry.location + rest, entry.insecure, mirror=False))
        else:
            out.append(Endpoint(registry, repository, entry.insecure))
        return out

    @staticmethod
    def _endpoint(name: str, insecure: bool, *, mirror: bool) -> Endpoint:
        host, repo = _split_location(name)
        repo = repo.strip("/")
        if not host or not repo:
            raise ConfigError(f"registries.conf rewrites to an invalid name {name!r}")
        return Endpoint(host, repo, insecure, mirror)

    def __repr__(self) -> str:
        return f"RegistriesConf({len(self.entries)} entries from {list(self.sources)!r})"


# --- loading -----------------------------------------------------------------------------------


def _bool(table: Mapping[str, Any], key: str, where: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false")
    return value


def _str(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string")
    return value.strip()


def _parse_entry(table: Any, where: str) -> RegistryEntry:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [[registry]] must be a table")
    location = _str(table, "location", where).rstrip("/")
    prefix = _str(table, "prefix", where).rstrip("/") or location
    if not prefix:
        raise ConfigError(f"{where}: [[registry]] needs a prefix or a location")
    if prefix.startswith("*.") and location:
        # containers/image refuses this too: a wildcard cannot be rewritten to one place.
        raise ConfigError(f"{where}: wildcard prefix {prefix!r} cannot have a location")
    if not location and not prefix.startswith("*."):
        location = prefix
    mirrors = []
    raw_mirrors = table.get("mirror", [])
    if not isinstance(raw_mirrors, list):
        raise ConfigError(f"{where}: registry.mirror must be an array of tables")
    for m in raw_mirrors:
        if not isinstance(m, dict):
            raise ConfigError(f"{where}: registry.mirror entries must be tables")
        mloc = _str(m, "location", where).rstrip("/")
        if not mloc:
            raise ConfigError(f"{where}: a mirror of {prefix!r} has no location")
        pull_from = _str(m, "pull-from-mirror", where) or "all"
        if pull_from not in _PULL_FROM:
            raise ConfigError(f"{where}: pull-from-mirror must be one of {_PULL_FROM}")
        mirrors.append(Mirror(mloc, _bool(m, "insecure", where), pull_from))
    return RegistryEntry(
        prefix=prefix,
        location=location,
        insecure=_bool(table, "insecure", where),
        blocked=_bool(table, "blocked", where),
        mirror_by_digest_only=_bool(table, "mirror-by-digest-only", where),
        mirrors=tuple(mirrors),
    )


def _parse_v1(data: dict[str, Any], where: str) -> list[RegistryEntry]:
    out: dict[str, RegistryEntry] = {}
    regs = data.get("registries", {})
    for section, flag in (("insecure", "insecure"), ("block", "blocked")):
        hosts = regs.get(section, {}).get("registries", []) if isinstance(regs, dict) else []
        if not isinstance(hosts, list):
            raise ConfigError(f"{where}: registries.{section}.registries must be a list")
        for host in hosts:
            old = out.get(host, RegistryEntry(prefix=host, location=host))
            out[host] = RegistryEntry(
                prefix=host,
                location=host,
                insecure=old.insecure or flag == "insecure",
                blocked=old.blocked or flag == "blocked",
            )
    return list(out.values())


def parse(text: str, where: str = "registries.conf") -> list[RegistryEntry]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if "registries" in data and isinstance(data["registries"], dict):
        if "registry" in data:
            raise ConfigError(f"{where}: mixes the v1 and v2 formats")
        return _parse_v1(data, where)
    raw = data.get("registry", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: [[registry]] must be an array of tables")
    return [_parse_entry(t, where) for t in raw]


def config_files(
    env: Mapping[str, str] | None = None,
    *,
    conf: Path | None = None,
    conf_dirs: list[Path] | None = None,
) -> list[Path]:
    """The files Podman would read, in merge order (missing ones are left out)."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME", "/root"))
    user_conf = home / ".config" / "containers" / "registries.conf"
    user_dir = home / ".config" / "containers" / "registries.conf.d"
    if conf is not None:
        main = conf
    elif env.get("CONTAINERS_REGISTRIES_CONF"):
        main = Path(env["CONTAINERS_REGISTRIES_CONF"])
    elif user_conf.exists():
        # containers/image: a per-user file replaces the system file and dir
        main, conf_dirs = user_conf, conf_dirs if conf_dirs is not None else [user_dir]
    else:
        main = SYSTEM_CONF
    dirs = conf_dirs if conf_dirs is not None else [SYSTEM_CONF_DIR, user_dir]
    files = [main] if main.is_file() else []
    for d in dirs:
        if d.is_dir():
            files.extend(sorted(p for p in d.glob("*.conf") if p.is_file()))
    return files


def load(
    env: Mapping[str, str] | None = None,
    *,
    conf: Path | None = None,
    conf_dirs: list[Path] | None = None,
) -> RegistriesConf:
    """Read and merge registries.conf and its drop-ins; raises ConfigError if one is invalid."""
    merged: dict[str, RegistryEntry] = {}
    files = config_files(env, conf=conf, conf_dirs=conf_dirs)
    for path in files:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        for entry in parse(text, str(path)):
            merged[entry.prefix] = entry  # a later file overrides the same prefix
    return RegistriesConf(list(merged.values()), tuple(str(p) for p in files))

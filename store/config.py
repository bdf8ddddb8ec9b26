"""The TOML configuration file, loaded into a frozen dataclass with defaults.

Example (contrib/config.toml):

    [cache]
    memory_mb = 256          # verified, decompressed chunks kept in RAM
    disk_mb = 10240          # verified chunks kept under ROOT/cache (LRU); 0 turns it off
    write_behind_mb = 256    # chunks just read, queued for the disk cache until reads pause;
                             # 0 writes them before the read returns

    [prefetch]
    enabled = true           # fetch the region before .prefetch.landmark at first use
    background = false       # then fetch the rest of the layer into the disk cache
    background_concurrency = 2
    background_mbps = 0.0    # bandwidth cap of the background fetch in Mbit/s; 0 = none

    [fetch]
    max_concurrency = 8      # parallel registry requests

    [registry]
    plain_http = ["registry.local:5000"]   # loopback hosts are always plain HTTP
    insecure = ["selfsigned.example:443"]  # HTTPS without certificate checks
    connect_timeout = 5.0
    read_timeout = 30.0
    deadline = 60.0          # total time one request may take, retries included
    max_attempts = 5         # attempts per request (5xx, 429, dropped connections)
    auth_file = ""           # default: the auth files Podman reads (see README)
    registries_conf = ""     # default: registries.conf as Podman finds it (+ .d drop-ins)

    [resolve]
    manifest_ttl = 60.0      # seconds a tag's manifest is trusted before re-checking
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from store.errors import ConfigError

DEFAULT_ROOT = Path("/var/lib/layerstore")


@dataclass(frozen=True)
class CacheConfig:
    memory_mb: int = 256
    disk_mb: int = 10240
    write_behind_mb: int = 256


@dataclass(frozen=True)
class PrefetchConfig:
    enabled: bool = True
    background: bool = False
    background_concurrency: int = 2
    background_mbps: float = 0.0


@dataclass(frozen=True)
class FetchConfig:
    max_concurrency: int = 8


@dataclass(frozen=True)
class RegistryConfig:
    plain_http: tuple[str, ...] = ()
    insecure: tuple[str, ...] = ()
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    deadline: float = 60.0
    max_attempts: int = 5
    # "" = where Podman looks ($REGISTRY_AUTH_FILE, XDG_RUNTIME_DIR, ~/.config, ~/.docker)
    auth_file: str = ""
    # "" = where Podman looks ($CONTAINERS_REGISTRIES_CONF, /etc/containers/registries.conf)
    registries_conf: str = ""


@dataclass(frozen=True)
class ResolveConfig:
    manifest_ttl: float = 60.0


@dataclass(frozen=True)
class Config:
    cache: CacheConfig = field(default_factory=CacheConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    resolve: ResolveConfig = field(default_factory=ResolveConfig)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)


def _section(cls: type, name: str, data: Any) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"unknown setting {name}.{key}")
        default = known[key].default
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name}.{key} must be a list of strings")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{name}.{key} must be true or false")
        elif isinstance(value, bool) or not isinstance(value, type(default) | int):
            raise ConfigError(f"{name}.{key} must be a {type(default).__name__}")
        elif isinstance(default, float):
            value = float(value)
        if isinstance(value, int | float) and value < 0:
            raise ConfigError(f"{name}.{key} must not be negative")
        values[key] = value
    return cls(**values)


def load(path: Path | None) -> Config:
    """Read *path*; None means built-in defaults."""
    if path is None:
        return Config()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    sections = {f.name: f for f in fields(Config)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in sections:
            raise ConfigError(f"unknown section [{name}] in {path}")
        kwargs[name] = _section(type(getattr(Config(), name)), name, value)
    return Config(**kwargs)

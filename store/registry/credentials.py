"""Registry credentials found the way Podman finds them (containers/image pkg/docker/config).

Auth files, in the order Podman consults them:

1. `$REGISTRY_AUTH_FILE` if set -- and then *only* that file (Podman passes it as an explicit
   `--authfile`, which disables the default chain);
2. `${XDG_RUNTIME_DIR}/containers/auth.json`, or `/run/containers/<uid>/auth.json` when
   XDG_RUNTIME_DIR is unset (that is `/run/containers/0/auth.json` for root);
3. `${XDG_CONFIG_HOME:-$HOME/.config}/containers/auth.json`;
4. `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`;
5. `$HOME/.dockercfg` (the legacy format: the `auths` map at the top level).

The first file that has something for the registry wins. Within a file, `credHelpers[<host>]`
comes first (a helper is asked for the host only, never per repository), then the `auths`
entries from most to least specific key (`host/ns/repo`, `host/ns`, `host`), then entries written
with a scheme or path (`https://index.docker.io/v1/`), then `credsStore`. Helpers are the
`docker-credential-<name>` programs: `get` with the server on stdin, JSON on stdout.

An `identitytoken` (or a helper answering username `<token>`) is a refresh token for the OAuth2
token endpoint; it is returned as (IDENTITY_TOKEN_USER, token) so that the client can tell.

Secrets never reach logs or reprs: only registry names and file paths do.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

#: The username docker-credential helpers and auth files use for identity (refresh) tokens.
IDENTITY_TOKEN_USER = "<token>"
HELPER_TIMEOUT = 10.0
#: Helper answers are kept this long: a Basic registry asks for credentials on every request.
HELPER_CACHE_TTL = 60.0

_DOCKER_HUB_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class AuthPath:
    path: Path
    legacy: bool = False  # ~/.dockercfg: {"host": {"auth": ...}} without the "auths" wrapper


def auth_file_chain(env: Mapping[str, str] | None = None, uid: int | None = None) -> list[AuthPath]:
    """The auth files Podman reads for a process with environment *env* and user *uid*."""
    env = os.environ if env is None else env
    uid = os.geteuid() if uid is None else uid
    explicit = env.get("REGISTRY_AUTH_FILE")
    if explicit:
        return [AuthPath(Path(explicit))]
    home = Path(env.get("HOME") or _home_of(uid))
    runtime = env.get("XDG_RUNTIME_DIR")
    chain = [
        AuthPath(
            Path(runtime) / "containers" / "auth.json"
            if runtime
            else Path(f"/run/containers/{uid}/auth.json")
        )
    ]
    config_home = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    chain.append(AuthPath(config_home / "containers" / "auth.json"))
    docker_config = env.get("DOCKER_CONFIG")
    chain.append(
        AuthPath(
            Path(docker_config) / "config.json"
            if docker_config
            else home / ".docker" / "config.json"
        )
    )
    chain.append(AuthPath(home / ".dockercfg", legacy=True))
    return chain


def _home_of(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_dir
    except (KeyError, ImportError):
        return "/"


def lookup_keys(registry: str, repository: str | None) -> list[str]:
    """auth.json keys that apply to *registry*/*repository*, most specific first."""
    keys: list[str] = []
    if repository:
        parts = repository.split("/")
        for n in range(len(parts), 0, -1):
            keys.append(f"{registry}/{'/'.join(parts[:n])}")
    keys.append(registry)
    return keys


def _normalize_key(key: str) -> str:
    """`https://index.docker.io/v1/` -> `index.docker.io`, as Podman normalises old entries."""
    stripped = key
    for scheme in ("http://", "https://"):
        if stripped.startswith(scheme):
            stripped = stripped[len(scheme) :]
            break
    host = stripped.split("/", 1)[0]
    return "docker.io" if host in _DOCKER_HUB_KEYS else host


def _decode_entry(entry: Any) -> tuple[str, str] | None:
    if not isinstance(entry, dict):
        return None
    token = entry.get("identitytoken")
    if isinstance(token, str) and token:
        return IDENTITY_TOKEN_USER, token
    raw = entry.get("auth")
    if isinstance(raw, str) and raw:
        try:
            text = base64.b64decode(raw, validate=False).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = text.partition(":")
        if sep:
            return user, password.strip("\x00")  # docker pads some entries with NULs
        return None
    user, password = entry.get("username"), entry.get("password")
    if isinstance(user, str) and isinstance(password, str) and user:
        return user, password
    return None


@dataclass
class _ParsedFile:
    stamp: tuple[int, int, int]
    auths: dict[str, Any] = field(repr=False)
    cred_helpers: dict[str, str]
    creds_store: str | None


HelperRunner = Callable[[str, str], tuple[str, str] | None]


def run_credential_helper(name: str, server: str) -> tuple[str, str] | None:
    """`docker-credential-<name> get` for *server*; None when it has nothing for it."""
    program = shutil.which(f"docker-credential-{name}")
    if program is None:
        log.warning("credentials.helper_missing", helper=name, registry=server)
        return None
    try:
        proc = subprocess.run(
            [program, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning(
            "credentials.helper_failed", helper=name, registry=server, cause=type(exc).__name__
        )
        return None
    if proc.returncode != 0:
        # "credentials not found in native keychain" is the normal "nothing here" answer;
        # stderr may echo input, so only its first line, and only when it is not that.
        msg = proc.stdout.decode(errors="replace").strip().splitlines()[:1]
        if not msg or "not found" not in msg[0].lower():
            log.warning(
                "credentials.helper_failed", helper=name, registry=server, code=proc.returncode
            )
        return None
    try:
        answer = json.loads(proc.stdout)
        user, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        log.warning("credentials.helper_bad_answer", helper=name, registry=server)
        return None
    if not isinstance(user, str) or not isinstance(secret, str) or not secret:
        return None
    return user, secret


class AuthFileCredentials:
    """The `Credentials` of store.registry.auth, read from Podman's auth files.

    Files are re-read when they change (stat-based), so a `podman login` done while the store
    runs is picked up by the next token request. `lookup(registry)` answers for the host only;
    `lookup_repository(registry, repository)` also considers per-repository entries.
    """

    def __init__(
        self,
        paths: list[AuthPath] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        helper: HelperRunner = run_credential_helper,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.paths = paths if paths is not None else auth_file_chain(env)
        self._helper = helper
        self._clock = clock
        self._lock = threading.Lock()
        self._files: dict[Path, _ParsedFile] = {}
        self._helper_cache: dict[tuple[str, str], tuple[float, tuple[str, str] | None]] = {}

    def lookup(self, registry: str) -> tuple[str, str] | None:
        return self.lookup_repository(registry, None)

    def lookup_repository(self, registry: str, repository: str | None) -> tuple[str, str] | None:
        for ap in self.paths:
            parsed = self._parse(ap)
            if parsed is None:
                continue
            found = self._find(parsed, registry, repository)
            if found is not None:
                return found
        return None

    def _find(
        self, parsed: _ParsedFile, registry: str, repository: str | None
    ) -> tuple[str, str] | None:
        helper = parsed.cred_helpers.get(registry)
        if helper:
            return self._ask_helper(helper, registry)
        for key in lookup_keys(registry, repository):
            if key in parsed.auths:
                creds = _decode_entry(parsed.auths[key])
                if creds is not None:
                    return creds
        for key, entry in parsed.auths.items():
            if ("://" in key or key.endswith("/")) and _normalize_key(key) == registry:
                creds = _decode_entry(entry)
                if creds is not None:
                    return creds
        if parsed.creds_store:
            return self._ask_helper(parsed.creds_store, registry)
        return None

    def _ask_helper(self, name: str, registry: str) -> tuple[str, str] | None:
        key = (name, registry)
        now = self._clock()
        with self._lock:
            hit = self._helper_cache.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        creds = self._helper(name, registry)
        with self._lock:
            self._helper_cache[key] = (now + HELPER_CACHE_TTL, creds)
        return creds

    def _parse(self, ap: AuthPath) -> _ParsedFile | None:
        try:
            st = ap.path.stat()
        except OSError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            cached = self._files.get(ap.path)
            if cached is not None and cached.stamp == stamp:
                return cached
        try:
            obj = json.loads(ap.path.read_bytes())
        except (OSError, ValueError) as exc:
            # Podman fails the pull on a broken auth file; we just serve nothing from it.
            log.warning("credentials.bad_auth_file", path=str(ap.path), cause=type(exc).__name__)
            return None
        if not isinstance(obj, dict):
            return None
        if ap.legacy:
            auths, helpers, store = obj, {}, None
        else:
            auths = obj.get("auths") if isinstance(obj.get("auths"), dict) else {}
            raw_helpers = obj.get("credHelpers")
            helpers = {
                k: v
                for k, v in (raw_helpers.items() if isinstance(raw_helpers, dict) else ())
                if isinstance(k, str) and isinstance(v, str) and v
            }
            store = obj.get("credsStore") if isinstance(obj.get("credsStore"), str) else None
        parsed = _ParsedFile(stamp, dict(auths), helpers, store or None)
        with self._lock:
            self._files[ap.path] = parsed
        return parsed

    def __repr__(self) -> str:
        return f"AuthFileCredentials(paths={[str(p.path) for p in self.paths]!r})"

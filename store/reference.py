"""Image references (`registry/repository[:tag][@digest]`), parsed and normalised.

Podman hands the store the fully-qualified reference it was given (als-protocol.md §2.1), so
normalisation here is only defensive: a bare name gets `docker.io`, `library/` and `latest`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from store.digest import is_digest
from store.errors import ReferenceError_

DEFAULT_REGISTRY = "docker.io"
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_HOST = re.compile(r"^(?:[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$")


@dataclass(frozen=True, slots=True)
class Reference:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        if not text or len(text) > 4096 or any(c.isspace() for c in text):
            raise ReferenceError_(f"invalid image reference {text[:100]!r}")
        name, digest = text, None
        if "@" in text:
            name, digest = text.split("@", 1)
            if not is_digest(digest):
                raise ReferenceError_(f"invalid digest in reference {text!r}")
        tag = None
        slash = name.rfind("/")
        colon = name.rfind(":")
        if colon > slash:
            name, tag = name[:colon], name[colon + 1 :]
            if not _TAG.match(tag):
                raise ReferenceError_(f"invalid tag in reference {text!r}")
        parts = name.split("/")
        if len(parts) > 1 and (
            "." in parts[0]
            or ":" in parts[0]
            or parts[0] == "localhost"
            or parts[0].startswith("[")
        ):
            registry, path = parts[0], parts[1:]
            if not _HOST.match(registry):
                raise ReferenceError_(f"invalid registry host in reference {text!r}")
        else:
            registry, path = DEFAULT_REGISTRY, parts
        if registry == DEFAULT_REGISTRY and len(path) == 1:
            path = ["library", *path]
        if not path or not all(_COMPONENT.match(p) for p in path):
            raise ReferenceError_(f"invalid repository name in reference {text!r}")
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, "/".join(path), tag, digest)

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def manifest_ref(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest wins over the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, None, digest)

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s

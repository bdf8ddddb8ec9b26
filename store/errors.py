"""The exception tree of layerstore.

    LayerstoreError
    ├── FormatError            the layer bytes are not what the format says
    │   ├── FooterError        no valid eStargz footer at the end of the blob
    │   ├── TocError           TOC member/JSON malformed or unsupported
    │   └── DigestMismatch     verified content does not hash to its recorded digest
    ├── RegistryError          talking to a registry failed
    │   ├── AuthError          credentials refused / token flow failed
    │   ├── NotFound           manifest or blob does not exist (404)
    │   ├── Denied             403 and the like
    │   ├── TransientRegistryError  5xx, 429, dropped connection, timeout: worth a retry
    │   └── RangeUnsupported   the registry does not honour Range where we need it
    ├── ReferenceError_        an image reference string cannot be parsed
    ├── NotLazyLayer           the layer cannot be served lazily (Podman pulls it normally)
    └── ConfigError            configuration file or option invalid

Lower layers raise these; only the FUSE front turns them into errno values and only the
CLI turns them into exit codes.
"""

from __future__ import annotations


class LayerstoreError(Exception):
    """Base of every error layerstore raises on purpose."""


class FormatError(LayerstoreError):
    pass


class FooterError(FormatError):
    pass


class TocError(FormatError):
    pass


class DigestMismatch(FormatError):
    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: digest mismatch (expected {expected}, got {actual})")
        self.what = what
        self.expected = expected
        self.actual = actual


class RegistryError(LayerstoreError):
    pass


class AuthError(RegistryError):
    pass


class NotFound(RegistryError):
    pass


class Denied(RegistryError):
    pass


class TransientRegistryError(RegistryError):
    """A failure that may succeed when tried again (5xx, 429, reset, timeout)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RangeUnsupported(RegistryError):
    pass


class ReferenceError_(LayerstoreError):  # noqa: N801 - avoid shadowing builtin ReferenceError
    pass


class NotLazyLayer(LayerstoreError):
    """The layer exists but layerstore will not serve it (Podman then pulls it normally)."""


class ConfigError(LayerstoreError):
    pass

"""layerstore: a lazy-pulling additional layer store for Podman (eStargz over FUSE)."""

__version__ = "0.1.0"

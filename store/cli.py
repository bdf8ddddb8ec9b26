"""The `layerstore` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import structlog

from store import __version__
from store import config as config_mod
from store import log as logsetup
from store.config import DEFAULT_ROOT
from store.errors import ConfigError, LayerstoreError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

DESCRIPTION = """\
layerstore serves eStargz image layers lazily to Podman, Buildah and CRI-O as a
containers/storage additional layer store: containers start before their layers are
downloaded; file contents are fetched on demand with HTTP Range requests and verified
against the layer's TOC digest before they are served.
"""

SERVE_EPILOG = """\
Point containers/storage at the mount point (note the ":ref" suffix):

  # storage.conf
  [storage.options]
  additionallayerstores = ["/var/lib/layerstore/store:ref"]

Start the store before Podman uses that storage.conf, and keep it running while containers
use its layers. SIGINT or SIGTERM unmounts cleanly; a mount left by a crashed run is cleared
on start.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerstore",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"layerstore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="mount the store and serve layers until stopped",
        description="Mount the additional layer store and serve layers until SIGINT/SIGTERM.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "mountpoint",
        nargs="?",
        type=Path,
        metavar="MOUNTPOINT",
        help="where to mount (default: ROOT/store)",
    )
    serve.add_argument(
        "--root",
        type=Path,
        default=DEFAULT_ROOT,
        help=f"state and cache directory (default: {DEFAULT_ROOT})",
    )
    serve.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML configuration file (default: built-in defaults)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=logsetup.LEVELS,
        help="log verbosity (default: info); logs are JSON lines on stderr",
    )
    return parser


def _serve(args: argparse.Namespace) -> int:
    # Imported here so `layerstore --help` works even where libfuse is missing.
    from store.chunkcache import ChunkCache
    from store.fuse.mount import serve
    from store.fuse.ops import Operations
    from store.registry.client import RegistryClient
    from store.resolver import Resolver

    log = structlog.get_logger("store.cli")
    cfg = config_mod.load(args.config)
    root: Path = args.root.resolve()
    mountpoint: Path = (args.mountpoint or root / "store").absolute()
    if ":" in str(mountpoint):
        raise ConfigError("the mount point path must not contain ':' (storage.conf splits on it)")
    if not os.path.exists("/dev/fuse"):
        raise ConfigError("/dev/fuse is missing: install fuse3 and load the fuse module")
    root.mkdir(parents=True, exist_ok=True)
    client = RegistryClient(
        plain_http_hosts=cfg.registry.plain_http,
        insecure_hosts=cfg.registry.insecure,
        connect_timeout=cfg.registry.connect_timeout,
        read_timeout=cfg.registry.read_timeout,
        deadline=cfg.registry.deadline,
        pool_size=max(4, cfg.fetch.max_concurrency * 2),
    )
    resolver = Resolver(
        client,
        cache=ChunkCache(cfg.cache.memory_mb << 20),
        blob_dir=root / "blobs",
        manifest_ttl=cfg.resolve.manifest_ttl,
    )
    ops = Operations(resolver, io_threads=cfg.fetch.max_concurrency * 2)
    log.info("store.starting", version=__version__, root=str(root), mountpoint=str(mountpoint))

    def stop() -> None:
        resolver.close()
        client.close()

    serve(ops, mountpoint, on_stop=stop)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    logsetup.setup(getattr(args, "log_level", "info"))
    try:
        if args.command == "serve":
            return _serve(args)
    except ConfigError as exc:
        print(f"layerstore: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (LayerstoreError, OSError, RuntimeError) as exc:
        print(f"layerstore: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    parser.print_help()
    return EXIT_USAGE

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
layerstore serves eStargz and zstd:chunked image layers lazily to Podman, Buildah and CRI-O as a
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
    _add_convert_parser(sub)
    return parser


def _registry_sources(rcfg: config_mod.RegistryConfig) -> dict[str, object]:
    """Credentials and registries.conf, found where Podman finds them unless configured."""
    from store.registry import registries_conf
    from store.registry.credentials import AuthFileCredentials, AuthPath

    creds = (
        AuthFileCredentials([AuthPath(Path(rcfg.auth_file))])
        if rcfg.auth_file
        else AuthFileCredentials()
    )
    conf = Path(rcfg.registries_conf) if rcfg.registries_conf else None
    try:
        registries = registries_conf.load(conf=conf)
    except ConfigError as exc:
        if conf is not None:
            raise
        # Found, not configured: serve without it (Podman reports the broken file itself).
        structlog.get_logger("store.cli").warning("store.registries_conf_invalid", cause=str(exc))
        registries = registries_conf.RegistriesConf()
    structlog.get_logger("store.cli").info(
        "store.registry_sources",
        auth_files=[str(p.path) for p in creds.paths],
        registries_conf=list(registries.sources),
    )
    return {"credentials": creds, "registries": registries}


def _serve(args: argparse.Namespace) -> int:
    # Imported here so `layerstore --help` works even where libfuse is missing.
    from store.cache import DiskChunkCache, StateDB, TailCache
    from store.chunkcache import ChunkCache
    from store.fuse.mount import serve
    from store.fuse.ops import Operations
    from store.prefetch import Prefetcher
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
        max_attempts=max(1, cfg.registry.max_attempts),
        pool_size=max(4, cfg.fetch.max_concurrency * 2),
        **_registry_sources(cfg.registry),
    )
    state = StateDB(root / "state.db")
    disk = DiskChunkCache(
        root / "cache", cfg.cache.disk_mb << 20, write_behind_bytes=cfg.cache.write_behind_mb << 20
    )
    prefetcher = Prefetcher(
        prefetch=cfg.prefetch.enabled,
        background=cfg.prefetch.background,
        concurrency=cfg.prefetch.background_concurrency,
        bandwidth_mbps=cfg.prefetch.background_mbps,
    )
    resolver = Resolver(
        client,
        cache=ChunkCache(cfg.cache.memory_mb << 20),
        blob_dir=root / "blobs",
        manifest_ttl=cfg.resolve.manifest_ttl,
        state=state,
        disk=disk,
        prefetcher=prefetcher,
        tails=TailCache(root / "tocs"),
    )
    ops = Operations(resolver, io_threads=cfg.fetch.max_concurrency * 2)
    log.info("store.starting", version=__version__, root=str(root), mountpoint=str(mountpoint))

    def stop() -> None:
        prefetcher.close()  # before the layers close: workers may still be reading them
        resolver.close()
        # Writes the chunks still queued for the disk cache; within the systemd unit's
        # TimeoutStopSec (what is left is only refetched later).
        disk.close(timeout=20)
        client.close()
        state.close()

    serve(ops, mountpoint, on_stop=stop)
    return EXIT_OK


# --- convert (issue 3) ---------------------------------------------------------------------------

CONVERT_EPILOG = """\
SRC and DST are registry references (registry/repo:tag or @digest) or OCI image layouts on
disk (oci:DIR or oci:DIR:TAG). Layers are rewritten as eStargz with the toc.digest and
uncompressed-size annotations Podman's additional layer store needs; layers that already are
eStargz are kept. Nothing is tagged in DST unless every layer converted and every blob was
pushed. Loopback registries are plain HTTP; others use the [registry] settings of --config.
"""


def _add_convert_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    conv = sub.add_parser(
        "convert",
        help="convert an image to eStargz (registry or oci: layout, both ways)",
        description="Convert SRC into an eStargz image that lazy-pulls and store it as DST.",
        epilog=CONVERT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conv.add_argument("src", metavar="SRC", help="source image (registry ref or oci:DIR[:TAG])")
    conv.add_argument("dst", metavar="DST", help="destination (registry ref or oci:DIR[:TAG])")
    conv.add_argument(
        "--chunk-size", type=int, default=4 << 20, help="eStargz chunk size (default: 4 MiB)"
    )
    conv.add_argument(
        "--compression-level", type=int, default=9, help="gzip level 0-9 (default: 9)"
    )
    conv.add_argument(
        "--prioritize",
        type=Path,
        metavar="FILE",
        help="paths (one a line, in the order a workload reads them) to place first",
    )
    group = conv.add_mutually_exclusive_group()
    group.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="platform of an index")
    group.add_argument(
        "--all-platforms", action="store_true", help="convert every platform of an index"
    )
    conv.add_argument("--config", type=Path, default=None, help="TOML configuration file")
    conv.add_argument(
        "--plain-http", action="append", default=[], metavar="HOST",
        help="talk plain HTTP to HOST (repeatable; loopback always is)",
    )
    conv.add_argument(
        "--insecure", action="append", default=[], metavar="HOST",
        help="HTTPS without certificate checks for HOST (repeatable)",
    )
    conv.add_argument(
        "--log-level", default="error", choices=logsetup.LEVELS,
        help="log verbosity (default: error); logs are JSON lines on stderr",
    )


def _convert(args: argparse.Namespace) -> int:
    from store import convert as conv
    from store.ocilayout import LayoutRef, is_layout_ref
    from store.progress import Progress
    from store.reference import Reference
    from store.registry.client import RegistryClient
    from store.registry.push import Pusher

    cfg = config_mod.load(args.config)
    try:
        options = conv.ConvertOptions(
            chunk_size=args.chunk_size,
            compression_level=args.compression_level,
            prioritized=conv.read_prioritized(args.prioritize) if args.prioritize else (),
            platform=conv.parse_platform(args.platform) if args.platform else None,
            all_platforms=args.all_platforms,
        )
        if options.chunk_size <= 0 or not 0 <= options.compression_level <= 9:
            raise ValueError("--chunk-size must be positive and --compression-level 0..9")
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc)) from None
    client = RegistryClient(
        plain_http_hosts=(*cfg.registry.plain_http, *args.plain_http),
        insecure_hosts=(*cfg.registry.insecure, *args.insecure),
        connect_timeout=cfg.registry.connect_timeout,
        read_timeout=cfg.registry.read_timeout,
        # a whole layer moves in one call here, not a chunk: allow for big blobs
        deadline=max(cfg.registry.deadline, 1800.0),
        **_registry_sources(cfg.registry),  # the store's credentials and registries.conf
    )
    try:
        source: conv.Source
        if is_layout_ref(args.src):
            source = conv.LayoutSource(LayoutRef.parse(args.src))
        else:
            source = conv.RegistrySource(client, Reference.parse(args.src))
        target: conv.Target
        if is_layout_ref(args.dst):
            target = conv.LayoutTarget(LayoutRef.parse(args.dst))
        else:
            dst = Reference.parse(args.dst)
            if dst.digest:
                raise ConfigError("DST must name a tag, not a digest")
            target = conv.RegistryTarget(Pusher(client), dst, source)
        result = conv.convert(source, target, options, progress=Progress(sys.stderr))
    except LayerstoreError as exc:
        if isinstance(exc, ConfigError):
            raise
        # one line, whatever the exception text holds
        print(f"layerstore: convert: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        client.close()
    print(result.summary())
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
        if args.command == "convert":
            return _convert(args)
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

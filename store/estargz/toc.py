"""The parsed, normalised eStargz TOC (``stargz.index.json``) and its filesystem tree.

Field rules follow estargz-format.md §3.3, the reader algorithm §3.5. Everything that
does not fit raises TocError; nothing here does I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from array import array
from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any
from weakref import WeakValueDictionary

from store.digest import is_digest
from store.errors import TocError

__all__ = [
    "Chunk",
    "TocEntry",
    "Node",
    "Toc",
    "parse_toc_json",
    "build_toc",
    "normalize_name",
    "ROOT_ID",
    "TOC_NAME",
    "PREFETCH_LANDMARK",
    "NO_PREFETCH_LANDMARK",
    "LANDMARK_CONTENT",
    "ENTRY_TYPES",
    "EntryDecoder",
]

TOC_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENT = b"\x0f"  # §7: one byte 0x0F
ROOT_ID = 0
ENTRY_TYPES = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo"})

_INT64_MAX = (1 << 63) - 1
_UINT32_MAX = (1 << 32) - 1
_GO_ZERO_TIME = "0001-01-01T00:00:00Z"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NO_CHILDREN: Mapping[str, int] = MappingProxyType({})


class _ReadOnlyDict(dict[str, bytes]):
    """The shared empty xattrs of parsed entries: saves a dict per entry, refuses writes."""

    __slots__ = ()

    def _readonly(self, *args: object, **kwargs: object) -> None:
        raise TypeError("parsed TOC xattrs are read-only")

    __setitem__ = __delitem__ = __ior__ = _readonly  # type: ignore[assignment]
    update = setdefault = pop = popitem = clear = _readonly  # type: ignore[assignment]


_NO_XATTRS: dict[str, bytes] = _ReadOnlyDict()


@dataclass(slots=True)
class Chunk:
    """One verifiable piece of a regular file (a ``reg`` or ``chunk`` TOC entry)."""

    file_offset: int  # chunkOffset: where the chunk starts inside the file
    size: int  # uncompressed size, resolved (§3.5 steps 2-3); > 0
    blob_offset: int  # start of the gzip member holding the chunk
    blob_end: int  # upper bound of compressed bytes to fetch ("nextOffset", §3.5 step 7)
    inner_offset: int  # uncompressed bytes to skip after blob_offset (§3.6)
    digest: str | None  # chunkDigest, or the file digest for an un-chunked file (§6.3)


@dataclass(slots=True)
class TocEntry:
    """One non-chunk TOC entry with defaults applied (§3.3: every field is omitempty)."""

    name: str  # normalised path, '' is the root
    type: str  # one of ENTRY_TYPES
    size: int = 0
    mode: int = 0  # permission bits incl. setuid/setgid/sticky only (& 0o7777)
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    link_name: str = ""  # symlink: target verbatim; hardlink: normalised target path
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    digest: str | None = None
    chunks: list[Chunk] = field(default_factory=list)
    user_name: str = ""
    group_name: str = ""


@dataclass(slots=True, eq=False, weakref_slot=True)
class Node:
    """A filesystem object. Hardlinked names share one node (and its entry)."""

    id: int
    entry: TocEntry
    parent: int  # for directories the containing directory; the root is its own parent
    children: dict[str, int] | None  # name -> node id, in TOC order; None unless a directory
    nlink: int


def normalize_name(name: str) -> str:
    """Normalise a TOC/tar path: './x', '/x', 'a//x' -> 'x'; root -> ''.

    Unlike the reference reader, which clamps '../x' to 'x' (§3.3), a '..' that would leave
    the root is rejected: such a name never comes from a sane tar.
    """
    if "\x00" in name:
        raise TocError(f"NUL byte in name {name!r}")
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise TocError(f"name escapes the root: {name!r}")
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


class Toc:
    """Entries in TOC order plus the directory tree built from them (§3.5).

    The tree is held as parallel per-node columns (entry, parent, link count) and one
    children dict per directory, not as a Node object per file: a 100,000-file layer stays
    small. node() builds a Node view on demand.
    """

    __slots__ = (
        "entries", "toc_offset", "landmark", "prefetch_end", "fully_verifiable", "_tree", "_views"
    )

    def __init__(
        self,
        entries: list[TocEntry],
        tree: _Tree,
        *,
        toc_offset: int,
        landmark: str | None,
        prefetch_end: int | None,
        fully_verifiable: bool,
    ) -> None:
        self.entries = entries
        self.toc_offset = toc_offset
        self.landmark = landmark  # 'prefetch', 'no-prefetch' or None (§7)
        self.prefetch_end = prefetch_end  # blob offset of .prefetch.landmark, if it governs
        self.fully_verifiable = fully_verifiable  # every data chunk has a digest (§6.5)
        self._tree = tree
        # Node views alive somewhere: node(i) is node(j) holds for hardlinked names.
        self._views: WeakValueDictionary[int, Node] = WeakValueDictionary()

    @classmethod
    def parse(cls, data: bytes, *, toc_offset: int) -> Toc:
        return parse_toc_json(data, toc_offset=toc_offset)

    def __len__(self) -> int:
        """Number of non-chunk TOC entries (including ones a later entry replaced)."""
        return len(self.entries)

    @property
    def node_count(self) -> int:
        return len(self._tree.entries)

    def node(self, node_id: int) -> Node:
        """A read-only view of one node, built on demand (the same object while it lives)."""
        tree = self._tree
        if not 0 <= node_id < len(tree.entries):
            raise KeyError(node_id)
        view = self._views.get(node_id)
        if view is None:
            view = self._views[node_id] = Node(
                node_id,
                tree.entries[node_id],
                tree.parents[node_id],
                tree.children.get(node_id),
                tree.nlinks[node_id],
            )
        return view

    def entry(self, node_id: int) -> TocEntry:
        """node(node_id).entry without building the Node."""
        if node_id < 0:
            raise KeyError(node_id)
        try:
            return self._tree.entries[node_id]
        except IndexError:
            raise KeyError(node_id) from None

    def nlink(self, node_id: int) -> int:
        self.entry(node_id)  # bounds check
        return self._tree.nlinks[node_id]

    def is_dir(self, node_id: int) -> bool:
        return node_id in self._tree.children

    def children(self, node_id: int) -> Mapping[str, int]:
        """Name -> node id of a directory, in TOC order; empty for non-directories."""
        self.entry(node_id)  # bounds check
        return self._tree.children.get(node_id, _NO_CHILDREN)

    def lookup(self, path: str) -> int | None:
        """Node id for *path* ('' or '/' is the root), or None if it does not exist."""
        dirs = self._tree.children
        node_id = ROOT_ID
        for part in path.split("/"):
            if part in ("", "."):
                continue
            children = dirs.get(node_id)
            if children is None or part == "..":
                return None
            child = children.get(part)
            if child is None:
                return None
            node_id = child
        return node_id

    def chunk_index_for(self, node_or_entry: Node | TocEntry, file_offset: int) -> int:
        """Index of the chunk containing *file_offset*; IndexError outside ``[0, size)``."""
        entry = _entry_of(node_or_entry)
        if entry.type != "reg" or not 0 <= file_offset < entry.size:
            raise IndexError(f"offset {file_offset} outside {entry.name!r} (size {entry.size})")
        return bisect_right(entry.chunks, file_offset, key=_chunk_start) - 1

    def chunk_range(self, node_or_entry: Node | TocEntry, offset: int, length: int) -> range:
        """Indexes of the chunks overlapping ``[offset, offset+length)``, clamped to the file."""
        entry = _entry_of(node_or_entry)
        end = min(offset + length, entry.size)
        if entry.type != "reg" or length <= 0 or offset < 0 or offset >= end:
            return range(0)
        first = self.chunk_index_for(entry, offset)
        last = self.chunk_index_for(entry, end - 1)
        return range(first, last + 1)


def _entry_of(node_or_entry: Node | TocEntry) -> TocEntry:
    return node_or_entry.entry if isinstance(node_or_entry, Node) else node_or_entry


def _chunk_start(chunk: Chunk) -> int:
    return chunk.file_offset


# ---------------------------------------------------------------------------- parsing


def parse_toc_json(data: bytes, *, toc_offset: int) -> Toc:
    """Parse TOC JSON bytes (already digest-checked by the caller) into a Toc.

    *toc_offset* is the blob offset of the TOC member: it bounds the last data chunk
    (``blob_end``) and every data offset must lie below it.
    """
    parser = _Parser(toc_offset)
    try:
        version = _stream_doc(data, parser)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise TocError(f"TOC is not valid JSON: {exc}") from None
    if type(version) is not int or version != 1:
        raise TocError(f"unsupported TOC version {version!r}")
    return parser.finish()


_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _stream_doc(data: bytes, parser: _Parser) -> object:
    """Decode the top-level TOC object, handing each entry to *parser* as soon as it is
    decoded; returns the 'version' value.

    json.loads would build every entry dict before the first is looked at: for 100,000
    entries that peak is ~100 MB of short-lived dicts interleaved with the long-lived
    objects, and the heap stays fragmented (resident) after they are freed.
    """
    text = data.decode(json.detect_encoding(data), "surrogatepass")
    ws, decode = _WS.match, _DECODER.raw_decode
    i = ws(text).end()
    if text[i : i + 1] != "{":
        if text[i : i + 1] in ("[", '"') or text[i : i + 1].isdigit():
            decode(text, i)  # valid JSON that is not an object, or a JSON error
            raise TocError("TOC JSON is not an object")
        raise ValueError(f"expected an object at {i}")
    version: object = None
    seen_entries = False
    i = ws(text, i + 1).end()
    if text[i : i + 1] == "}":
        i += 1
    else:
        while True:
            if text[i : i + 1] != '"':
                raise ValueError(f"expected a key at {i}")
            key, i = json.decoder.scanstring(text, i + 1)
            i = ws(text, i).end()
            if text[i : i + 1] != ":":
                raise ValueError(f"expected ':' at {i}")
            i = ws(text, i + 1).end()
            if key == "entries":
                if seen_entries:
                    raise TocError("TOC has two 'entries' keys")
                seen_entries = True
                i = _stream_entries(text, i, parser)
            else:
                value, i = decode(text, i)
                if key == "version":
                    version = value
            i = ws(text, i).end()
            sep = text[i : i + 1]
            i = ws(text, i + 1).end()
            if sep == "}":
                break
            if sep != ",":
                raise ValueError(f"expected ',' or '}}' at {i}")
    if ws(text, i).end() != len(text):
        raise ValueError(f"extra data at {i}")
    return version


def _stream_entries(text: str, i: int, parser: _Parser) -> int:
    ws, decode = _WS.match, _DECODER.raw_decode
    if text.startswith("null", i):
        return i + 4
    if text[i : i + 1] != "[":
        decode(text, i)  # a JSON error, or valid JSON of the wrong type
        raise TocError("TOC 'entries' is not a list")
    i = ws(text, i + 1).end()
    if text[i : i + 1] == "]":
        return i + 1
    index = 0
    while True:
        raw, i = decode(text, i)
        try:
            parser.add(raw)
        except TocError as exc:
            raise TocError(f"TOC entry {index}: {exc}") from None
        del raw
        index += 1
        i = ws(text, i).end()
        sep = text[i : i + 1]
        i = ws(text, i + 1).end()
        if sep == "]":
            return i
        if sep != ",":
            raise ValueError(f"expected ',' or ']' at {i}")


def build_toc(entries: list[TocEntry], *, toc_offset: int) -> Toc:
    """A Toc from entries another format's parser made (zstd:chunked, store.zstdchunked).

    Same tree, replacement, link-count and landmark rules as parse_toc_json (§3.5 steps 5-6,
    §7); the caller has resolved and checked every entry's chunks already.
    """
    tree = _TreeBuilder()
    for index, entry in enumerate(entries):
        try:
            tree.add(entry)
        except TocError as exc:
            raise TocError(f"TOC entry {index}: {exc}") from None
    nodes = tree.finish()
    landmark, prefetch_end = _landmark(nodes)
    verifiable = all(c.digest is not None for e in entries for c in e.chunks)
    return Toc(
        entries,
        nodes,
        toc_offset=toc_offset,
        landmark=landmark,
        prefetch_end=prefetch_end,
        fully_verifiable=verifiable,
    )


class EntryDecoder:
    """Decodes TOC entry objects into TocEntry values.

    Shared by the eStargz and zstd:chunked TOCs, whose entries have the same fields. Keeps
    what writers de-duplicate (§3.3: userName/groupName given once per id) and makes one
    object per distinct mode/uid/gid and timestamp, which a 100,000-entry layer repeats.
    """

    def __init__(self, parse_mtime: Callable[[str], int] | None = None) -> None:
        self._parse_mtime = parse_mtime or _parse_modtime
        self.user_names: dict[int, str] = {}
        self.group_names: dict[int, str] = {}
        self.mtimes: dict[str, int] = {}
        self.ints: dict[int, int] = {}

    def entry(self, raw: dict[str, Any], etype: str) -> TocEntry:
        """The TocEntry of one non-chunk entry object (chunk lists are the caller's)."""
        name = normalize_name(json_text(raw, "name"))
        intern = self.ints.setdefault
        uid = intern(v := json_int(raw, "uid", _UINT32_MAX), v)
        gid = intern(v := json_int(raw, "gid", _UINT32_MAX), v)
        # §3.3 userName/groupName are de-duplicated by the writer: remember id -> name.
        user_name = json_str(raw, "userName")
        if user_name:
            self.user_names[uid] = user_name
        else:
            user_name = self.user_names.get(uid, "")
        group_name = json_str(raw, "groupName")
        if group_name:
            self.group_names[gid] = group_name
        else:
            group_name = self.group_names.get(gid, "")
        link_name = json_text(raw, "linkName")
        if etype == "hardlink":
            link_name = normalize_name(link_name)
        if etype in ("symlink", "hardlink") and not link_name:
            raise TocError(f"{etype} {name!r} has no linkName")
        digest = json_str(raw, "digest") or None
        if digest is not None and not is_digest(digest):
            raise TocError(f"invalid digest {digest[:80]!r}")
        return TocEntry(
            name=name,
            type=etype,
            size=json_int(raw, "size") if etype == "reg" else 0,
            mode=intern(v := json_int(raw, "mode") & 0o7777, v),  # §3.3: type comes from 'type'
            uid=uid,
            gid=gid,
            mtime_ns=self.mtime(json_str(raw, "modtime")),
            link_name=link_name,
            dev_major=json_int(raw, "devMajor", _UINT32_MAX),
            dev_minor=json_int(raw, "devMinor", _UINT32_MAX),
            xattrs=json_xattrs(raw.get("xattrs")),
            digest=digest,
            user_name=user_name,
            group_name=group_name,
        )

    def mtime(self, text: str) -> int:
        # Layers repeat a handful of timestamps; parse each distinct string once.
        cached = self.mtimes.get(text)
        if cached is None:
            cached = self.mtimes[text] = self._parse_mtime(text)
        return cached


class _Parser:
    def __init__(self, toc_offset: int) -> None:
        if toc_offset < 0:
            raise TocError(f"negative TOC offset {toc_offset}")
        self.toc_offset = toc_offset
        self.entries: list[TocEntry] = []
        self.data_chunks: list[Chunk] = []  # every data chunk in TOC order, for blob_end
        self.decoder = EntryDecoder()
        self.tree = _TreeBuilder()
        # The reg entry whose chunk list is still open, with its raw chunk specs.
        self.open_reg: TocEntry | None = None
        self.open_specs: list[ChunkSpec] = []
        self.last_type = ""

    def finish(self) -> Toc:
        self.close_reg()
        resolve_blob_ends(self.data_chunks, self.toc_offset)
        nodes = self.tree.finish()
        landmark, prefetch_end = _landmark(nodes)
        verifiable = all(c.digest is not None for c in self.data_chunks)
        return Toc(
            self.entries,
            nodes,
            toc_offset=self.toc_offset,
            landmark=landmark,
            prefetch_end=prefetch_end,
            fully_verifiable=verifiable,
        )

    def add(self, raw: Any) -> None:
        if not isinstance(raw, dict):
            raise TocError("entry is not an object")
        etype = json_str(raw, "type")
        if etype == "chunk":
            # §3.5 step 2: a chunk belongs to the last non-chunk entry; its name is ignored.
            if self.open_reg is None:
                raise TocError(f"'chunk' entry does not follow a 'reg' entry ({self.last_type!r})")
            self.open_specs.append(ChunkSpec.parse(raw))
            return
        if etype not in ENTRY_TYPES:
            raise TocError(f"unknown entry type {etype!r}")
        self.close_reg()
        self.last_type = etype
        entry = self.decoder.entry(raw, etype)
        self.entries.append(entry)
        self.tree.add(entry)
        if etype == "reg":
            self.open_reg = entry
            self.open_specs = [ChunkSpec.parse(raw)]

    def close_reg(self) -> None:
        entry, specs = self.open_reg, self.open_specs
        if entry is None:
            return
        self.open_reg, self.open_specs = None, []
        try:
            entry.chunks = resolve_chunks(entry, specs, self.toc_offset)
        except TocError as exc:
            raise TocError(f"{entry.name!r}: {exc}") from None
        self.data_chunks.extend(entry.chunks)


@dataclass(slots=True)
class ChunkSpec:
    file_offset: int
    size: int  # 0 = "to the next chunk / end of file"
    blob_offset: int
    inner_offset: int
    digest: str | None

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> ChunkSpec:
        digest = json_str(raw, "chunkDigest") or None
        if digest is not None and not is_digest(digest):
            raise TocError(f"invalid chunkDigest {digest[:80]!r}")
        return cls(
            file_offset=json_int(raw, "chunkOffset"),
            size=json_int(raw, "chunkSize"),
            blob_offset=json_int(raw, "offset"),
            inner_offset=json_int(raw, "innerOffset"),
            digest=digest,
        )


def resolve_chunks(entry: TocEntry, specs: list[ChunkSpec], toc_offset: int) -> list[Chunk]:
    """A file's chunks from its TOC records (§3.5 steps 2-3), validated; shared with the
    zstd:chunked TOC, whose records have the same fields."""
    if entry.size == 0:
        if len(specs) > 1:
            raise TocError("empty file has chunk entries")
        return []
    chunks: list[Chunk] = []
    pos = 0
    for i, spec in enumerate(specs):
        if spec.file_offset != pos:
            raise TocError(f"chunk at file offset {spec.file_offset}, expected {pos}")
        size = spec.size
        if size == 0:
            # §3.3 chunkSize: absent on the final partial chunk ("to end of file").
            end = specs[i + 1].file_offset if i + 1 < len(specs) else entry.size
            size = end - spec.file_offset
        if size <= 0:
            raise TocError(f"chunk at file offset {pos} has size {size}")
        if spec.blob_offset == 0 and spec.inner_offset == 0:
            # Member 0 always starts with a tar header, never with a payload (§2.2).
            raise TocError(f"chunk at file offset {pos} has no blob offset")
        if spec.blob_offset >= toc_offset:
            raise TocError(f"chunk blob offset {spec.blob_offset} not below the TOC")
        digest = spec.digest
        if digest is None and len(specs) == 1:
            digest = entry.digest  # §6.3: un-chunked file without chunkDigest
        elif digest is not None and digest == entry.digest:
            digest = entry.digest  # share one string object
        if size == entry.size:
            size = entry.size  # share the int object of an un-chunked file
        chunks.append(Chunk(pos, size, spec.blob_offset, 0, spec.inner_offset, digest))
        pos += size
    if pos != entry.size:
        raise TocError(f"chunks cover {pos} bytes, file size is {entry.size}")
    return chunks[:]  # an exact-size copy: no over-allocated list per file


def resolve_blob_ends(chunks: list[Chunk], toc_offset: int) -> None:
    """Set each data chunk's fetch bound (§3.5 step 7), walking backwards; the TOC bounds the
    last one. Tar headers between members are harmless: decoding stops after the chunk."""
    last = toc_offset
    for chunk in reversed(chunks):
        if last <= chunk.blob_offset:
            raise TocError(
                f"data offsets not increasing: member at {chunk.blob_offset} is followed by {last}"
            )
        chunk.blob_end = last
        if chunk.inner_offset == 0:
            last = chunk.blob_offset


def _landmark(tree: _Tree) -> tuple[str | None, int | None]:
    root_children = tree.children[ROOT_ID]
    if NO_PREFETCH_LANDMARK in root_children:
        return "no-prefetch", None
    node_id = root_children.get(PREFETCH_LANDMARK)
    if node_id is None:
        return None, None
    chunks = tree.entries[node_id].chunks
    return "prefetch", (chunks[0].blob_offset if chunks else None)


# ---------------------------------------------------------------------------- tree


@dataclass(slots=True)
class _Tree:
    """The node table as columns indexed by node id."""

    entries: list[TocEntry]
    parents: array[int]  # for directories the containing one; the root is its own parent
    nlinks: array[int]
    children: dict[int, dict[str, int]]  # directory id -> name -> node id, in TOC order


class _TreeBuilder:
    """Builds the node table; §3.5 steps 5-6 (implicit parents, replacement, link counts)."""

    def __init__(self) -> None:
        root = TocEntry(name="", type="dir", mode=0o755)
        self.tree = _Tree([root], array("q", [ROOT_ID]), array("q", [0]), {ROOT_ID: {}})
        self.dead: set[int] = set()  # ids of nodes that lost their last name

    def _new(self, entry: TocEntry, parent: int, is_dir: bool) -> int:
        tree = self.tree
        node_id = len(tree.entries)
        tree.entries.append(entry)
        tree.parents.append(parent)
        tree.nlinks.append(0 if is_dir else 1)
        if is_dir:
            tree.children[node_id] = {}
        return node_id

    def add(self, entry: TocEntry) -> None:
        tree = self.tree
        if entry.name == "":
            # './' or '/': metadata for the root itself, never a child of itself.
            if entry.type != "dir":
                raise TocError(f"root entry has type {entry.type!r}")
            tree.entries[ROOT_ID] = entry
            return
        parent_path, _, base = entry.name.rpartition("/")
        parent = self.ensure_dir(parent_path)
        siblings = tree.children[parent]
        old_id = siblings.get(base)
        if entry.type == "hardlink":
            target_id = self.lookup(entry.link_name)
            if target_id is None:
                raise TocError(f"hardlink {entry.name!r} to missing {entry.link_name!r}")
            if target_id in tree.children:
                raise TocError(f"hardlink {entry.name!r} to directory {entry.link_name!r}")
            if old_id == target_id:
                return
            if old_id is not None:
                self.unlink(old_id)
            siblings[base] = target_id
            tree.nlinks[target_id] += 1
            return
        is_dir = entry.type == "dir"
        if old_id is not None:
            if is_dir and old_id in tree.children:
                tree.entries[old_id] = entry  # a dir entry listed after its children keeps them
                return
            self.unlink(old_id)
        siblings[base] = self._new(entry, parent, is_dir)  # replacing keeps the name's position

    def ensure_dir(self, path: str) -> int:
        node_id = ROOT_ID
        if not path:
            return node_id
        dirs = self.tree.children
        parts = path.split("/")
        for depth, part in enumerate(parts):
            children = dirs[node_id]
            child_id = children.get(part)
            if child_id is None:
                synthetic = TocEntry(name="/".join(parts[: depth + 1]), type="dir", mode=0o755)
                child_id = children[part] = self._new(synthetic, node_id, True)
            elif child_id not in dirs:
                raise TocError(f"parent {'/'.join(parts[: depth + 1])!r} is not a directory")
            node_id = child_id
        return node_id

    def lookup(self, path: str) -> int | None:
        dirs = self.tree.children
        node_id = ROOT_ID
        for part in path.split("/") if path else ():
            children = dirs.get(node_id)
            if children is None:
                return None
            child_id = children.get(part)
            if child_id is None:
                return None
            node_id = child_id
        return node_id

    def unlink(self, node_id: int) -> None:
        tree = self.tree
        children = tree.children.get(node_id)
        if children:
            raise TocError(f"{tree.entries[node_id].name!r} replaces a non-empty directory")
        if children is None:
            tree.nlinks[node_id] -= 1  # other hardlinked names keep the node alive
            if tree.nlinks[node_id] > 0:
                return
        self.dead.add(node_id)

    def finish(self) -> _Tree:
        if self.dead:
            self._compact()
        tree = self.tree
        dirs = tree.children
        for node_id, children in dirs.items():
            # §3.5 step 6: self + parent, +1 for each subdirectory's '..'.
            tree.nlinks[node_id] = 2 + sum(1 for c in children.values() if c in dirs)
        return tree

    def _compact(self) -> None:
        # Replaced nodes leave holes; renumber so ids stay dense (0..n-1) and stable.
        old = self.tree
        alive = [i for i in range(len(old.entries)) if i not in self.dead]
        new_id = {old_id: i for i, old_id in enumerate(alive)}
        self.tree = _Tree(
            [old.entries[i] for i in alive],
            array("q", (new_id.get(old.parents[i], ROOT_ID) for i in alive)),
            array("q", (old.nlinks[i] for i in alive)),
            {
                new_id[d]: {k: new_id[v] for k, v in children.items()}
                for d, children in old.children.items()
                if d in new_id
            },
        )
        self.dead = set()


# ---------------------------------------------------------------------------- fields
# TOC JSON field readers (omitempty defaults, strict types); the zstd:chunked TOC uses them too.


def json_int(raw: dict[str, Any], key: str, maximum: int = _INT64_MAX) -> int:
    value = raw.get(key)
    if value is None:  # omitempty (§3.2)
        return 0
    # bool is an int subclass in Python; JSON true is not a number.
    if type(value) is not int:
        raise TocError(f"{key!r} is not an integer: {value!r:.80}")
    if not 0 <= value <= maximum:
        raise TocError(f"{key!r} out of range: {value}")
    return value


def json_str(raw: dict[str, Any], key: str) -> str:
    value = raw.get(key)
    if value is None:
        return ""
    if type(value) is not str:
        raise TocError(f"{key!r} is not a string: {value!r:.80}")
    return value


def json_text(raw: dict[str, Any], key: str) -> str:
    """A string that must map to real path bytes (no lone surrogates from JSON escapes)."""
    value = json_str(raw, key)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise TocError(f"{key!r} is not valid Unicode: {value!r:.80}") from None
    return value


def json_xattrs(value: Any) -> dict[str, bytes]:
    if value is None or value == {}:
        return _NO_XATTRS
    if not isinstance(value, dict):
        raise TocError("'xattrs' is not an object")
    out: dict[str, bytes] = {}
    for key, encoded in value.items():
        if not key or type(encoded) is not str:
            raise TocError(f"bad xattr {key!r:.80}")
        try:
            key.encode("utf-8")
            # §3.3: standard base64 with padding (Go marshals []byte that way).
            out[key] = base64.b64decode(encoded, validate=True)
        except UnicodeEncodeError:
            raise TocError(f"xattr name {key!r:.80} is not valid Unicode") from None
        except (binascii.Error, ValueError):
            raise TocError(f"xattr {key!r:.80} is not base64") from None
    return out


def _parse_modtime(text: str) -> int:
    """RFC 3339 -> ns since the epoch; absent or invalid -> 0 (§3.5 step 4)."""
    if not text or text == _GO_ZERO_TIME:
        return 0
    try:
        when = datetime.fromisoformat(text)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        delta = when - _EPOCH
    except (ValueError, OverflowError):
        return 0
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000

"""The restore-mode manifest: which names, types, modes, owners, sizes and times SPFS shows.

JSON format (version 1)::

    {"version": 1,
     "root": {"mode": 493, "uid": 0, "gid": 0},            # optional
     "entries": [
        {"path": "dir", "type": "dir", "mode": 493},
        {"path": "dir/data.bin", "type": "file", "mode": 420, "uid": 1000, "gid": 1000,
         "size": 4096, "mtime_ns": 1700000000000000000,
         "content_source": "/var/lib/criu-spfs/data.bin"},
        {"path": "dir/link", "type": "symlink", "target": "data.bin"},
        {"path": "dir/pipe", "type": "fifo", "mode": 420},
        {"path": "dir/sock", "type": "socket", "mode": 493}]}

Paths are relative to the mount root. Parent directories that are not listed are created as
root-owned 0755 directories. Validation is strict: anything unexpected is an error, so a
hostile or broken manifest never gets mounted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

MANIFEST_VERSION = 1
MAX_ENTRIES = 1_000_000
MAX_MANIFEST_BYTES = 512 * 1024 * 1024
# 16 TiB: far beyond any file CRIU would need, far below what overflows off_t arithmetic.
MAX_FILE_SIZE = 1 << 44
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4095
MAX_ID = 2**32 - 2

ENTRY_TYPES: dict[str, int] = {
    "dir": stat.S_IFDIR,
    "file": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "fifo": stat.S_IFIFO,
    "socket": stat.S_IFSOCK,
}
_DEFAULT_MODES = {"dir": 0o755, "file": 0o644, "symlink": 0o777, "fifo": 0o644, "socket": 0o755}
_ENTRY_KEYS = {"path", "type", "mode", "uid", "gid", "size", "atime_ns", "mtime_ns", "ctime_ns",
               "target", "content_source"}
_ROOT_KEYS = {"mode", "uid", "gid", "atime_ns", "mtime_ns", "ctime_ns"}


class ManifestError(ValueError):
    """The manifest is malformed or hostile; the message says which entry and why."""


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    path: str                 # relative, normalised, e.g. "dir/file"
    type: str                 # one of ENTRY_TYPES
    mode: int                 # permission bits only (<= 0o7777)
    uid: int = 0
    gid: int = 0
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    target: str | None = None          # symlink target
    content_source: str | None = None  # absolute path of a file whose bytes are served

    @property
    def file_type(self) -> int:
        return ENTRY_TYPES[self.type]

    @property
    def components(self) -> tuple[bytes, ...]:
        return tuple(os.fsencode(self.path).split(b"/"))

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class RootAttributes:
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0


@dataclasses.dataclass(frozen=True)
class Manifest:
    entries: tuple[ManifestEntry, ...]
    root: RootAttributes = RootAttributes()

    def to_json(self) -> dict[str, Any]:
        return {"version": MANIFEST_VERSION, "root": dataclasses.asdict(self.root),
                "entries": [e.to_json() for e in self.entries]}


def _int_field(raw: dict[str, Any], key: str, default: int, low: int, high: int, where: str) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(f"{where}: {key} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ManifestError(f"{where}: {key}={value} is out of range [{low}, {high}]")
    return value


def validate_relative_path(path: Any, where: str) -> str:
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{where}: path must be a non-empty string")
    encoded = os.fsencode(path)
    if b"\0" in encoded:
        raise ManifestError(f"{where}: path contains a NUL byte")
    if path.startswith("/"):
        raise ManifestError(f"{where}: absolute path {path!r} (paths are relative to the mount)")
    if len(encoded) > MAX_PATH_BYTES:
        raise ManifestError(f"{where}: path longer than {MAX_PATH_BYTES} bytes")
    for part in encoded.split(b"/"):
        if part in (b"", b".", b".."):
            raise ManifestError(f"{where}: path {path!r} has an empty, '.' or '..' component")
        if len(part) > MAX_NAME_BYTES:
            raise ManifestError(f"{where}: a component of {path!r} is longer than "
                                f"{MAX_NAME_BYTES} bytes")
    return path


def _times(raw: dict[str, Any], where: str, now_ns: int) -> dict[str, int]:
    return {key: _int_field(raw, key, now_ns, 0, 2**63 - 1, where)
            for key in ("atime_ns", "mtime_ns", "ctime_ns")}


def parse_entry(raw: Any, index: int, now_ns: int, check_sources: bool = True) -> ManifestEntry:
    where = f"entry {index}"
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: must be an object")
    unknown = set(raw) - _ENTRY_KEYS
    if unknown:
        raise ManifestError(f"{where}: unknown keys {sorted(unknown)}")
    path = validate_relative_path(raw.get("path"), where)
    where = f"entry {index} ({path!r})"
    kind = raw.get("type")
    if kind not in ENTRY_TYPES:
        raise ManifestError(f"{where}: type must be one of {sorted(ENTRY_TYPES)}, got {kind!r}")
    mode = _int_field(raw, "mode", _DEFAULT_MODES[kind], 0, 0o7777, where)
    uid = _int_field(raw, "uid", 0, 0, MAX_ID, where)
    gid = _int_field(raw, "gid", 0, 0, MAX_ID, where)
    size = _int_field(raw, "size", 0, 0, MAX_FILE_SIZE, where)
    if size and kind != "file":
        raise ManifestError(f"{where}: only files have a size")
    target = raw.get("target")
    if kind == "symlink":
        if not isinstance(target, str) or not target or "\0" in target \
                or len(os.fsencode(target)) > MAX_PATH_BYTES:
            raise ManifestError(f"{where}: a symlink needs a non-empty target without NUL "
                                f"bytes, at most {MAX_PATH_BYTES} bytes")
    elif target is not None:
        raise ManifestError(f"{where}: only symlinks have a target")
    source = raw.get("content_source")
    if source is not None:
        if kind != "file":
            raise ManifestError(f"{where}: only files have a content_source")
        if not isinstance(source, str) or not source.startswith("/") or "\0" in source:
            raise ManifestError(f"{where}: content_source must be an absolute path")
        if check_sources:
            try:
                st = os.stat(source)
            except OSError as exc:
                raise ManifestError(f"{where}: content_source {source!r}: {exc.strerror}") from None
            if not stat.S_ISREG(st.st_mode):
                raise ManifestError(f"{where}: content_source {source!r} is not a regular file")
    return ManifestEntry(path=path, type=kind, mode=mode, uid=uid, gid=gid, size=size,
                         target=target, content_source=source, **_times(raw, where, now_ns))


def parse_entries(raw_entries: Any, check_sources: bool = True) -> tuple[ManifestEntry, ...]:
    """Validate a list of entries on its own: types, ranges, duplicates, parents."""
    if not isinstance(raw_entries, list):
        raise ManifestError("entries must be a list")
    if len(raw_entries) > MAX_ENTRIES:
        raise ManifestError(f"too many entries ({len(raw_entries)} > {MAX_ENTRIES})")
    now_ns = time.time_ns()
    entries = tuple(parse_entry(raw, i, now_ns, check_sources) for i, raw in enumerate(raw_entries))
    by_path: dict[str, ManifestEntry] = {}
    for entry in entries:
        if entry.path in by_path:
            raise ManifestError(f"duplicate entry for path {entry.path!r}")
        by_path[entry.path] = entry
    for entry in entries:
        parent = entry.path.rpartition("/")[0]
        while parent:
            declared = by_path.get(parent)
            if declared is not None and declared.type != "dir":
                raise ManifestError(f"entry {entry.path!r} is below {parent!r}, "
                                    f"which is a {declared.type}, not a dir")
            parent = parent.rpartition("/")[0]
    # Parents first, so a loader can create entries in order.
    return tuple(sorted(entries, key=lambda e: (e.path.count("/"), e.path)))


def parse_manifest(document: Any, check_sources: bool = True) -> Manifest:
    if not isinstance(document, dict):
        raise ManifestError("the manifest must be a JSON object")
    unknown = set(document) - {"version", "root", "entries"}
    if unknown:
        raise ManifestError(f"unknown top-level keys {sorted(unknown)}")
    if document.get("version") != MANIFEST_VERSION:
        raise ManifestError(f"unsupported manifest version {document.get('version')!r} "
                            f"(expected {MANIFEST_VERSION})")
    raw_root = document.get("root", {})
    if not isinstance(raw_root, dict) or set(raw_root) - _ROOT_KEYS:
        raise ManifestError(f"root must be an object with keys among {sorted(_ROOT_KEYS)}")
    now_ns = time.time_ns()
    root = RootAttributes(
        mode=_int_field(raw_root, "mode", 0o755, 0, 0o7777, "root"),
        uid=_int_field(raw_root, "uid", 0, 0, MAX_ID, "root"),
        gid=_int_field(raw_root, "gid", 0, 0, MAX_ID, "root"),
        **_times(raw_root, "root", now_ns))
    return Manifest(entries=parse_entries(document.get("entries", []), check_sources), root=root)


def load_manifest(path: str | os.PathLike[str], check_sources: bool = True) -> Manifest:
    """Read and validate a manifest file; raises ManifestError with a clear message."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc.strerror}") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest {path} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest {path} is not valid JSON: {exc}") from None
    return parse_manifest(document, check_sources)


def dump_manifest(manifest: Manifest, path: str | os.PathLike[str]) -> None:
    Path(path).write_text(json.dumps(manifest.to_json(), indent=1))

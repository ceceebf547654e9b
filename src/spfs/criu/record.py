"""DIR/criu-spfs.json: what `criu-spfs dump` recorded about the container's NFS mounts, read
back (and validated: an image dir may come from another host) by `criu-spfs restore`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spfs.sys.regular import FileTooLarge, NotRegularFile, read_regular

RECORD_NAME = "criu-spfs.json"
MAX_RECORD_BYTES = 16 * 1024 * 1024
_KEY_RE = re.compile(r"spfs-[0-9]+-[0-9]+(-[0-9]+)?")
_FSTYPE_RE = re.compile(r"nfs4?")
# Superblock options that describe the old server's port map, not the share: mountd and the
# server may listen elsewhere after a migration, so the client must ask rpcbind again.
STALE_OPTIONS = ("mountport", "port")


class RecordError(ValueError):
    pass


@dataclass(frozen=True)
class RecordedMount:
    mnt_id: int
    root: str         # sub-root inside the share ("/" for the share's root)
    mountpoint: str   # inside the container's mount namespace
    flags: int        # mount(2) MS_* bits of this mount
    external_key: str  # what `--external mnt[...]` named it on dump


@dataclass(frozen=True)
class RecordedShare:
    """One NFS superblock of the container and every place it was mounted."""

    key: str
    dev: str
    fstype: str
    source: str
    super_options: str
    mounts: tuple[RecordedMount, ...]

    @property
    def primary(self) -> RecordedMount:
        """The mount of the share's root where the real NFS goes first; binds follow it."""
        for m in self.mounts:
            if m.root == "/":
                return m
        raise RecordError(f"{self.key}: no mount of the share's root, only binds of "
                          f"sub-directories ({', '.join(m.mountpoint for m in self.mounts)})")

    @property
    def mount_data(self) -> str:
        keep = [o for o in self.super_options.split(",")
                if o and o.partition("=")[0] not in STALE_OPTIONS]
        return ",".join(keep)


def _field(d: dict[str, Any], key: str, kind: type, where: str) -> Any:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, kind):
        raise RecordError(f"{where}: {key} must be a {kind.__name__}, got {v!r}")
    return v


def _abs_path(d: dict[str, Any], key: str, where: str) -> str:
    v = _field(d, key, str, where)
    if not v.startswith("/") or "\0" in v or any(p == ".." for p in v.split("/")):
        raise RecordError(f"{where}: {key} must be an absolute path without '..', got {v!r}")
    return v


def _share(doc: dict[str, Any], i: int) -> RecordedShare:
    where = f"{RECORD_NAME} superblock {i}"
    key = _field(doc, "key", str, where)
    if not _KEY_RE.fullmatch(key):
        raise RecordError(f"{where}: bad key {key!r}")
    fstype = _field(doc, "fstype", str, where)
    if not _FSTYPE_RE.fullmatch(fstype):
        raise RecordError(f"{where}: not an NFS type: {fstype!r}")
    externals = _field(doc, "externals", dict, where)
    mounts = []
    for j, m in enumerate(_field(doc, "mounts", list, where)):
        mwhere = f"{where} mount {j}"
        if not isinstance(m, dict):
            raise RecordError(f"{mwhere}: not an object")
        mnt_id = _field(m, "mnt_id", int, mwhere)
        ext = externals.get(str(mnt_id))
        if not isinstance(ext, str) or not ext.startswith(key):
            raise RecordError(f"{mwhere}: no external key recorded for mount {mnt_id}")
        flags = _field(m, "flags", int, mwhere)
        if not 0 <= flags < 2**32:
            raise RecordError(f"{mwhere}: flags out of range")
        mounts.append(RecordedMount(mnt_id, _abs_path(m, "root", mwhere),
                                    _abs_path(m, "mountpoint", mwhere), flags, ext))
    if not mounts:
        raise RecordError(f"{where}: no mounts")
    options = _field(doc, "super_options", str, where)
    if "\0" in options or len(options) > 8192:
        raise RecordError(f"{where}: bad superblock options")
    source = _field(doc, "source", str, where)
    if "\0" in source or ":" not in source:
        raise RecordError(f"{where}: bad NFS source {source!r}")
    return RecordedShare(key, _field(doc, "dev", str, where), fstype, source, options,
                         tuple(mounts))


def load_record(images: Path) -> list[RecordedShare]:
    path = Path(images) / RECORD_NAME
    try:
        # never followed, never a FIFO or a device: the image dir is not trusted
        doc = json.loads(read_regular(str(path), MAX_RECORD_BYTES))
    except FileNotFoundError:
        raise RecordError(f"{path}: missing (was the container dumped by criu-spfs?)") from None
    except FileTooLarge:
        raise RecordError(f"{path}: larger than {MAX_RECORD_BYTES} bytes") from None
    except NotRegularFile as e:
        raise RecordError(e.strerror) from None
    except OSError as e:
        raise RecordError(f"{path}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RecordError(f"{path}: not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != 1:
        raise RecordError(f"{path}: unknown format")
    shares = [_share(sb, i) if isinstance(sb, dict) else _share({}, i)
              for i, sb in enumerate(_field(doc, "superblocks", list, str(path)))]
    keys = [s.key for s in shares]
    if len(set(keys)) != len(keys):
        raise RecordError(f"{path}: duplicate superblock keys")
    return shares

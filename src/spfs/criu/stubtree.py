"""From CRIU images to the SPFS restore-mode manifest of one NFS superblock: exactly the
names, types, modes and sizes CRIU will open, map, execute, chdir/chroot into or link on it.

Upstream CRIU validates, on restore, the full st_mode of every file and the exact size of
every file except O_WRONLY|O_APPEND ones; content is never compared, so files are served as
zeros in restore mode (what processes read later comes from NFS, once SPFS proxies). For a
silly-renamed open file (.nfsXXXX), CRIU's --link-remap dump made link_remap.N, which CRIU
links back to the silly name on restore: the manifest has link_remap.N, not the silly name.
A symlink held with O_PATH|O_NOFOLLOW is reopened the same way; CRIU checks only its mode,
and its target is not in the images: the stub has a placeholder target. A mount on top of a
directory of the share (a tmpfs, a bind) needs that directory for CRIU to mount on, and a
unix socket bound on the share the directory CRIU binds it in again.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from spfs.criu.images import ImageError, ImageSet, MountRecord, RegFile
from spfs.fs.manifest import Manifest, parse_manifest


SYMLINK_PLACEHOLDER = "spfs-restore-placeholder"  # only CRIU looks, before NFS is back
MOUNTPOINT_MODE = 0o755  # the directory under a nested mount: hidden, never opened by CRIU


@dataclass(frozen=True)
class StubFile:
    path: str          # relative to the filesystem root of the superblock
    type: str
    mode: int          # permission bits
    size: int | None


def _fs_path(f: RegFile, mount: MountRecord, name: str | None = None) -> str:
    """Path inside the superblock: the bind's sub-root plus the name below its mountpoint."""
    name = name or f.name
    rel = posixpath.relpath(posixpath.normpath(name), mount.mountpoint)
    if rel == ".":
        rel = ""
    if rel.startswith(".."):
        raise ImageError(f"file {f.id} {name!r} is not below its mount {mount.mountpoint!r}")
    full = posixpath.normpath(posixpath.join(mount.root, rel)).lstrip("/")
    if full.startswith(".."):
        raise ImageError(f"file {f.id} {name!r} escapes its mount's root {mount.root!r}")
    return full


def stub_files(images: ImageSet, root_dev: int) -> list[StubFile]:
    mounts = {m.mnt_id: m for m in images.mounts.values() if m.root_dev == root_dev}
    if not mounts:
        raise ImageError(f"no mount of device {root_dev} in the images")
    remapped = {r.orig_id: r for r in images.remaps if r.kind == "LINKED"}
    found: dict[str, StubFile] = {}

    def add(path: str, f: RegFile) -> None:
        if not path:  # the mount root itself: SPFS serves it from the root attributes
            return
        kind = f.type
        if kind in (None, "other"):
            raise ImageError(f"file {f.id} {f.name!r}: unsupported file type on NFS "
                             f"(mode {f.mode!r})")
        entry = StubFile(path, kind, f.mode & 0o7777, f.size if kind == "file" else None)
        old = found.get(path)
        if old is not None:
            if (old.type, old.mode) != (entry.type, entry.mode):
                raise ImageError(f"{path!r} recorded as {old.type} {old.mode:o} and as "
                                 f"{entry.type} {entry.mode:o}")
            if old.size is not None and entry.size is not None and old.size != entry.size:
                raise ImageError(f"{path!r} recorded with sizes {old.size} and {entry.size}")
            entry = entry if entry.size is not None else old
        found[path] = entry

    for f in images.files.values():
        if f.mnt_id not in mounts:
            continue
        if f.id in remapped:
            remap = images.files.get(remapped[f.id].remap_id)
            if remap is None:
                raise ImageError(f"remap of file {f.id} has no files.img entry")
            # link_remap.N has the silly-renamed file's identity; the silly name is made by
            # CRIU's link() on restore
            add(_fs_path(f, mounts[f.mnt_id], remap.name), f)
            continue
        add(_fs_path(f, mounts[f.mnt_id]), f)
    for path in nested_mountpoints(images, root_dev) + socket_directories(images, mounts):
        found.setdefault(path, StubFile(path, "dir", MOUNTPOINT_MODE, None))
    return sorted(found.values(), key=lambda s: (s.path.count("/"), s.path))


def socket_directories(images: ImageSet, mounts: dict[int, MountRecord]) -> list[str]:
    """The directories CRIU binds unix sockets in again on restore (it makes the socket
    file itself); a directory holding only sockets has nothing else to put it in the tree."""
    found = []
    for mnt_id, name in images.socket_names:
        if mnt_id in mounts:
            parent = posixpath.dirname(_fs_path(RegFile(0, name, mnt_id, 0, None, None),
                                                mounts[mnt_id]))
            if parent:
                found.append(parent)
    return found


def nested_mountpoints(images: ImageSet, root_dev: int) -> list[str]:
    """Directories of this superblock that other mounts are mounted on: a mount whose
    mountpoint's nearest covering mount (the longest mountpoint above it) is one of ours."""
    ours = [m for m in images.mounts.values() if m.root_dev == root_dev]
    found = []
    for nested in images.mounts.values():
        above = [m for m in images.mounts.values() if m is not nested and
                 nested.mountpoint.startswith(m.mountpoint.rstrip("/") + "/")]
        if not above:
            continue
        covering = max(above, key=lambda m: len(m.mountpoint))
        if covering in ours:
            path = _fs_path(RegFile(0, nested.mountpoint, covering.mnt_id, 0, None, None),
                            covering)
            if path:
                found.append(path)
    return found


def root_mode(images: ImageSet, root_dev: int) -> int | None:
    """The permission bits of the share's root, if a process used it (cwd, open dir fd):
    CRIU compares the full st_mode of what it opens."""
    for f in images.files.values():
        mount = images.mounts.get(f.mnt_id) if f.mnt_id is not None else None
        if mount is None or mount.root_dev != root_dev or f.type != "dir":
            continue
        if _fs_path(f, mount) == "" and f.mode is not None:
            return f.mode & 0o7777
    return None


def build_manifest(images: ImageSet, root_dev: int) -> Manifest:
    entries = []
    for s in stub_files(images, root_dev):
        e = {"path": s.path, "type": s.type, "mode": s.mode}
        if s.size:
            e["size"] = s.size
        if s.type == "symlink":
            e["target"] = SYMLINK_PLACEHOLDER
        entries.append(e)
    # the SPFS validator is the last word on hostile names and sizes
    doc: dict = {"version": 1, "entries": entries}
    mode = root_mode(images, root_dev)
    if mode is not None:
        doc["root"] = {"mode": mode}
    return parse_manifest(doc, check_sources=False)


_LINK_REMAP_NAME = re.compile(r"link_remap\.[0-9]{1,10}")


@dataclass(frozen=True)
class LinkedRemap:
    """An open file that was unlinked on NFS (silly-renamed) at dump time."""

    silly: str   # its name when dumped (.nfsXXXX), relative to the superblock root
    remap: str   # link_remap.N, which CRIU's --link-remap made on the real export


def linked_remaps(images: ImageSet, root_dev: int) -> list[LinkedRemap]:
    mounts = {m.mnt_id: m for m in images.mounts.values() if m.root_dev == root_dev}
    found = []
    for r in images.remaps:
        if r.kind != "LINKED":
            continue
        orig, remap = images.files.get(r.orig_id), images.files.get(r.remap_id)
        if orig is None or remap is None or orig.mnt_id not in mounts:
            continue
        mount = mounts[orig.mnt_id]
        silly, link = _fs_path(orig, mount), _fs_path(orig, mount, remap.name)
        # CRIU makes link_remap.N beside the file it stands for; the manager deletes this
        # name on the real fs once the replace is done, so nothing else may pass for it
        if posixpath.dirname(link) != posixpath.dirname(silly) or \
                not _LINK_REMAP_NAME.fullmatch(posixpath.basename(link)):
            raise ImageError(f"remap of file {orig.id}: {remap.name!r} is not a link_remap.N "
                             f"beside {orig.name!r}")
        found.append(LinkedRemap(silly, link))
    return found

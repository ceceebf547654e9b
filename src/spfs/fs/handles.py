"""Open file and directory handles (the FUSE "fh" values)."""

from __future__ import annotations

import dataclasses
import errno

import pyfuse3


@dataclasses.dataclass(eq=False)
class Handle:
    fh: int
    ino: int
    flags: int
    is_dir: bool = False
    fd: int | None = None            # proxy mode: a real descriptor of the target object
    restore: bool = False            # restore mode: served from the inode's RestoreNode
    broken: OSError | None = None    # re-opening in the new target failed at a switch
    dir_names: list[bytes] | None = None   # directory listing snapshot, indexed by offset


class HandleTable:
    def __init__(self) -> None:
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1

    def __len__(self) -> int:
        return len(self.handles)

    def add(self, ino: int, flags: int, *, is_dir: bool = False, fd: int | None = None,
            restore: bool = False) -> Handle:
        handle = Handle(fh=self._next_fh, ino=ino, flags=flags, is_dir=is_dir, fd=fd,
                        restore=restore)
        self._next_fh += 1
        self.handles[handle.fh] = handle
        return handle

    def get(self, fh: int) -> Handle:
        try:
            handle = self.handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None
        if handle.broken is not None:
            raise pyfuse3.FUSEError(errno.EIO)
        return handle

    def pop(self, fh: int) -> Handle | None:
        return self.handles.pop(fh, None)

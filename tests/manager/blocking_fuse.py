"""A one-file FUSE filesystem whose read never answers: tasks reading it sleep
uninterruptibly in the kernel, which is what keeps a cgroup from freezing (a task parked on an
SPFS stub).  Usage: blocking_fuse.py MOUNTPOINT; prints "ready" once mounted.  Killing it
aborts the connection and releases the readers."""

import errno
import stat
import sys

import pyfuse3
import trio

FILE_INODE = pyfuse3.ROOT_INODE + 1
NAME = b"block"


class BlockingFs(pyfuse3.Operations):
    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_mode = (stat.S_IFDIR | 0o755) if inode == pyfuse3.ROOT_INODE else \
            (stat.S_IFREG | 0o644)
        attr.st_size = 0 if inode == pyfuse3.ROOT_INODE else 4096
        return attr

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INODE)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh, off, size):
        await trio.sleep_forever()


def main() -> None:
    options = set(pyfuse3.default_options)
    options.add("fsname=blocking")
    pyfuse3.init(BlockingFs(), sys.argv[1], options)
    print("ready", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()

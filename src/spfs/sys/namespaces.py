"""setns(2) and unshare(2), which Python 3.11's os module lacks."""

from __future__ import annotations

from spfs.sys.libc import check, libc

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_FS = 0x00000200


def setns(fd: int, nstype: int) -> None:
    check(libc.setns(fd, nstype), f"setns({nstype:#x})")


def unshare(flags: int) -> None:
    check(libc.unshare(flags), f"unshare({flags:#x})")

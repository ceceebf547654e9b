"""The filesystem credentials of the calling thread only: fsuid, fsgid, supplementary groups.

The kernel keeps credentials per thread. glibc's setfsuid()/setfsgid() are plain wrappers of
those per-thread syscalls, so they are called through libc (no syscall numbers). glibc's
setgroups() (and os.setgroups) instead changes every thread of the process (its setxid
broadcast), which would hand one caller's groups to every other thread: that one is issued
as the raw syscall, whose number differs per architecture. An architecture missing from
SETGROUPS_SYSCALL is refused (UnsupportedArchitecture), never guessed: a wrong number calls
an unrelated syscall and the switch silently does nothing.

setfsuid() reports no error: it returns the previous fsuid whether or not it changed it. So
every switch is read back (setfsuid(-1) changes nothing and returns the current value) and
CredentialSwitchError raised if the thread is not where it was asked to be.
"""

from __future__ import annotations

import ctypes
import platform
import threading

from spfs.sys.libc import check, libc

# Raw setgroups(2) by platform.machine(). Only architectures this was checked on: x86_64
# (arch/x86/entry/syscalls/syscall_64.tbl) and aarch64 (the asm-generic table, which
# riscv64 and loongarch64 share too, but nothing here was ever run there).
SETGROUPS_SYSCALL = {"x86_64": 116, "aarch64": 159}

_UNCHANGED = 0xFFFFFFFF  # (uid_t)-1: not a valid id; the call only reports the current one

libc.setfsuid.argtypes = [ctypes.c_uint]
libc.setfsuid.restype = ctypes.c_int
libc.setfsgid.argtypes = [ctypes.c_uint]
libc.setfsgid.restype = ctypes.c_int


class UnsupportedArchitecture(RuntimeError):
    pass


class CredentialSwitchError(RuntimeError):
    pass


def setgroups_syscall(machine: str | None = None) -> int:
    """The raw setgroups number of *machine* (this one's by default)."""
    machine = machine if machine is not None else platform.machine()
    try:
        return SETGROUPS_SYSCALL[machine]
    except KeyError:
        raise UnsupportedArchitecture(
            f"no per-thread setgroups syscall number known for {machine!r} (known: "
            f"{', '.join(sorted(SETGROUPS_SYSCALL))}): refusing to switch credentials"
        ) from None


def current_fsuid() -> int:
    return libc.setfsuid(_UNCHANGED) & 0xFFFFFFFF


def current_fsgid() -> int:
    return libc.setfsgid(_UNCHANGED) & 0xFFFFFFFF


def set_thread_fsuid(uid: int) -> None:
    libc.setfsuid(uid)
    now = current_fsuid()
    if now != uid:
        raise CredentialSwitchError(f"setfsuid({uid}) left this thread's fsuid at {now}")


def set_thread_fsgid(gid: int) -> None:
    libc.setfsgid(gid)
    now = current_fsgid()
    if now != gid:
        raise CredentialSwitchError(f"setfsgid({gid}) left this thread's fsgid at {now}")


class ThreadGroups:
    """Supplementary groups of the calling thread by the raw syscall of one architecture."""

    def __init__(self, machine: str | None = None) -> None:
        self.number = setgroups_syscall(machine)

    def set(self, groups: list[int] | tuple[int, ...]) -> None:
        array = (ctypes.c_uint * max(1, len(groups)))(*groups)
        check(libc.syscall(self.number, ctypes.c_size_t(len(groups)), array), "setgroups")


_groups: ThreadGroups | None = None


def set_thread_groups(groups: list[int] | tuple[int, ...]) -> None:
    global _groups
    if _groups is None:
        _groups = ThreadGroups()
    _groups.set(groups)


def probe(machine: str | None = None, uid: int = 65534, gid: int = 65534) -> None:
    """Refuse (UnsupportedArchitecture, CredentialSwitchError) where the per-thread switch
    cannot work: checks the architecture, then switches a scratch thread to *uid*, *gid*
    and one group and back, reading each back. For a daemon's start."""
    groups = ThreadGroups(machine)
    failure: list[BaseException] = []

    def switch_and_back() -> None:
        try:
            groups.set((gid,))
            set_thread_fsgid(gid)
            set_thread_fsuid(uid)
            set_thread_fsuid(0)
            set_thread_fsgid(0)
            groups.set(())
        except (OSError, CredentialSwitchError) as e:
            failure.append(e)

    # a thread of its own: whatever the probe leaves behind ends with it
    thread = threading.Thread(target=switch_and_back, name="creds-probe")
    thread.start()
    thread.join()
    if failure:
        raise CredentialSwitchError(f"the per-thread credential switch does not work here: "
                                    f"{failure[0]}")

"""Which of CRIU's zdtm static tests the lab runs, grouped by what they hold across the
migration. Every one takes --filename and/or --dirname, so its files can be put on the share.
"""

from __future__ import annotations

GROUPS: dict[str, list[str]] = {
    "files": ["write_read00", "write_read01", "write_read02", "write_read10", "file_append",
              "file_shared", "file_attr", "fdt_shared", "link10", "opath_file", "symlink",
              "symlink01"],
    "unlinked": ["unlink_fstat00", "unlink_fstat01", "unlink_fstat02", "unlink_fstat03",
                 "unlink_fstat04", "unlink_largefile", "unlink_regular00", "ghost_holes00",
                 "rmdir_open", "deleted_unix_sock"],
    "fifos": ["fifo", "fifo-ghost", "fifo_ro", "fifo_wronly", "unlink_fifo",
              "unlink_fifo_wronly"],
    "sockets": ["sockets00", "sockets03", "sockets_dgram", "sk-unix-rel", "sk-unix01",
                "del_standalone_un"],
    # maps06 (10240 file vmas) is left out: under the lab's TCG its dump alone passed the
    # 300 s dump timeout
    "mappings": ["maps00", "mtime_mmap", "maps_file_prot", "unlink_mmap00",
                 "unlink_mmap01", "unlink_mmap02"],
    "cwd-root": ["cwd00", "cwd01", "cwd02", "chroot", "chroot-file"],
    "locks": ["file_locks00", "file_locks01", "file_locks02", "file_locks03", "file_locks04",
              "file_locks05", "file_locks06", "file_locks07", "file_locks08", "file_lease00"],
    "mounts": ["tempfs", "bind-mount", "mnt_ro_bind", "overmount_file"],
    "inotify": ["inotify00"],
}

ALL: list[str] = [t for tests in GROUPS.values() for t in tests]

# The CI subset (tests/lab/test_zdtm.py): one test of each kind of reference, quick to run.
CI: list[str] = ["write_read01", "unlink_fstat00", "fifo", "maps00", "cwd00", "file_locks01"]


def group_of(test: str) -> str:
    for group, tests in GROUPS.items():
        if test in tests:
            return group
    return "other"

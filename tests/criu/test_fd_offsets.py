"""criu-spfs puts back file offsets CRIU 3.17/3.18 move while checking ELF build-ids: which
fds, from the images, and the real lseek through pidfd_getfd on live processes."""

from __future__ import annotations

import contextlib

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from spfs.criu.fd_offsets import DumpedOffset, offsets_to_put_back, put_back, restored_tree
from spfs.criu.images import ImageSet, RegFile


def _file(file_id: int, *, build_id: bool, pos: int | None = 0, flags: int = os.O_RDONLY) -> RegFile:
    return RegFile(file_id, f"/f{file_id}", 1, flags, 0o100755, 4096, pos, build_id)


def test_only_fds_checked_by_build_id_and_with_an_offset_are_put_back() -> None:
    images = ImageSet(files={1: _file(1, build_id=True, pos=0), 2: _file(2, build_id=False),
                             3: _file(3, build_id=True, flags=os.O_PATH),
                             4: _file(4, build_id=True, pos=None), 5: _file(5, build_id=True, pos=12)},
                      fd_tables={10: [(3, 1), (4, 2), (5, 3), (6, 4), (7, 99)], 11: [(0, 5)]})
    assert offsets_to_put_back(images) == [DumpedOffset(10, 3, 0, "/f1"), DumpedOffset(11, 0, 12, "/f5")]


def _fdinfo_pos(pid: int, fd: int) -> int:
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("pos:"):
            return int(line.split()[1])
    raise AssertionError("no pos line")


def test_offsets_of_a_live_process_tree_are_put_back(tmp_path: Path) -> None:
    """A parent and its child each hold an fd 5 bytes past where it was 'dumped' (0 and 3):
    both go back; an fd already right is left alone; a pid not in the tree is reported."""
    data = tmp_path / "elf"
    data.write_bytes(b"\x7fELF" + bytes(100))
    ready = tmp_path / "ready"
    # each file written under a temporary name and renamed: it exists only once complete
    script = (f"import os, time\n"
              f"def say(path, text):\n    open(path + '.tmp', 'w').write(text)\n"
              f"    os.rename(path + '.tmp', path)\n"
              f"fd = os.open('{data}', os.O_RDONLY)\nos.lseek(fd, 5, 0)\n"
              f"right = os.open('{data}', os.O_RDONLY)\n"
              f"if os.fork() == 0:\n    fd = os.open('{data}', os.O_RDONLY)\n    os.lseek(fd, 8, 0)\n"
              f"    say('{ready}.child', f'{{os.getpid()}} {{fd}}')\n    time.sleep(60)\n"
              f"say('{ready}', f'{{fd}} {{right}}')\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script])
    child = 0
    try:
        deadline = time.monotonic() + 20
        while not (ready.exists() and Path(f"{ready}.child").exists()):
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        fd, right = map(int, ready.read_text().split())
        child, child_fd = map(int, Path(f"{ready}.child").read_text().split())
        assert restored_tree(parent.pid) == {parent.pid: parent.pid, child: child}
        moved, problems = put_back([DumpedOffset(parent.pid, fd, 0, "elf"),
                                    DumpedOffset(parent.pid, right, 0, "elf"),
                                    DumpedOffset(child, child_fd, 3, "elf"),
                                    DumpedOffset(999999999, 3, 0, "elf")], parent.pid)
        assert moved == 2
        assert len(problems) == 1 and "not in the restored tree" in problems[0]
        assert _fdinfo_pos(parent.pid, fd) == 0
        assert _fdinfo_pos(parent.pid, right) == 0
        assert _fdinfo_pos(child, child_fd) == 3
    finally:
        parent.kill()
        parent.wait(10)
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)

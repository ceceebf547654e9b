"""A lab container's own small root filesystem: static busybox, the lab's static workloads,
device nodes, and lib symlinks so that a bind of the guest's /usr brings Python in."""

from __future__ import annotations

import os
import shutil
import subprocess
import stat
from pathlib import Path

from spfs.lab.paths import GUEST_DIR, LabPaths

DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
           "urandom": (1, 9), "tty": (5, 0)}


def ensure_roots_tmpfs(roots: Path) -> None:
    """Container roots live on one tmpfs: cheap to create, and what CRIU's --root expects."""
    roots.mkdir(parents=True, exist_ok=True)
    if not os.path.ismount(roots):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "ctroots", str(roots)],
                       check=True, timeout=30)


def populate(root: Path, mountpoints: list[str]) -> None:
    for d in ("bin", "dev", "proc", "tmp", "etc", "root", "usr", "var/tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    busybox = root / "bin" / "busybox"
    shutil.copy2("/bin/busybox", busybox)
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
    for applet in applets:
        link = root / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    for exe in LabPaths.default().bin_dir.iterdir():
        shutil.copy2(exe, root / "bin" / exe.name)
    for name in ("lib", "lib64"):
        (root / name).symlink_to(f"usr/{name}")
    for name, (major, minor) in DEVICES.items():
        os.mknod(root / "dev" / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(root / "dev" / name, 0o666)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                         "nobody:x:65534:65534:nobody:/:/bin/false\n")
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    for mp in mountpoints:
        (root / mp.lstrip("/")).mkdir(parents=True, exist_ok=True)


def ct_init_script() -> Path:
    return GUEST_DIR / "ct-init.sh"

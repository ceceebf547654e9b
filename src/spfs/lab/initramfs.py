"""Build the lab guest's initramfs: static busybox, the modules needed to reach the host's
root over virtio-9p (plus overlay), and the small /init in guest/init."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from spfs.lab.kernel import GuestKernel
from spfs.lab.paths import GUEST_DIR, LabPaths

log = logging.getLogger(__name__)

BUSYBOX = Path("/bin/busybox")
# What /init needs before the root exists; everything else loads from the real modules dir.
EARLY_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]


def _fingerprint(kernel: GuestKernel) -> str:
    h = hashlib.sha256()
    h.update(kernel.version.encode())
    h.update((GUEST_DIR / "init").read_bytes())
    h.update(" ".join(EARLY_MODULES).encode())
    h.update(str(BUSYBOX.stat().st_size).encode())
    return h.hexdigest()


def ensure_initramfs(paths: LabPaths, kernel: GuestKernel) -> Path:
    """(Re)build the initramfs when the kernel, /init or busybox changed."""
    stamp = paths.initramfs.with_suffix(".sha256")
    want = _fingerprint(kernel)
    if paths.initramfs.exists() and stamp.exists() and stamp.read_text() == want:
        return paths.initramfs
    if not BUSYBOX.exists():
        raise RuntimeError(f"{BUSYBOX} missing: install busybox-static (make setup)")
    log.info("building initramfs for %s", kernel.version)
    paths.build.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=paths.build) as tmp:
        root = Path(tmp) / "root"
        _populate(root, kernel)
        out = Path(tmp) / "initramfs.gz"
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        with open(out, "wb") as f:
            cpio = subprocess.Popen(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            gz = subprocess.Popen(["gzip", "-1"], stdin=cpio.stdout, stdout=f)
            assert cpio.stdout is not None
            cpio.stdout.close()
            cpio.communicate(files, timeout=120)
            gz.wait(timeout=120)
            if cpio.returncode or gz.returncode:
                raise RuntimeError("cpio/gzip failed building the initramfs")
        out.replace(paths.initramfs)
    stamp.write_text(want)
    return paths.initramfs


def _populate(root: Path, kernel: GuestKernel) -> None:
    for d in ("bin", "proc", "sys", "dev", "modules"):
        (root / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            os.symlink("busybox", root / "bin" / applet)
    order = []
    for ko in kernel.module_load_order(EARLY_MODULES):
        shutil.copy2(ko, root / "modules" / ko.name)
        order.append(ko.name)
    (root / "modules" / "order").write_text("\n".join(order) + "\n")
    shutil.copy2(GUEST_DIR / "init", root / "init")
    os.chmod(root / "init", 0o755)

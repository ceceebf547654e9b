"""Fetch Debian's bookworm kernel for the lab guest and prepare its modules.

The package name is resolved from the `linux-image-amd64` metapackage at setup time, so the
lab follows Debian's security updates (the ABI number in the name changes) without edits.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from spfs.lab.paths import LabPaths

log = logging.getLogger(__name__)

METAPACKAGE = "linux-image-amd64"


class KernelError(RuntimeError):
    pass


@dataclass(frozen=True)
class GuestKernel:
    root: Path  # extracted package: boot/, lib/modules/<version>/
    version: str

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.version

    def module_load_order(self, names: list[str]) -> list[Path]:
        """The .ko files to insmod, dependencies first, each once, for the given modules."""
        seen: list[Path] = []
        for name in names:
            out = _run(["modprobe", "-d", str(self.root), "-S", self.version,
                        "--show-depends", name])
            for line in out.splitlines():
                parts = line.split()
                if parts and parts[0] == "insmod":
                    ko = Path(parts[1])
                    if ko not in seen:
                        seen.append(ko)
        return seen


def _run(cmd: list[str], **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    if proc.returncode != 0:
        raise KernelError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def resolve_package() -> str:
    """linux-image-6.1.0-NN-amd64, as the metapackage names it today."""
    for attempt in range(2):
        out = _run(["apt-cache", "depends", METAPACKAGE])
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == "Depends:" and parts[1].startswith("linux-image-"):
                return parts[1]
        if attempt == 0:
            log.info("apt lists lack %s; running apt-get update", METAPACKAGE)
            _run(["apt-get", "update", "-q"])
    raise KernelError(f"cannot resolve the kernel package from {METAPACKAGE}")


def version_of(package: str) -> str:
    return package.removeprefix("linux-image-")


def ensure_kernel(paths: LabPaths) -> GuestKernel:
    """Download and extract the kernel once; later calls cost one apt-cache lookup."""
    package = resolve_package()
    version = version_of(package)
    root = paths.kernel_root / version
    kernel = GuestKernel(root, version)
    if not (kernel.vmlinuz.exists() and (kernel.modules / "modules.dep").exists()):
        _fetch(package, root)
        _run(["depmod", "-b", str(root), version])
    _point_current(paths, version)
    return kernel


def current_kernel(paths: LabPaths) -> GuestKernel:
    link = paths.current_kernel
    if not link.is_symlink():
        raise KernelError(f"no lab kernel in {paths.kernel_root}: run `make setup`")
    version = Path(link.readlink()).name
    return GuestKernel(paths.kernel_root / version, version)


def _fetch(package: str, root: Path) -> None:
    log.info("downloading %s", package)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        _run(["apt-get", "download", package], cwd=tmp)
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise KernelError(f"apt-get download {package} gave {debs}")
        staging = Path(tmp) / "x"
        _run(["dpkg-deb", "-x", str(debs[0]), str(staging)])
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)


def _point_current(paths: LabPaths, version: str) -> None:
    link = paths.current_kernel
    if link.is_symlink() and link.readlink() == Path(version):
        return
    tmp = link.with_name("current.new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(version)
    tmp.replace(link)

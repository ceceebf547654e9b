"""Where the lab keeps its artifacts: a git-ignored build dir inside the checkout."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# src/spfs/lab/paths.py -> checkout root is four levels up
CHECKOUT = Path(__file__).resolve().parents[3]
GUEST_DIR = Path(__file__).resolve().parent / "guest"
WORKLOADS_SRC = Path(__file__).resolve().parent / "workloads"


@dataclass(frozen=True)
class LabPaths:
    """Every file the lab builds or reads, derived from one build root."""

    build: Path

    @classmethod
    def default(cls) -> "LabPaths":
        return cls(Path(os.environ.get("SPFS_LAB_BUILD", CHECKOUT / "build" / "lab")))

    @property
    def kernel_root(self) -> Path:
        return self.build / "kernel"

    @property
    def current_kernel(self) -> Path:
        """Symlink to the extracted kernel package in use (kernel/<version>)."""
        return self.kernel_root / "current"

    @property
    def initramfs(self) -> Path:
        return self.build / "initramfs.gz"

    @property
    def bin_dir(self) -> Path:
        """Static test programs for lab containers."""
        return self.build / "bin"

    @property
    def runs(self) -> Path:
        return self.build / "runs"

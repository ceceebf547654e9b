"""The default implementations of the pipeline's mount steps (see interfaces.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from spfs.manager.mounts import (Placement, describe_placements, mounts_of_device,
                                 move_into_place)
from spfs.sys.nsexec import Namespaces
from spfs.manager.realmount import RealFs, RetryPolicy, mount_real_fs


@dataclass
class NamespaceRealFsMounter:
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    legacy: bool = False  # force the mount(2) fallback (tests)

    def mount(self, fs: RealFs, target: Namespaces | None, hidden_dir: str) -> int:
        return mount_real_fs(fs, target, hidden_dir, self.policy, self.legacy)


@dataclass
class NamespaceMountMover:
    timeout: float = 30.0

    def mounts_of(self, target: Namespaces | None, dev: int) -> list[str]:
        return mounts_of_device(target.pid if target else None, dev,
                                target.root if target else None)

    def describe(self, target: Namespaces | None, paths: list[str]) -> list[Placement]:
        return describe_placements(target.pid if target else None, paths,
                                   target.root if target else None)

    def move(self, real_fd: int, placements: list[Placement],
             target: Namespaces | None) -> None:
        move_into_place(real_fd, placements, target, self.timeout)

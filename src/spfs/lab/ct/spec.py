"""What a lab container is made of, as data: parsed from the command line, kept as JSON."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spfs.lab.env import NFS_VERSIONS, shares

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,14}$")
STATE_ROOT = Path("/run/spfs-lab/ct")
ROOTS = Path("/ct")


class SpecError(ValueError):
    pass


def _abs_ct_path(path: str, what: str) -> str:
    if not path.startswith("/") or "/../" in path + "/" or "\0" in path:
        raise SpecError(f"{what} must be an absolute path inside the container: {path!r}")
    return path.rstrip("/") or "/"


@dataclass(frozen=True)
class NfsMount:
    vers: str
    share: str
    mountpoint: str
    options: str = ""

    @classmethod
    def parse(cls, text: str) -> "NfsMount":
        parts = text.split(":", 3)
        if len(parts) < 3:
            raise SpecError(f"--nfs wants VERS:SHARE:MOUNTPOINT[:OPTIONS], got {text!r}")
        vers, share, mountpoint = parts[:3]
        if vers == "4":
            vers = "4.0"
        if vers not in NFS_VERSIONS:
            raise SpecError(f"NFS version {vers!r} not one of {', '.join(NFS_VERSIONS)}")
        if share not in shares():
            raise SpecError(f"no lab share {share!r} (have {', '.join(shares())})")
        return cls(vers, share, _abs_ct_path(mountpoint, "NFS mountpoint"),
                   parts[3] if len(parts) == 4 else "")

    def mount_options(self, server: str) -> str:
        opts = [f"vers={self.vers}"]
        if self.options:
            opts.append(self.options)
        return ",".join(opts)

    def source(self, server: str) -> str:
        return f"{server}:{shares()[self.share].export_path(self.vers)}"


@dataclass(frozen=True)
class BindMount:
    source: str      # path in the guest, or inside the container when it starts with ct:
    target: str      # path inside the container
    readonly: bool = False

    @classmethod
    def parse(cls, text: str) -> "BindMount":
        inside = text.startswith("ct:")
        src, sep, rest = text.removeprefix("ct:").partition(":")
        if not sep:
            raise SpecError(f"--bind wants [ct:]SRC:DST[:ro], got {text!r}")
        dst, _, flag = rest.partition(":")
        if flag not in ("", "ro", "rw"):
            raise SpecError(f"--bind flag must be ro or rw, got {flag!r}")
        if inside:
            src = "ct:" + _abs_ct_path(src, "bind source inside the container")
        return cls(src, _abs_ct_path(dst, "bind target"), flag == "ro")

    @property
    def inside(self) -> bool:
        """A bind of a path inside the container (e.g. of one of its NFS mounts)."""
        return self.source.startswith("ct:")


@dataclass
class CtState:
    name: str
    index: int
    cgroup: str                  # "v1" or "v2"
    nfs: list[NfsMount] = field(default_factory=list)
    binds: list[BindMount] = field(default_factory=list)
    init_pid: int = 0            # the container's PID 1, as the guest sees it
    unshare_pid: int = 0         # the unshare(1) process holding the namespaces' creator
    netns: str = ""              # identity of its network namespace (net:[inode])
    created: float = 0.0

    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / self.name

    @property
    def root(self) -> Path:
        return ROOTS / self.name / "root"

    @property
    def host_veth(self) -> str:
        return f"vh{self.name}"[:15]

    @property
    def ct_veth(self) -> str:
        return "veth-ct"

    @property
    def host_addr(self) -> str:
        return f"10.200.{self.index}.1"

    @property
    def ct_addr(self) -> str:
        return f"10.200.{self.index}.2"

    @property
    def nfs_server(self) -> str:
        """The NFS server as the container reaches it: the guest end of its veth."""
        return self.host_addr

    def cgroup_dir(self) -> Path:
        from spfs.lab.env import cgroup_v1_freezer_root, cgroup_v2_root
        root = cgroup_v1_freezer_root() if self.cgroup == "v1" else cgroup_v2_root()
        return Path(root) / "spfs-lab" / self.name

    def save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / "state.json.new"
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(self.state_dir / "state.json")

    @classmethod
    def load(cls, name: str) -> "CtState":
        path = STATE_ROOT / name / "state.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise SpecError(f"no lab container {name!r}") from None
        data["nfs"] = [NfsMount(**m) for m in data["nfs"]]
        data["binds"] = [BindMount(**b) for b in data["binds"]]
        return cls(**data)


def all_states() -> list[CtState]:
    if not STATE_ROOT.exists():
        return []
    return [CtState.load(p.name) for p in sorted(STATE_ROOT.iterdir())
            if (p / "state.json").exists()]

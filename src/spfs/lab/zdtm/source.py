"""Fetch CRIU's upstream sources as Debian's archive serves them, through apt with a private
configuration (its own sources.list, state and cache under build/): the system's apt setup
is neither read nor changed.

apt resolves the source package and its files' SHA-256 from the signed Sources index; we
ask it for the `.orig.tar.xz` only (upstream's tarball, where zdtm lives) and check that
hash ourselves, so a file is used only as the archive signed it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# suite -> the CRIU it ships: trixie's is the version our research targets, bookworm's is
# the CRIU the lab runs
SUITES = {"trixie": "4.1.1", "bookworm": "3.17.1"}


class SourceError(RuntimeError):
    pass


@dataclass(frozen=True)
class CriuSource:
    suite: str
    version: str
    tarball: Path
    tree: Path   # the unpacked tarball: criu-VERSION/


class PrivateApt:
    """apt-get/apt-cache with every Dir:: of their own under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def options(self) -> list[str]:
        r = self.root
        opts = {
            "Dir::Etc": r / "etc",
            "Dir::Etc::SourceList": r / "etc" / "sources.list",
            "Dir::Etc::SourceParts": r / "etc" / "sources.list.d",
            "Dir::Etc::Parts": r / "etc" / "apt.conf.d",
            "Dir::Etc::Preferences": r / "etc" / "preferences",
            "Dir::Etc::PreferencesParts": r / "etc" / "preferences.d",
            "Dir::State": r / "state",
            "Dir::State::status": r / "state" / "status",
            "Dir::Cache": r / "cache",
            # our own dirs: no lock shared with the system's apt; root's downloads need no
            # _apt sandbox user on dirs it may not read
            "Debug::NoLocking": "1",
            "APT::Sandbox::User": "root",
        }
        return [arg for k, v in opts.items() for arg in ("-o", f"{k}={v}")]

    def prepare(self) -> None:
        r = self.root
        for d in ("etc/apt.conf.d", "etc/preferences.d", "etc/sources.list.d",
                  "state/lists/partial", "cache/archives/partial"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "state" / "status").touch()
        lines = [f"deb-src [signed-by={KEYRING}] {MIRROR} {suite} main\n" for suite in SUITES]
        (r / "etc" / "sources.list").write_text("".join(lines))

    def run(self, tool: str, args: list[str], cwd: Path | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([tool, *self.options(), *args], capture_output=True, text=True,
                              cwd=cwd, timeout=600)
        if check and proc.returncode != 0:
            raise SourceError(f"{tool} {' '.join(args)}: exit {proc.returncode}: "
                              f"{proc.stderr.strip()}")
        return proc

    def update(self) -> None:
        self.run("apt-get", ["-q", "update"])

    def orig_uri(self, suite: str) -> tuple[str, str, str]:
        """(uri, file name, sha256) of criu's upstream tarball in `suite`."""
        out = self.run("apt-get", ["source", "--print-uris", f"criu/{suite}"]).stdout
        for m in re.finditer(r"^'(\S+)' (\S+) \d+ SHA256:([0-9a-f]{64})$", out, re.M):
            if re.fullmatch(r"criu_[0-9.]+\.orig\.tar\.(xz|gz|bz2)", m.group(2)):
                return m.group(1), m.group(2), m.group(3)
        raise SourceError(f"no criu orig tarball among the files of criu/{suite}:\n{out}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(build: Path, suite: str) -> CriuSource:
    """criu's upstream tarball of `suite`, fetched once and unpacked under build/criu-src."""
    version = SUITES[suite]
    top = build.resolve() / "criu-src"  # apt takes relative Dir:: values as relative to Dir
    tree = top / f"criu-{version}"
    done = top / f"{suite}.ok"
    if done.exists() and tree.is_dir():
        name = done.read_text().split()[0]
        return CriuSource(suite, version, top / "dl" / name, tree)
    apt = PrivateApt(top / "apt")
    apt.prepare()
    if not list((top / "apt" / "state" / "lists").glob("*Sources*")):
        log.info("fetching Debian's source indexes (private apt config in %s)", apt.root)
        apt.update()
    _uri, name, digest = apt.orig_uri(suite)
    dl = top / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    tarball = dl / name
    if not tarball.exists() or sha256(tarball) != digest:
        tarball.unlink(missing_ok=True)
        # apt fetches every file of the source package (.dsc, .debian.tar.xz too); only the
        # orig tarball matters here, so the other files' failures are not fatal: the hash
        # check below decides
        proc = apt.run("apt-get", ["-q", "source", "--download-only", f"criu/{suite}"],
                       cwd=dl, check=False)
        if not tarball.exists():
            raise SourceError(f"apt-get source criu/{suite} did not fetch {name}: "
                              f"{proc.stderr.strip()}")
    if sha256(tarball) != digest:
        raise SourceError(f"{tarball}: SHA-256 is not the archive's {digest}")
    if tree.exists():
        shutil.rmtree(tree)
    # tar(1): this Python's tarfile has no extraction filter against odd member paths
    proc = subprocess.run(["tar", "-xf", str(tarball), "-C", str(top), "--no-same-owner"],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SourceError(f"unpacking {tarball}: {proc.stderr.strip()}")
    if not tree.is_dir():
        raise SourceError(f"{tarball} did not unpack to {tree}")
    done.write_text(f"{name} {digest}\n")
    log.info("criu %s sources (%s) in %s", version, suite, tree)
    return CriuSource(suite, version, tarball, tree)


RETRY_AFTER = 24 * 3600.0  # a suite whose tarball could not be had is asked again a day later


def fetch_all(build: Path) -> dict[str, CriuSource | SourceError]:
    """Every suite's tarball that can be had; what could not be is returned as its error
    (remembered, so that a second `make setup` does not ask the archive again at once)."""
    out: dict[str, CriuSource | SourceError] = {}
    for suite in SUITES:
        failed = build.resolve() / "criu-src" / f"{suite}.failed"
        if failed.exists() and time.time() - failed.stat().st_mtime < RETRY_AFTER:
            out[suite] = SourceError(failed.read_text().strip())
            log.info("criu %s (%s) sources: not available (cached, %s): %s", SUITES[suite],
                     suite, failed, out[suite])
            continue
        try:
            out[suite] = fetch(build, suite)
            failed.unlink(missing_ok=True)
        except SourceError as e:
            log.warning("criu %s (%s) sources: %s", SUITES[suite], suite, e)
            failed.parent.mkdir(parents=True, exist_ok=True)
            failed.write_text(f"{e}\n")
            out[suite] = e
    return out

"""Build the selected zdtm static tests from the fetched CRIU tarball, statically (a lab
container's root is busybox and our static programs, no shared libraries), with upstream's
own Makefiles (their per-test flags and extra objects) and gcc on the host.

Output, per CRIU version: build/zdtm/<version>/bin/<test> and manifest.json (for each test:
how zdtm starts it, its .desc, or why it did not build). A stamp holding the inputs' key
makes a second `make setup` free.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spfs.lab.zdtm.selection import ALL
from spfs.lab.zdtm.source import CriuSource

log = logging.getLogger(__name__)

# The variables of test/zdtm/static/Makefile that say which arguments a test takes.
KIND_VARS = {"TST_NOFILE": "nofile", "TST_FILE": "file", "TST_DIR": "dir",
             "TST_DIR_FILE": "dirfile"}


class BuildError(RuntimeError):
    pass


@dataclass
class TestInfo:
    __test__ = False                # not a pytest class, whatever its name
    name: str
    kind: str = ""                  # nofile, file, dir, dirfile
    desc: dict = field(default_factory=dict)
    built: bool = False
    error: str = ""                 # why it did not build


@dataclass
class Manifest:
    version: str
    suite: str
    seconds: float
    tests: dict[str, TestInfo]

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        data = json.loads(path.read_text())
        data["tests"] = {k: TestInfo(**v) for k, v in data["tests"].items()}
        return cls(**data)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))


def out_dir(build: Path, version: str) -> Path:
    return build / "zdtm" / version


def test_kinds(makefile: Path) -> dict[str, str]:
    """test name -> kind, from the TST_* lists of upstream's static/Makefile."""
    text = makefile.read_text().replace("\\\n", " ")
    kinds: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^(TST_[A-Z_]+)\s*:?=(.*)$", line)
        if m and m.group(1) in KIND_VARS:
            for name in m.group(2).split():
                kinds.setdefault(name, KIND_VARS[m.group(1)])
    return kinds


def read_desc(static: Path, test: str) -> dict:
    """zdtm's .desc files are Python literals: flags, opts, flavor, feature."""
    path = static / f"{test}.desc"
    if not path.exists():
        return {}
    try:
        return ast.literal_eval(path.read_text())
    except (ValueError, SyntaxError) as e:
        return {"unparsed": f"{e}"}


def _key(src: CriuSource, tests: list[str]) -> str:
    h = hashlib.sha256()
    h.update(src.tarball.name.encode())
    h.update(Path(__file__).read_bytes())
    h.update(" ".join(tests).encode())
    return h.hexdigest()[:16]


def _make(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    # -static for the tests; -Werror off: upstream's warnings policy is for their compilers,
    # a new gcc warning must not cost us a test
    env = dict(os.environ, LDFLAGS="-static", USERCFLAGS="-Wno-error")
    return subprocess.run(["make", "-s", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def build(src: CriuSource, build_root: Path, tests: list[str] = ALL) -> Manifest:
    out = out_dir(build_root, src.version)
    stamp = out / "stamp"
    key = _key(src, tests)
    if stamp.exists() and stamp.read_text().strip() == key and (out / "manifest.json").exists():
        return Manifest.load(out / "manifest.json")
    t0 = time.monotonic()
    zdtm = src.tree / "test" / "zdtm"
    static = zdtm / "static"
    kinds = test_kinds(static / "Makefile")
    lib = _make(["-j2", "libzdtmtst.a"], zdtm / "lib")
    if lib.returncode != 0:
        raise BuildError(f"zdtm lib of criu {src.version}: {lib.stderr.strip()[-2000:]}")
    infos = {t: TestInfo(t, kinds.get(t, ""), read_desc(static, t)) for t in tests}
    wanted = [t for t in tests if (static / f"{t}.c").exists() and t in kinds]
    for t in tests:
        if t not in wanted:
            infos[t].error = "no such test in this CRIU" if not (static / f"{t}.c").exists() \
                else "not in a TST_* list of static/Makefile"
    # one make for all (parallel); then each missing binary again alone, for its error text
    _make(["-k", "-j2", *wanted], static, timeout=1200)
    bin_dir = out / "bin"
    if bin_dir.exists():
        shutil.rmtree(bin_dir)
    bin_dir.mkdir(parents=True)
    for t in wanted:
        exe = static / t
        if not exe.exists():
            proc = _make([t], static)
            if proc.returncode != 0 or not exe.exists():
                infos[t].error = (proc.stderr.strip() or proc.stdout.strip())[-600:]
                continue
        shutil.copy2(exe, bin_dir / t)
        infos[t].built = True
    manifest = Manifest(src.version, src.suite, round(time.monotonic() - t0, 1), infos)
    manifest.save(out / "manifest.json")
    stamp.write_text(key + "\n")
    built = sum(i.built for i in infos.values())
    log.info("zdtm of criu %s: %d/%d tests built in %.1f s (%s)", src.version, built,
             len(tests), manifest.seconds, bin_dir)
    for i in infos.values():
        if not i.built:
            log.warning("zdtm %s not built: %s", i.name, i.error.splitlines()[-1:] or "")
    return manifest

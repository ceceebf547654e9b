"""Run zdtm static tests the zdtm way in ONE lab container per configuration (guest side).

zdtm's protocol (test/zdtm/lib/test.c): the test parses --pidfile/--outfile/--filename/
--dirname, forks, and its parent exits once the child has set up its state and written the
pidfile; the child then waits for SIGTERM, checks that its state survived, writes PASS or
FAIL to OUTFILE.inprogress and renames it to OUTFILE when it exits. Here every test is
started in the container, the container is dumped and restored once, then each test gets
its SIGTERM and its verdict is read from its outfile.

As zdtm does, a test runs in the directory of its files (some tests look at their cwd's
mount, e.g. file_locks01 for the device of its locks): the configuration's work dir, on the
share for NFS; its pidfile is there too (the test writes it with mkstemp in its cwd and a
rename). Its outfile, held open by the test, stays on the container's own root (a tmpfs) so
the verdict can be read even when the share is what broke.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spfs.lab.ct import checkpoint, container
from spfs.lab.ct.spec import CtState, NfsMount
from spfs.lab.ct.util import CtError
from spfs.lab.zdtm.build import Manifest, TestInfo

log = logging.getLogger(__name__)

CT_DIR = "/zdtm"            # in the container: bin/ (the tests), out/ (pid and out files)
START_TIMEOUT = 60.0        # a test's parent exits when its child is ready
STOP_TIMEOUT = 60.0         # SIGTERM to the outfile's rename at the test's exit


@dataclass(frozen=True)
class Config:
    name: str
    nfs: tuple[str, ...]     # the container's NFS mounts (NfsMount.parse syntax)
    workdir: str             # the tests' cwd, with their files and pidfiles, in the container
    plain: bool              # plain CRIU dump/restore, else criu-spfs
    cr: bool = True          # False: no dump/restore at all (zdtm's --norst), a control

    @property
    def on_nfs(self) -> bool:
        return bool(self.nfs)


CONFIGS = {
    "baseline": Config("baseline", (), f"{CT_DIR}/work", plain=True),
    "nfs4.1": Config("nfs4.1", ("4.1:a:/mnt/nfs",), "/mnt/nfs/zdtm", plain=False),
    "nfs3": Config("nfs3", ("3:a:/mnt/nfs",), "/mnt/nfs/zdtm", plain=False),
    # the tests on NFS v4.1 with no migration: tells "fails on NFS" from "the migration broke it"
    "nfs4.1-nocr": Config("nfs4.1-nocr", ("4.1:a:/mnt/nfs",), "/mnt/nfs/zdtm", plain=False,
                          cr=False),
}


class _NoCr(Exception):
    """The configuration has no checkpoint/restore."""


@dataclass
class Result:
    test: str
    verdict: str                     # PASS, FAIL, N/A
    detail: str = ""                 # why FAIL or N/A: the outfile's tail, CRIU's error


@dataclass
class ConfigRun:
    config: str
    results: dict[str, Result] = field(default_factory=dict)
    dump_seconds: float = 0.0
    restore_seconds: float = 0.0
    seconds: float = 0.0
    error: str = ""                  # what failed for the container as a whole


def not_applicable(info: TestInfo) -> str:
    """Why zdtm itself would not run this test in one shared container, or ''."""
    if not info.built:
        return f"not built: {info.error.splitlines()[-1] if info.error else '?'}"
    flags = str(info.desc.get("flags", "")).split()
    if "crfail" in flags:
        return "zdtm expects CRIU to refuse it (crfail): would fail the container's dump"
    if "noauto" in flags:
        return "zdtm runs it only by hand (noauto)"
    return ""


def test_args(info: TestInfo) -> list[str]:
    """zdtm's arguments (static/Makefile's %.pid rules), relative to the test's cwd."""
    name = info.name
    args = [f"--pidfile={name}.pid", f"--outfile={CT_DIR}/out/{name}.out"]
    if info.kind == "file":
        args.append(f"--filename={name}.test")
    elif info.kind == "dir":
        args.append(f"--dirname={name}.test")
    elif info.kind == "dirfile":
        args += [f"--dirname={name}.dir.test", f"--filename={name}.test"]
    return args


def _ct_path(state: CtState, path: str) -> Path:
    """A container path as the guest sees it (valid for the container's root tmpfs only)."""
    return state.root / path.lstrip("/")


def _install(state: CtState, bin_dir: Path, tests: list[str]) -> None:
    dest = _ct_path(state, f"{CT_DIR}/bin")
    dest.mkdir(parents=True, exist_ok=True)
    _ct_path(state, f"{CT_DIR}/out").mkdir(parents=True, exist_ok=True)
    _ct_path(state, f"{CT_DIR}/work").mkdir(parents=True, exist_ok=True)
    for t in tests:
        shutil.copy2(bin_dir / t, dest / t)


def _outfile_text(state: CtState, test: str) -> str:
    out = _ct_path(state, f"{CT_DIR}/out")
    for name in (f"{test}.out", f"{test}.out.inprogress"):
        p = out / name
        if p.exists():
            return p.read_text(errors="replace")
    return "(no outfile)"


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _read_pid(state: CtState, workdir: str, test: str) -> str:
    """The test's pidfile (on the share for NFS: read from inside the container)."""
    proc = container.exec_in(state.name, ["cat", f"{workdir}/{test}.pid"], capture=True,
                             timeout=30)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def start_test(state: CtState, info: TestInfo, workdir: str) -> Result | None:
    """Start one test; None when it is running (its pidfile written), else its FAIL."""
    argv = [f"{CT_DIR}/bin/{info.name}", *test_args(info)]
    # stdout/stderr to a file of its own: the daemonized child keeps them open, a pipe to us
    # would never see EOF
    script = f'cd "$0" && exec "$@" < /dev/null > {CT_DIR}/out/{info.name}.stderr 2>&1'
    try:
        proc = container.exec_in(state.name, ["sh", "-c", script, workdir, *argv],
                                 capture=True, timeout=START_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - a hung start is this test's failure
        return Result(info.name, "FAIL", f"start: {e}")
    if proc.returncode != 0 or not _read_pid(state, workdir, info.name).isdigit():
        stderr = _ct_path(state, f"{CT_DIR}/out/{info.name}.stderr")
        return Result(info.name, "FAIL", f"start: exit {proc.returncode}: " + _tail(
            _outfile_text(state, info.name) + (stderr.read_text() if stderr.exists() else "")))
    return None


def stop_test(state: CtState, test: str, pid: str) -> Result:
    """SIGTERM, then the verdict from the outfile (zdtm: 'PASS' among its words)."""
    out_dir = _ct_path(state, f"{CT_DIR}/out")
    kill = container.exec_in(state.name, ["kill", "-TERM", pid], capture=True, timeout=30)
    if kill.returncode != 0:
        return Result(test, "FAIL", f"not running after restore (pid {pid}): " +
                      _tail(_outfile_text(state, test)))
    outfile = out_dir / f"{test}.out"
    deadline = time.monotonic() + STOP_TIMEOUT
    while not outfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not outfile.exists():
        return Result(test, "FAIL", f"no verdict {STOP_TIMEOUT:.0f} s after SIGTERM: " +
                      _tail(_outfile_text(state, test)))
    text = outfile.read_text(errors="replace")
    if "PASS" in text.split():
        return Result(test, "PASS")
    return Result(test, "FAIL", _tail(text))


def run_config(config: Config, manifest: Manifest, bin_dir: Path, tests: list[str],
               images: Path, ct_name: str) -> ConfigRun:
    """One container: start every applicable test, dump, restore, stop and judge each."""
    t0 = time.monotonic()
    run = ConfigRun(config.name)
    runnable = []
    for t in tests:
        why = not_applicable(manifest.tests[t])
        if why:
            run.results[t] = Result(t, "N/A", why)
        else:
            runnable.append(t)
    # the shares outlive a container: a directory of this container's own on them
    workdir = f"{config.workdir}-{ct_name}"
    state = container.create(ct_name, [NfsMount.parse(n) for n in config.nfs], [])
    try:
        _install(state, bin_dir, runnable)
        mk = container.exec_in(state.name, ["mkdir", "-p", workdir], capture=True, timeout=30)
        if mk.returncode != 0:
            raise CtError(f"mkdir {workdir}: {mk.stderr.strip()}")
        started: dict[str, str] = {}   # test -> its pid in the container
        for t in runnable:
            failed = start_test(state, manifest.tests[t], workdir)
            if failed:
                run.results[t] = failed
            else:
                started[t] = _read_pid(state, workdir, t)
        log.info("%s: %d tests running%s", config.name, len(started),
                 "; dumping" if config.cr else "")
        if config.cr and not _migrate(config, state, images, started, run):
            return run
        state = CtState.load(ct_name)
        for t, pid in started.items():
            run.results[t] = stop_test(state, t, pid)
    finally:
        run.seconds = round(time.monotonic() - t0, 1)
        try:
            container.destroy(ct_name, missing_ok=True)
        except Exception as e:  # noqa: BLE001 - the results matter more than the cleanup
            log.warning("destroying %s: %s", ct_name, e)
    return run


MAX_DUMPS = 6  # a dump that fails is tried again without the tests it names, this often


def _migrate(config: Config, state: CtState, images: Path, started: dict[str, str],
             run: ConfigRun) -> bool:
    """Dump and restore the container. A dump that fails on some tests' files leaves the
    container running (CRIU and criu-spfs resume it): those tests are FAIL with CRIU's
    words, killed, and the dump is tried again without them. False when the container is
    gone (every test still in it is FAIL with the reason)."""
    for attempt in range(1, MAX_DUMPS + 1):
        culprits: dict[str, str] = {}
        try:
            owners = _test_of_guest_pid(state, started)
            run.dump_seconds = checkpoint.suspend(state, images, plain=config.plain).seconds
        except CtError as e:
            if not container.alive(CtState.load(state.name)):
                return _lost(run, started, "dump", str(e))
            culprits = _culprits(images / "dump.log", str(e), owners, started)
            if not culprits or attempt == MAX_DUMPS:
                return _lost(run, started, "dump", str(e))
            for t, why in culprits.items():
                run.results[t] = Result(t, "FAIL", f"dump (attempt {attempt}): {why}")
                container.exec_in(state.name, ["kill", "-KILL", "--", f"-{started.pop(t)}"],
                                  capture=True, timeout=30)
            log.info("%s: dump %d failed on %s; again without them", config.name, attempt,
                     ", ".join(culprits))
            _rotate(images, attempt)
            continue
        try:
            run.restore_seconds = checkpoint.resume(CtState.load(state.name), images,
                                                    plain=config.plain).seconds
        except CtError as e:
            return _lost(run, started, "restore", str(e))
        return True
    return False


def _lost(run: ConfigRun, started: dict[str, str], step: str, error: str) -> bool:
    run.error = f"{step}: {error}"
    for t in started:
        run.results[t] = Result(t, "FAIL", f"{step} failed: {_tail(error, 3)}")
    return False


def _rotate(images: Path, attempt: int) -> None:
    """Keep a failed dump's log beside the next attempt's images."""
    log_path = images / "dump.log"
    if log_path.exists():
        log_path.rename(images / f"dump.attempt{attempt}.log")


def _ns_pid(pid: int) -> tuple[int, int] | None:
    """(pid in the innermost pid namespace, parent's guest pid) of a guest pid."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["NSpid"].split()[-1]), int(fields["PPid"])


def _test_of_guest_pid(state: CtState, started: dict[str, str]) -> dict[int, str]:
    """Every guest pid of the container that belongs to a test (the test or its children),
    for reading CRIU's log, which names tasks by the guest's pids."""
    by_ns = {int(pid): t for t, pid in started.items() if pid.isdigit()}
    owners: dict[int, str] = {}
    for pid in container.ct_pids(state):
        p, hops = pid, 0
        while p > 1 and hops < 16:
            ids = _ns_pid(p)
            if ids is None:
                break
            if ids[0] in by_ns:
                owners[pid] = by_ns[ids[0]]
                break
            p, hops = ids[1], hops + 1
    return owners


def _culprits(log_path: Path, error: str, owners: dict[int, str],
              started: dict[str, str]) -> dict[str, str]:
    """The tests a failed dump names in its error lines: by a file of theirs
    (.../TEST.test, TEST.dir.test) or by a pid of theirs (CRIU's 'pid: N', 'task N')."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    errors = [line for line in (text + "\n" + error).splitlines()
              if "Error" in line or "error" in line]
    found: dict[str, list[str]] = {}
    pending: list[str] = []
    for line in errors:
        hit = {t for t in started if re.search(rf"/{re.escape(t)}(\.dir)?\.test\b", line)}
        hit |= {owners[int(n)] for n in re.findall(r"(?:pid|task)[:= ]\s*(\d+)", line, re.I)
                if int(n) in owners and owners[int(n)] in started}
        if not hit:
            pending.append(line.strip())  # e.g. "Can't stat fd 20", said before the pid
            continue
        for t in hit:
            found.setdefault(t, []).extend(pending + [line.strip()])
        pending = []
    if not found:
        # an error without a name (e.g. 'Can't stat fd 20'): the task CRIU was dumping
        m = None
        for m in re.finditer(r"Dumping opened files \(pid: (\d+)\)|"
                             r"Error.*\(pid: (\d+)\)", text):
            pass
        pid = int(next(g for g in m.groups() if g)) if m else 0
        if pid in owners:
            found[owners[pid]] = [line.strip() for line in errors][:4]
    return {t: " | ".join(dict.fromkeys(lines))[:600] for t, lines in found.items()}


def save(runs: list[ConfigRun], path: Path, version: str, criu: str) -> None:
    path.write_text(json.dumps({"zdtm_version": version, "criu": criu,
                                "runs": [asdict(r) for r in runs]}, indent=1))


def load(path: Path) -> tuple[list[ConfigRun], str, str]:
    """(runs, the CRIU version whose tests ran, the CRIU that ran them)."""
    data = json.loads(path.read_text())
    runs = []
    for r in data["runs"]:
        r["results"] = {k: Result(**v) for k, v in r["results"].items()}
        runs.append(ConfigRun(**r))
    return runs, data["zdtm_version"], data["criu"]


def default_images(name: str) -> Path:
    results = os.environ.get("SPFS_LAB_RESULTS")
    base = Path(results) / "images" if results else Path("/tmp/zdtm-images")
    return base / f"zdtm-{name}"

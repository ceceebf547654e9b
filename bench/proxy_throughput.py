#!/usr/bin/env python3
"""Proxy throughput of SPFS against the backing directory itself and bindfs, in one run.

    .venv/bin/python bench/proxy_throughput.py [--size-mib 256] [--files 3000] [--runs 3]
                                               [--pin {none,same,split}]

Backing store: a private tmpfs (like the anchor numbers). Client: this single-threaded
Python process, 1 MiB read()/write() calls, metadata on empty files. Each figure is the
median of --runs runs, the configurations interleaved run by run so that noise from other
load hits them alike. bindfs (Debian 1.14.7, libfuse2) runs with `-o big_writes` (without
it, it writes in 4 KiB requests) and its default single thread, as SPFS has one; "bindfs
dp" adds `-o default_permissions`, which SPFS always uses (the kernel then asks for the
directory's attributes before each create/unlink), for a like-with-like figure.
Also measured: how long 1,000 readers parked in stub mode take to complete after the
switch to proxy, against the same 1,000 reads issued in proxy mode.

Metadata rates of every FUSE daemon depend a lot on where the scheduler puts the client
and the daemon (a wake-up on another vCPU costs an IPI, i.e. a VM exit): on this 2-vCPU VM
bindfs did 7k-21k creates/s from one run to the next. --pin fixes the placement for every
configuration alike: `same` puts the client and all daemons on CPU 0 (each request is a
context switch on one CPU: the daemons' CPU cost decides), `split` the client on CPU 0 and
the daemons on CPU 1 (each request crosses CPUs, as on an idle machine). The load average
is printed before and after, as other work on the machine disturbs all figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from spfs.fs import control_client  # noqa: E402

CHUNK = 1 << 20
METRICS = ("write MiB/s", "read MiB/s", "create/s", "stat/s", "unlink/s")


# -- mounts --------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3g", "spfs-bench", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def spfs_proxy(backing: Path, mnt: Path, socket_path: str, *extra: str,
               src: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """SPFS in proxy mode; from the source tree *src* instead of the installed one if given."""
    mnt.mkdir()
    read_end, write_end = os.pipe()
    env = dict(os.environ, PYTHONPATH=str(src)) if src is not None else None
    proc = subprocess.Popen([sys.executable, "-m", "spfs.fs.cli", str(mnt), "--mode", "proxy",
                             "--proxy-dir", str(backing), "--socket-path", socket_path,
                             "--ready-fd", str(write_end), "--foreground", *extra,
                             "--log", str(mnt.parent / f"{mnt.name}.log")],
                            pass_fds=[write_end], env=env)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 30)
        if not ready or proc.poll() is not None:
            raise RuntimeError("spfs did not start")
        yield proc
    finally:
        os.close(read_end)
        subprocess.run(["umount", str(mnt)], check=False)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def bindfs(backing: Path, mnt: Path, options: str) -> Iterator[None]:
    mnt.mkdir()
    subprocess.run(["bindfs", "-o", options, str(backing), str(mnt)], check=True, timeout=30)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# -- workloads -------------------------------------------------------------------------------
def timed(action: Callable[[], None]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def seq_write(path: Path, size_mib: int) -> float:
    block = os.urandom(CHUNK)

    def run() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _ in range(size_mib):
                os.write(fd, block)
        finally:
            os.close(fd)
    return size_mib / timed(run)


def seq_read(path: Path, size_mib: int) -> float:
    def run() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            while os.read(fd, CHUNK):
                pass
        finally:
            os.close(fd)
    return size_mib / timed(run)


def create_files(names: list[str]) -> None:
    for name in names:
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))


def stat_files(names: list[str]) -> None:
    for name in names:
        os.stat(name)


def unlink_files(names: list[str]) -> None:
    for name in names:
        os.unlink(name)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a FUSE daemon so far (0 without one)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_once(view: Path, backing: Path, size_mib: int, files: int, run: int,
                 daemon: int | None, samples: dict[str, list[float]],
                 cpu: dict[str, list[float]]) -> None:
    """One sample of every metric, and of the FUSE daemon's CPU time per unit (MiB or
    operation), which other load on the machine disturbs far less than wall-clock rates.
    *view* is where the client works, *backing* the same directory on the tmpfs."""
    def sample(metric: str, units: float, rate: Callable[[], float]) -> None:
        before = cpu_seconds(daemon)
        samples[metric].append(rate())
        cpu[metric].append((cpu_seconds(daemon) - before) / units)

    sample("write MiB/s", size_mib, lambda: seq_write(view / f"w{run}", size_mib))
    (view / f"w{run}").unlink()
    # Written directly into the backing dir: the FUSE page cache starts cold.
    (backing / f"r{run}").write_bytes(os.urandom(CHUNK) * size_mib)
    sample("read MiB/s", size_mib, lambda: seq_read(view / f"r{run}", size_mib))
    # Through the view: a FUSE daemon holding the inode lets its space go only then.
    (view / f"r{run}").unlink()
    (view / f"meta{run}").mkdir()
    names = [str(view / f"meta{run}" / f"m{i:05d}") for i in range(files)]
    for metric, action in (("create/s", create_files), ("stat/s", stat_files),
                           ("unlink/s", unlink_files)):
        sample(metric, files, lambda: files / timed(lambda: action(names)))
    (view / f"meta{run}").rmdir()


def pin(pid: int, cpu: int) -> None:
    """Put every thread of *pid* on *cpu* (affinity is per thread on Linux)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {cpu})


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def daemon_pid(mnt: Path) -> int | None:
    """The pid of the process serving the FUSE mount at *mnt* (found by its command line)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            # Whole arguments: the bindfs mountpoint is a prefix of the bindfs-dp one.
            if str(mnt) in (proc / "cmdline").read_bytes().decode(errors="replace").split("\0"):
                return int(proc.name)
        except OSError:
            continue
    return None


# -- stub release ---------------------------------------------------------------------------
def parallel_reads(fds: list[int], size: int, park: bool,
                   release: Callable[[], float]) -> tuple[float, int]:
    """One reader thread per fd. With *park* the readers issue their reads at once (they
    park in the stub) and *release* switches the mode and returns when it started; without,
    the readers wait for an event set right after *release*. Returns the time from the
    release to the last completion and the number of short reads."""
    done: list[float] = []
    short = 0
    lock = threading.Lock()
    go = threading.Event()
    if park:
        go.set()

    def reader(fd: int) -> None:
        nonlocal short
        go.wait()
        data = os.pread(fd, size, 0)
        with lock:
            done.append(time.monotonic())
            short += len(data) != size
    old = threading.stack_size(256 * 1024)
    threads = [threading.Thread(target=reader, args=(fd,), daemon=True) for fd in fds]
    threading.stack_size(old)
    for thread in threads:
        thread.start()
    if not park:
        time.sleep(0.5)  # let every thread reach go.wait()
    start = release()
    go.set()
    for thread in threads:
        thread.join(30)
    return (max(done) - start if done else float("inf")), short + len(fds) - len(done)


def stub_release(backing: Path, mnt: Path, socket_path: str, readers: int) -> dict[str, float]:
    size = 16 * 1024
    work = backing / "stub"
    work.mkdir()
    for i in range(readers):
        (work / f"s{i:04d}").write_bytes(os.urandom(size))
    with spfs_proxy(work, mnt, socket_path):
        def open_all() -> list[int]:
            return [os.open(mnt / f"s{i:04d}", os.O_RDONLY) for i in range(readers)]

        def wait_parked() -> None:
            deadline = time.monotonic() + 30
            while control_client.status(socket_path)["parked"] < readers:
                if time.monotonic() > deadline:
                    raise RuntimeError("readers did not all park")
                time.sleep(0.01)

        fds = open_all()
        baseline, wrong_base = parallel_reads(fds, size, False, time.monotonic)
        for fd in fds:
            os.close(fd)
        fds = open_all()
        switch: dict[str, float] = {}

        def release() -> float:
            wait_parked()
            start = time.monotonic()
            record = control_client.set_mode(socket_path, "proxy", str(work))
            switch["command"] = time.monotonic() - start
            switch["daemon"] = record["seconds"]
            return start
        control_client.set_mode(socket_path, "stub")
        released, wrong = parallel_reads(fds, size, True, release)
        answered = control_client.status(socket_path)["release_seconds"]
        for fd in fds:
            os.close(fd)
    return {"release s": released, "baseline s": baseline, "wrong": wrong + wrong_base,
            "answered s": answered if answered is not None else float("nan"),
            "switch command s": switch.get("command", float("nan")),
            "switch in daemon s": switch.get("daemon", float("nan"))}


# -- report ---------------------------------------------------------------------------------
def print_table(results: dict[str, dict[str, float]]) -> None:
    configs = list(results)
    print(f"{'':14}" + "".join(f"{c:>16}" for c in configs))
    for metric in METRICS:
        print(f"{metric:14}" + "".join(f"{results[c][metric]:>16.0f}" for c in configs))
    pairs = [(a, b) for a in ("spfs proxy", "spfs direct_io")
             for b in ("direct", "bindfs", "bindfs dp")]
    print(f"\n{'ratio':14}" + "".join(f"{a.replace('spfs ', '') + '/' + b:>20}"
                                      for a, b in pairs))
    for metric in METRICS:
        print(f"{metric:14}" + "".join(f"{results[a][metric] / results[b][metric]:>20.2f}"
                                       for a, b in pairs))
    if "spfs compared" in results:
        print(f"\n{'':14}{'proxy/compared':>20}{'compared/bindfs':>20}{'compared/bindfs dp':>20}")
        for metric in METRICS:
            base = results["spfs compared"][metric]
            print(f"{metric:14}{results['spfs proxy'][metric] / base:>20.2f}"
                  f"{base / results['bindfs'][metric]:>20.2f}"
                  f"{base / results['bindfs dp'][metric]:>20.2f}")


def print_cpu_table(cpu: dict[str, dict[str, float]]) -> None:
    units = {"write MiB/s": "ms/GiB", "read MiB/s": "ms/GiB", "create/s": "us/op",
             "stat/s": "us/op", "unlink/s": "us/op"}
    scale = {"ms/GiB": 1024e3, "us/op": 1e6}
    configs = list(cpu)
    print(f"\nFUSE daemon CPU time per unit (lower is better)\n{'':14}{'unit':>8}"
          + "".join(f"{c:>16}" for c in configs) + f"{'proxy/bindfs':>14}{'proxy/bindfs dp':>17}")
    for metric in METRICS:
        unit = units[metric]
        values = {c: cpu[c][metric] * scale[unit] for c in configs}
        ratios = [values["spfs proxy"] / values[b] if values[b] else float("nan")
                  for b in ("bindfs", "bindfs dp")]
        print(f"{metric.split()[0]:14}{unit:>8}" + "".join(f"{values[c]:>16.1f}" for c in configs)
              + f"{ratios[0]:>14.2f}{ratios[1]:>17.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--readers", type=int, default=1000)
    parser.add_argument("--compare-src", type=Path,
                        help="also run SPFS proxy from this source tree (the src/ of another "
                             "checkout), interleaved with the others: before/after comparisons")
    parser.add_argument("--pin", choices=("none", "same", "split"), default="none",
                        help="CPU placement of the client and the FUSE daemons (see above)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (mounts tmpfs and FUSE)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="spfs-bench-") as tmp_name, \
            contextlib.ExitStack() as mounts:
        tmp = Path(tmp_name)
        backing = mounts.enter_context(tmpfs(tmp / "backing"))
        views: dict[str, tuple[Path, Path]] = {}
        names = ["direct", "spfs proxy", "spfs direct_io", "bindfs", "bindfs dp"]
        if args.compare_src:
            names.insert(2, "spfs compared")
        for name in names:
            slug = name.replace(" ", "-")
            (backing / slug).mkdir()
            views[name] = (tmp / slug if name != "direct" else backing / slug, backing / slug)
        mounts.enter_context(spfs_proxy(backing / "spfs-proxy", tmp / "spfs-proxy",
                                        str(tmp / "spfs.sock")))
        mounts.enter_context(spfs_proxy(backing / "spfs-direct_io", tmp / "spfs-direct_io",
                                        str(tmp / "dio.sock"), "--direct-io"))
        if args.compare_src:
            mounts.enter_context(spfs_proxy(backing / "spfs-compared", tmp / "spfs-compared",
                                            str(tmp / "cmp.sock"), src=args.compare_src))
        mounts.enter_context(bindfs(backing / "bindfs", tmp / "bindfs", "big_writes"))
        mounts.enter_context(bindfs(backing / "bindfs-dp", tmp / "bindfs-dp",
                                    "big_writes,default_permissions"))
        pids = {name: daemon_pid(view) if name != "direct" else None
                for name, (view, _) in views.items()}
        all_cpus = os.sched_getaffinity(0)
        if args.pin != "none":
            pin(os.getpid(), 0)
            for pid in pids.values():
                if pid is not None:
                    pin(pid, 0 if args.pin == "same" else 1)
        load_before = load_average()
        samples = {name: {m: [] for m in METRICS} for name in views}
        cpu = {name: {m: [] for m in METRICS} for name in views}
        for run in range(args.runs):  # interleaved, so that noise hits every config alike
            for name, (view, back) in views.items():
                measure_once(view, back, args.size_mib, args.files, run, pids[name],
                             samples[name], cpu[name])
        os.sched_setaffinity(0, all_cpus)
        results = {name: {m: statistics.median(v) for m, v in per.items()}
                   for name, per in samples.items()}
        cpu_results = {name: {m: statistics.median(v) for m, v in per.items()}
                       for name, per in cpu.items() if pids[name] is not None}
        print(f"\nProxy throughput, tmpfs backing, {args.size_mib} MiB files, {args.files} "
              f"files for metadata, median of {args.runs}; bindfs -o big_writes, "
              f"bindfs dp adds -o default_permissions (what SPFS always uses); CPU placement: "
              f"{args.pin}; load average before {load_before}, after {load_average()}\n")
        print_table(results)
        print_cpu_table(cpu_results)
        stub = stub_release(backing, tmp / "stubmnt", str(tmp / "stub.sock"), args.readers)
        print(f"\nStub -> proxy with {args.readers} parked readers (16 KiB each, one thread "
              f"each in this process):\n  switch command returned in "
              f"{stub['switch command s'] * 1e3:.1f} ms ({stub['switch in daemon s'] * 1e3:.1f} ms "
              f"in the daemon); the daemon had answered every parked read "
              f"{stub['answered s'] * 1e3:.0f} ms after the switch;\n  the last reader thread "
              f"got its data {stub['release s'] * 1e3:.0f} ms after the switch (the same reads "
              f"started at once in proxy mode: {stub['baseline s'] * 1e3:.0f} ms); "
              f"wrong results: {stub['wrong']:.0f}")
        print("Anchors (C spfs, same kind of machine): proxy read 1497 MiB/s, write 153 "
              "(769 big_writes), 4.4k creates/s; bindfs read 1825, write 71 (4 KiB); "
              "200 stub readers released in 0.10 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

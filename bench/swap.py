#!/usr/bin/env python3
"""Benchmark of the live reference swap (issue 4): the stop window for P processes x F fds.

Prints, for 1x1000, 100x10 and 1000x1 (tmpfs A -> tmpfs B, v1 freezer cgroup), the stop
window (first task stopped -> last task resumed) in total, per fd and per process, next to
the floor: the same dup3+lseek work done by the processes themselves (measured in the
same run), and the anchors (C spfs-manager, naive Python prototype, goals).

usage: .venv/bin/python bench/swap.py [--runs N] [--configs 1x1000,100x10,1000x1]
Needs root, gcc, tmpfs and a cgroup v1 freezer at /sys/fs/cgroup/freezer.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from spfs import swap  # noqa: E402

HERE = Path(__file__).resolve().parent
VICTIM_SRC = HERE.parent / "tests" / "swap" / "victims" / "bench_victim.c"
ANCHORS_MS = {"100x10": {"C spfs-manager": 450, "naive Python prototype": 104, "goal": 30},
              "1000x1": {"C spfs-manager": 1830, "goal": 150},
              "1x1000": {"C spfs-manager": 470}}


def build_victim(workdir: Path) -> Path:
    out = workdir / "swap_victim"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(VICTIM_SRC)], check=True)
    return out


def run_config(victim: Path, workdir: Path, procs: int, fds: int, runs: int) -> dict:
    a, b, ctrl = workdir / "A", workdir / "B", workdir / "ctrl"
    for d in (a, b, ctrl):
        d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "bench-a", str(a)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "bench-b", str(b)], check=True)
    cgroup = Path("/sys/fs/cgroup/freezer") / f"spfs-bench-{os.getpid()}"
    cgroup.mkdir()
    children: list[subprocess.Popen] = []
    try:
        for p in range(procs):
            for side in (a, b):
                (side / f"p{p}").mkdir()
                for i in range(fds):
                    (side / f"p{p}" / f"f{i}").write_bytes(b"x" * (fds + 1))

        def enter() -> None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

        for p in range(procs):
            children.append(subprocess.Popen([str(victim), str(a / f"p{p}"), str(fds), str(ctrl)], preexec_fn=enter))
        deadline = time.monotonic() + 60
        while len(list(ctrl.glob("ready.*"))) < procs:
            if time.monotonic() > deadline:
                raise TimeoutError("victims did not start")
            time.sleep(0.01)
        floor_s = sum(int(f.read_text()) for f in ctrl.glob("ready.*")) / 1e9
        windows, phases = [], []
        source, target = a, b
        for _ in range(runs):
            t0 = time.perf_counter()
            plan = swap.discover(str(source), str(target), cgroup=str(cgroup))
            t1 = time.perf_counter()
            swap.prepare(plan)
            t2 = time.perf_counter()
            report = swap.commit(plan)
            if not report.ok:
                raise RuntimeError(report.error)
            windows.append(report.stop_window_s)
            phases.append({"discover": t1 - t0, "prepare": t2 - t1, **report.timings})
            source, target = target, source
        return {"window": statistics.median(windows), "all": windows, "floor": floor_s, "phases": phases[len(phases) // 2]}
    finally:
        for c in children:
            with contextlib.suppress(ProcessLookupError):
                c.send_signal(signal.SIGKILL)
        for c in children:
            c.wait()
        for _ in range(100):
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.05)
        for d in (a, b):
            subprocess.run(["umount", "-l", str(d)], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--configs", default="1x1000,100x10,1000x1")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workroot = Path(tempfile.mkdtemp(prefix="spfs-bench-swap-"))
    try:
        victim = build_victim(workroot)
        print(f"{'config':>8} {'window ms':>10} {'per fd us':>10} {'per proc us':>12} {'floor ms':>9} "
              f"{'window/floor':>12}   runs (ms)")
        results = {}
        for config in args.configs.split(","):
            procs, fds = (int(x) for x in config.split("x"))
            workdir = workroot / config
            workdir.mkdir()
            r = run_config(victim, workdir, procs, fds, args.runs)
            results[config] = r
            w = r["window"]
            print(f"{config:>8} {w * 1e3:>10.2f} {w / (procs * fds) * 1e6:>10.1f} {w / procs * 1e6:>12.1f} "
                  f"{r['floor'] * 1e3:>9.3f} {w / r['floor']:>12.0f}   "
                  + " ".join(f"{x * 1e3:.1f}" for x in r["all"]))
            print("         phases (ms from first stop; discover/prepare are before it): "
                  + ", ".join(f"{k}={v * 1e3:.1f}" for k, v in r["phases"].items()))
        print("\nanchors (same machine class, ../shared/docs/anchor-numbers.md):")
        for config, anchors in ANCHORS_MS.items():
            if config in results:
                w = results[config]["window"] * 1e3
                print(f"  {config}: ours {w:.1f} ms; " + "; ".join(
                    f"{name} {ms} ms (ours = {w / ms:.2f}x)" for name, ms in anchors.items()))
        if "1000x1" in results and "100x10" in results:
            print(f"  growth 1000x1 / 100x10 = {results['1000x1']['window'] / results['100x10']['window']:.1f}x "
                  "(same 1000 fds, 10x the processes)")
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Migration benchmark (issue 6 item 8), run inside the lab guest:

    .venv/bin/spfs-lab run --timeout 900 -- .venv/bin/python bench/migration.py [--rounds N]

Two like containers (NFS v4.1 share a, workloads append + mmap), one migrated each way,
alternately, N rounds (one container cannot do both: after a plain restore its share is the
guest's mount bound in, not its own):
  best case  `criu restore` with the share already mounted (the lab's --plain baseline:
             CRIU binds a mount of the share made beforehand in the guest)
  criu-spfs  SPFS in place of the share, the real NFS mounted in the container afterwards,
             with spfs-standby running (the way a host runs it: spfs-manager and spfs are
             forked ready-imported), and cold (no standby: each is a new Python)
Printed, with ratios: restore time (until the processes run) for each; the stall the
applications see after resume (processes resumed -> NFS mounted and SPFS proxying) next to
the time of one NFS mount made the same way (fsopen in the container's netns, measured here);
the frozen window of the replace. Goals: restore <= 1.15x best case, stall <= 1.2x one mount.
TCG emulation: absolute numbers are slow, the ratios are what matters. The restores run in
this process: the interpreter start of a `criu-spfs restore` command (about 0.6 s here, a few
ms on hardware) is not in the numbers, as CRIU's own exec is not in the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spfs.lab.ct import checkpoint, container, workload
from spfs.lab.ct.spec import CtState, NfsMount
from spfs.lab.env import lab_env
from spfs.standby import service as standby_service


def _at(steps: list[dict], prefix: str) -> float:
    return next(s["at"] for s in steps if prefix in s["what"])


def one_mount_seconds(state: CtState, spec: NfsMount) -> float:
    """One NFS mount of the same share, from inside the container's netns."""
    server = state.host_addr
    target = tempfile.mkdtemp(prefix="bench-mnt-")
    t0 = time.monotonic()
    subprocess.run(["nsenter", "-t", str(state.init_pid), "-n", "mount", "-t", "nfs", "-o",
                    spec.mount_options(server), spec.source(server), target],
                   check=True, timeout=120, capture_output=True)
    seconds = time.monotonic() - t0
    subprocess.run(["umount", target], check=True, timeout=60)
    return seconds


def _image_dir(tag: str) -> Path:
    """In the lab run's results when there are some: CRIU's and the manager's logs of each
    restore can be read on the host afterwards."""
    return Path(tempfile.mkdtemp(prefix=f"bench-{tag}-", dir=os.environ.get("SPFS_LAB_RESULTS")))


def spfs_round(name: str, tag: str, standby: str | None) -> tuple[float, float, float]:
    """One criu-spfs suspend + resume: (restore time, stall after resume, frozen window)."""
    img = _image_dir(tag)
    checkpoint.suspend(CtState.load(name), img)
    checkpoint.resume(CtState.load(name), img, standby=standby)
    doc = json.loads((img / "criu-spfs-restore.json").read_text())
    steps = doc["steps"]
    return (_at(steps, "criu restore done"),
            _at(steps, "NFS mounted in the container") - _at(steps, "processes resumed"),
            doc["frozen_window_ms"] / 1000)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--standby-log", default=os.path.join(
        os.environ.get("SPFS_LAB_RESULTS", tempfile.gettempdir()), "bench-standby.log"))
    args = p.parse_args()
    lab_env()
    spec = NfsMount.parse("4.1:a:/mnt/nfs")
    names = ("bench-plain", "bench-spfs")
    loads: list[workload.Workload] = []
    plain, warm, cold, stall, frozen, mounts = [], [], [], [], [], []
    socket_path = os.path.join(tempfile.mkdtemp(prefix="bench-standby-"), "standby.sock")
    try:
        for name in names:
            container.create(name, [spec], [], "v2")
            loads += [workload.start(name, "append", f"/mnt/nfs/{name}.log"),
                      workload.start(name, "mmap", f"/mnt/nfs/{name}.dat")]
        workload.wait_running(loads)
        with standby_service.running(socket_path, args.standby_log):
            for r in range(args.rounds):
                img = _image_dir(f"plain-{r}")
                checkpoint.suspend(CtState.load(names[0]), img, plain=True)
                plain.append(checkpoint.resume(CtState.load(names[0]), img, plain=True).seconds)
                mounts.append(one_mount_seconds(CtState.load(names[1]), spec))
                seconds, round_stall, round_frozen = spfs_round(names[1], f"warm-{r}",
                                                                socket_path)
                warm.append(seconds)
                stall.append(round_stall)
                frozen.append(round_frozen)
                cold.append(spfs_round(names[1], f"cold-{r}", None)[0])
                print(f"round {r + 1}: best case {plain[-1]:.2f} s, criu-spfs {warm[-1]:.2f} s "
                      f"(standby) {cold[-1]:.2f} s (cold), stall {stall[-1]:.2f} s, "
                      f"one mount {mounts[-1]:.2f} s, frozen {frozen[-1] * 1000:.0f} ms",
                      flush=True)
        workload.wait_progress(loads)
        verdicts = {f"{w.ct} {w.kind}": w.stop() for w in loads}
        loads = []
    finally:
        workload.stop_quietly(loads)
        for name in names:
            container.destroy(name, missing_ok=True)
    med = statistics.median

    def paired(values: list[float], base: list[float]) -> str:
        # each round's pair ran back to back: the emulator's drift between rounds (the
        # baseline alone varies by a third here) cancels out of a round's own ratio
        ratios = sorted(v / b for v, b in zip(values, base))
        return f"{med(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})"

    print("\n| measure | median | baseline | ratio of medians | median of round ratios "
          "(each round) | goal |\n|---|---|---|---|---|---|")
    for label, values in (("spfs-standby running", warm), ("cold: no standby", cold)):
        print(f"| restore until processes run, {label} | {med(values):.2f} s | "
              f"{med(plain):.2f} s (criu, share pre-mounted) | "
              f"{med(values) / med(plain):.2f}x | {paired(values, plain)} | <= 1.15x |")
    print(f"| stall after resume | {med(stall):.2f} s | {med(mounts):.2f} s (one NFS mount) | "
          f"{med(stall) / med(mounts):.2f}x | {paired(stall, mounts)} | <= 1.2x |")
    print(f"| frozen window of the replace | {med(frozen) * 1000:.0f} ms | - | - | - | - |")
    print(f"workloads: {verdicts}")
    return 0 if all(v.startswith("PASS") for v in verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

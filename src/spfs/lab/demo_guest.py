"""The lab demo, guest side: a container with two NFS shares (v3 and v4.1, each mounted from
inside the container's netns), a bind mount of one, self-checking workloads, a suspend and
a resume, and every workload's own verdict. Run by `spfs-lab demo` in a fresh guest."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from spfs.lab.ct import checkpoint, container, workload
from spfs.lab.ct.spec import BindMount, CtState, NfsMount
from spfs.timeline import Timeline


def main() -> int:
    tl = Timeline()
    tl.note("lab guest ready: kernel NFS server (v3, v4.0-4.2) and CRIU in a qemu guest")
    images = Path(tempfile.mkdtemp(prefix="demo-img-"))
    name = "demo"
    with tl.step("container 'demo' created: NFS v4.1 share a at /mnt/a and NFS v3 share b "
                 "at /mnt/b, both mounted from inside its netns; /mnt/a also bound at /srv"):
        ct = container.create(name, [NfsMount.parse("4.1:a:/mnt/a"),
                                     NfsMount.parse("3:b:/mnt/b")],
                              [BindMount.parse("ct:/mnt/a:/srv")], "v2")
    ok = False
    loads: list[workload.Workload] = []
    try:
        container.exec_in(name, ["mkdir", "-p", "/mnt/b/sub"], timeout=30)
        loads = [workload.start(name, "append", "/mnt/a/log"),
                 workload.start(name, "mmap", "/srv/mapped.dat"),
                 workload.start(name, "posix", "/mnt/b/locked.dat"),
                 workload.start(name, "cwd", "/mnt/b/sub")]
        workload.wait_running(loads)
        tl.note("workloads running: append log on v4.1, shared mmap through the bind, POSIX "
                "lock on v3, cwd on v3")
        with tl.step("suspend: criu dump (NFS mounts external; network locked except the "
                     "container's NFS traffic)"):
            checkpoint.suspend(ct, images, plain=True)
        tl.note(f"container stopped; {len(list(images.iterdir()))} image files in {images}")
        with tl.step("resume: criu restore (baseline: shares mapped to mounts in the guest's "
                     "root netns; SPFS takes this place in issue 6)"):
            checkpoint.resume(CtState.load(name), images, plain=True)
        held = workload.lock_held_by_other(name, "posix", "/mnt/b/locked.dat")
        tl.note(f"POSIX lock {'still held' if held else 'LOST'} after resume "
                "(checked from another process)")
        workload.wait_progress(loads)
        verdicts = {w.kind: w.stop() for w in loads}
        loads = []
        for kind, verdict in verdicts.items():
            tl.note(f"workload {kind:7s}: {verdict}")
        ok = held and all(v.startswith("PASS") for v in verdicts.values())
    finally:
        for w in loads:
            try:
                w.stop()
            except Exception:  # noqa: BLE001 - best effort on the error path
                pass
        container.destroy(name, missing_ok=True)
    results = os.environ.get("SPFS_LAB_RESULTS")
    if results:
        tl.save(Path(results) / "demo-timeline.json")
    tl.note("demo " + ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

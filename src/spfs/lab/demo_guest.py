"""The lab demo, guest side: a container with two NFS shares (v3 and v4.1, each mounted from
inside the container's netns), a bind mount of one, self-checking workloads of every kind, a
suspend and a resume with criu-spfs (SPFS, then the real NFS back; spfs-standby running, as a
host runs it), proof that spfs and the manager exited, and every workload's own verdict. Run
by `spfs-lab demo` in a fresh guest."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from spfs.lab.ct import checkpoint, container, workload
from spfs.lab.ct.inspect import fstypes_at, spfs_helpers_running
from spfs.lab.ct.spec import BindMount, CtState, NfsMount
from spfs.standby import DEFAULT_SOCKET
from spfs.standby import service as standby_service
from spfs.timeline import Timeline

DEMO_LOADS = (  # kind, path (v4.1 share a at /mnt/a and through its bind /srv, v3 share b)
    ("append", "/mnt/a/log"), ("rw", "/mnt/a/rw.dat"), ("mmap", "/srv/mapped.dat"),
    ("mmap-private", "/mnt/a/private.dat"), ("dirfd", "/mnt/a/dir"), ("chroot", "/mnt/a/jail"),
    ("fifo", "/mnt/a/data.fifo"), ("epoll", "/srv/epoll.fifo"), ("read", "/mnt/b/read.dat"),
    ("odirect", "/mnt/b/direct.dat"), ("posix", "/mnt/b/posix.lock"),
    ("flock", "/mnt/a/flock.lock"), ("ofd", "/mnt/a/ofd.lock"), ("cwd", "/mnt/b/sub"),
    ("elf-fd", "/mnt/a/bin/nfsload"),  # the copy made before the workloads start
)


def main() -> int:
    tl = Timeline()
    tl.note("lab guest ready: kernel NFS server (v3, v4.0-4.2) and CRIU in a qemu guest")
    results = os.environ.get("SPFS_LAB_RESULTS")
    # in the run's results when there are some: CRIU's, the manager's and SPFS's logs
    images = Path(tempfile.mkdtemp(prefix="demo-img-", dir=results))
    name = "demo"
    with tl.step("spfs-standby started, as a host runs it: it forks spfs-manager and spfs "
                 "with their imports done"):
        standby = standby_service.start(DEFAULT_SOCKET, Path(results or images) /
                                        "standby.log")
    with tl.step("container 'demo' created: NFS v4.1 share a at /mnt/a and NFS v3 share b "
                 "at /mnt/b, both mounted from inside its netns; /mnt/a also bound at /srv"):
        ct = container.create(name, [NfsMount.parse("4.1:a:/mnt/a"),
                                     NfsMount.parse("3:b:/mnt/b")],
                              [BindMount.parse("ct:/mnt/a:/srv")], "v2")
    ok = False
    loads: list[workload.Workload] = []
    try:
        container.exec_in(name, ["mkdir", "-p", "/mnt/b/sub", "/mnt/a/dir", "/mnt/a/jail",
                                 "/mnt/a/bin"], timeout=30)
        container.exec_in(name, ["sh", "-c", "cp $(which nfsload) /mnt/a/bin/nfsload"],
                          timeout=60)
        loads = [workload.start(name, kind, path) for kind, path in DEMO_LOADS]
        loads.append(workload.start(name, "exe", "/mnt/a/exe.log", binary="/mnt/a/bin/nfsload"))
        workload.wait_running(loads, iterations=20)
        tl.note(f"{len(loads)} workloads running: " + ", ".join(w.kind for w in loads))
        with tl.step("suspend: criu-spfs dump (NFS mounts recorded and external; network "
                     "locked except the container's NFS traffic)"):
            checkpoint.suspend(ct, images)
        tl.note(f"container stopped; {len(list(images.iterdir()))} image files in {images}")
        with tl.step("resume: criu-spfs restore --wait (SPFS in place of each share, then "
                     "the real NFS back inside the container)"):
            checkpoint.resume(CtState.load(name), images, timeline=tl)
        restored = CtState.load(name)
        mounts = fstypes_at(restored)
        tl.note("mounts in the container now: " + ", ".join(
            f"{p} {mounts[p][0]} ({mounts[p][1]})" for p in ("/mnt/a", "/srv", "/mnt/b")))
        leftovers = spfs_helpers_running()
        tl.note("spfs and spfs-manager: " + ("all exited" if not leftovers else
                                             f"STILL RUNNING: {leftovers}"))
        held = {k: workload.lock_held_by_other(name, k, p) for k, p in DEMO_LOADS
                if k in workload.LOCK_KINDS}
        tl.note("locks after resume (checked from another process): " + ", ".join(
            f"{k} {'held' if v else 'LOST'}" for k, v in held.items()))
        workload.wait_progress(loads, iterations=20)
        verdicts = {f"{w.kind} {w.path}": w.stop() for w in loads}
        loads = []
        for what, verdict in verdicts.items():
            tl.note(f"workload {what}: {verdict}")
        ok = (all(held.values()) and not leftovers and
              all(v.startswith("PASS") for v in verdicts.values()) and
              mounts["/mnt/a"][0] == "nfs4" and mounts["/mnt/b"][0] == "nfs" and
              mounts["/srv"][1] == mounts["/mnt/a"][1])
    finally:
        workload.stop_quietly(loads)
        container.destroy(name, missing_ok=True)
        standby_service.stop(standby)
    if results:
        tl.save(Path(results) / "demo-timeline.json")
    tl.note("demo " + ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

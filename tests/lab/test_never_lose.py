"""A migration never loses a container (issue 17 item 2).

criu-spfs dump leaves the dumped tasks stopped while it runs the restore's own checks on the
images; a container whose images our restore would refuse is resumed where it was, not
killed. A restore that fails after the source is gone leaves the images as they were, and a
retry restores the container.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from spfs.fs.manifest import MAX_FILE_SIZE
from spfs.lab.ct import checkpoint, workload
from spfs.lab.ct.container import alive, exec_in
from spfs.lab.ct.spec import CtState
from spfs.lab.ct.util import CtError
from spfs.lab.env import shares
from tests.lab.migration import assert_all_pass, verdicts


def _netfilter_of(pid: int) -> str:
    """The container's iptables rules (filter and mangle) and nftables tables."""
    out = []
    for argv in (["iptables", "-w", "-S"], ["iptables", "-w", "-t", "mangle", "-S"],
                 ["nft", "list", "tables"]):
        try:
            done = subprocess.run(["nsenter", "-t", str(pid), "-n", *argv], capture_output=True,
                                  text=True, timeout=60)
        except FileNotFoundError:
            continue
        out.append(done.stdout)
    return "\n".join(out)


def test_images_our_restore_would_refuse_leave_the_container_running(make_ct, images) -> None:
    """A file on the share larger than SPFS can stand in for (its manifest refuses sizes over
    MAX_FILE_SIZE) is held open: criu-spfs dump must refuse, and the container must go on
    exactly as before: same processes, locks held, no link_remap left on the share, CRIU's
    network lock gone."""
    ct = make_ct(nfs=["4.1:a:/mnt/nfs"])
    server = Path(shares()["a"].server_dir)
    huge = server / "huge.sparse"
    with open(huge, "wb") as f:
        f.truncate(2 * MAX_FILE_SIZE)
    loads = [workload.start(ct.name, "append", "/mnt/nfs/keep.log"),
             workload.start(ct.name, "posix", "/mnt/nfs/keep.lock"),
             workload.start(ct.name, "unlinked", "/mnt/nfs/keep.unlinked")]
    try:
        exec_in(ct.name, ["sh", "-c", "exec 7</mnt/nfs/huge.sparse; exec sleep 100000"],
                detach=True, timeout=30)
        workload.wait_running(loads)
        init_pid = ct.init_pid
        with pytest.raises(CtError) as refused:
            checkpoint.suspend(ct, images)
        message = str(refused.value)
        print(message)
        assert "refusing the image directory" in message, message
        assert "the container was resumed where it was" in message, message
        assert "while resuming" not in message, message  # nothing failed to be undone
        # the same container, not a new one: its init still runs, its workloads go on
        assert alive(CtState.load(ct.name)) and CtState.load(ct.name).init_pid == init_pid
        workload.wait_progress(loads)
        assert workload.lock_held_by_other(ct.name, "posix", "/mnt/nfs/keep.lock")
        assert [p.name for p in server.iterdir() if p.name.startswith("link_remap")] == []
        rules = _netfilter_of(init_pid)
        assert not re.search(r"\bCRIU\b|SPFS-NFS", rules), rules
        # the images are of a moment that is gone: no restore may use them
        assert not (images / "criu-spfs.json").exists()
        assert (images / "criu-spfs.rejected.json").exists()
    finally:
        results = verdicts(loads)
        huge.unlink(missing_ok=True)
    assert_all_pass(results)


def _image_digests(images: Path) -> dict[str, str]:
    """What CRIU and criu-spfs dump wrote (a restore adds its logs and timeline beside)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(images.iterdir())
            if p.is_file() and (p.suffix == ".img" or p.name == "criu-spfs.json")}


def test_a_failed_restore_leaves_the_images_for_a_retry(make_ct, images, monkeypatch) -> None:
    ct = make_ct(nfs=["4.1:a:/mnt/nfs"])
    loads = [workload.start(ct.name, "append", "/mnt/nfs/retry.log"),
             workload.start(ct.name, "unlinked", "/mnt/nfs/retry.unlinked")]
    try:
        workload.wait_running(loads)
        checkpoint.suspend(ct, images)
        before = _image_digests(images)
        assert len(before) > 10, before
        # tasks restored, then CRIU aborts (the lab's action script fails post-restore)
        monkeypatch.setenv("SPFS_LAB_FAIL_AT", "post-restore")
        with pytest.raises(CtError) as failed:
            checkpoint.resume(CtState.load(ct.name), images)
        assert "unchanged" in str(failed.value) and "again" in str(failed.value), failed.value
        assert not alive(CtState.load(ct.name))
        assert _image_digests(images) == before
        monkeypatch.delenv("SPFS_LAB_FAIL_AT")
        checkpoint.resume(CtState.load(ct.name), images)
        timeline = json.loads((images / "criu-spfs-restore.json").read_text())
        assert timeline["ok"] is True, timeline
        workload.wait_progress(loads)
    finally:
        results = verdicts(loads)
    assert_all_pass(results)
    assert not os.path.exists(images / "criu-spfs.rejected.json")

"""CRIU's own zdtm static tests (issue 17 item 3), a small fast subset for CI: every test that
passes on the plain-CRIU baseline (its files on the container's tmpfs) must pass with its
files on an NFS v4.1 share migrated by criu-spfs. The whole selection runs with
`spfs-lab zdtm run` (see README).

One test function on purpose: the lab forks each test item (tests/lab/conftest.py), and one
container per configuration, all tests in it, is the zdtm way this checks.
"""

from __future__ import annotations

import pytest

from spfs.lab.zdtm import run
from spfs.lab.zdtm.build import Manifest, out_dir
from spfs.lab.zdtm.cli import BUILD, built_version
from spfs.lab.zdtm.selection import CI

# test -> why it fails on NFS v4.1 after criu-spfs while it passes on the baseline and on NFS
# without migration (nfs4.1-nocr); each is a finding, listed in README's zdtm section
KNOWN_NFS_FAILURES: dict[str, str] = {
    # first lab run 2026-12-03: "check_file_lock: (fsname nfs4) expecting fd 4 type ADVISORY
    # option READ dev 43 ... FAIL: file_locks01.c:171: Failed on fd 5". The test finds its
    # flock()s in /proc/locks by the st_dev its cwd's mount had at start; probably the NFS
    # superblock mounted again inside the container has another device number (not checked)
    "file_locks01": "flock()s not found in /proc/locks under the share's pre-migration "
                    "device number",
}

pytestmark = pytest.mark.lab


@pytest.mark.timeout(600)
def test_zdtm_subset_passes_on_nfs_as_on_baseline(images) -> None:
    version = built_version(None)
    manifest = Manifest.load(out_dir(BUILD, version) / "manifest.json")
    missing = [t for t in CI if not manifest.tests.get(t) or not manifest.tests[t].built]
    assert not missing, f"zdtm tests not built (make setup): {missing}"
    bins = out_dir(BUILD, version) / "bin"
    base = run.run_config(run.CONFIGS["baseline"], manifest, bins, CI,
                          images / "baseline", "zb")
    nfs = run.run_config(run.CONFIGS["nfs4.1"], manifest, bins, CI, images / "nfs41", "zn")
    for r in (base, nfs):
        print(f"{r.config}: dump {r.dump_seconds:.1f} s, restore {r.restore_seconds:.1f} s, "
              f"{r.seconds:.0f} s; " + ", ".join(f"{t} {x.verdict}"
                                                 for t, x in r.results.items()))
    # the subset is chosen to pass on plain CRIU: a FAIL here is the runner's or the lab's
    base_failed = {t: x.detail for t, x in base.results.items() if x.verdict != "PASS"}
    assert not base_failed and not base.error, (base.error, base_failed)
    assert not nfs.error, nfs.error
    unexpected = {t: x.detail for t, x in nfs.results.items()
                  if x.verdict != "PASS" and t not in KNOWN_NFS_FAILURES}
    known = {t: x.detail for t, x in nfs.results.items()
             if x.verdict != "PASS" and t in KNOWN_NFS_FAILURES}
    if known:
        print("known NFS failures:", known)
    assert not unexpected, unexpected

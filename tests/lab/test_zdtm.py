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
    # lab, 2026-12-03, after the tasks take their flocks themselves: the fdinfo line names
    # the task (pid 46) but device 00:2c where the test expects dev 43 ("expecting fd 4 type
    # ADVISORY option READ dev 43 ino 20 | lock: 1: FLOCK ADVISORY READ 46 00:2c:20"): the
    # lock sits on the NFS superblock mounted again in the container, the test compares
    # with another device number (which one, not yet found)
    "file_locks01": "flock()s listed under the re-mounted share's device number, not the "
                    "one the test expects",
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
    # strict, as an xfail: a known failure that passes now must leave the list
    fixed = [t for t in KNOWN_NFS_FAILURES if t in nfs.results and t not in known]
    assert not fixed, f"passing now, drop from KNOWN_NFS_FAILURES: {fixed}"

"""`make demo` keeps working: the guest side of the demo, as the demo runs it."""

import os

from spfs.lab import demo_guest


def test_demo_passes(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPFS_LAB_RESULTS", str(tmp_path))
    assert demo_guest.main() == 0
    out = capsys.readouterr().out
    assert "demo PASSED" in out
    assert out.count(": PASS") == len(demo_guest.DEMO_LOADS) + 1  # + the exe on NFS
    assert (tmp_path / "demo-timeline.json").exists()
    assert not os.path.exists("/run/spfs-lab/ct/demo")  # the container was cleaned up

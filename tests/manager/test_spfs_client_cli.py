"""The installed `spfs-client` reaches the manager: `manage` sends raw requests, `status`
shows the manager's table (and still an spfs daemon's own status, see tests/fs)."""

import subprocess

from spfs.lab.paths import CHECKOUT

SPFS_CLIENT = str(CHECKOUT / ".venv" / "bin" / "spfs-client")


def test_manage_and_status_through_the_console_script(daemon, container) -> None:
    mp = container.base / "mp"
    mp.mkdir()
    out = subprocess.run([SPFS_CLIENT, "manage", "--socket-path", daemon.socket_path,
                          f"mount;id=3;mode=stub;mountpoint={mp};ns_pid={container.pid}"],
                         capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (0, "0\n"), out.stderr
    out = subprocess.run([SPFS_CLIENT, "status", "--socket-path", daemon.socket_path],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    assert header.split()[:3] == ["ID", "MODE", "PHASE"]
    assert row.split()[:3] == ["3", "stub", "-"]

"""`switch`: the swap engine behind the socket request and behind `spfs-manager switch`."""

import os
import subprocess
import sys

import pytest

from manager_helpers import kill_and_reap, wait_for


@pytest.fixture
def two_mounts(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for path in (a, b):
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "sw", str(path)], check=True)
    (a / "f").write_text("")
    (b / "f").write_text("")
    try:
        yield a, b
    finally:
        for path in (a, b):
            subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def holder(two_mounts, cgroup):
    a, _ = two_mounts
    proc = subprocess.Popen([sys.executable, "-c",
                             f"import os, time\nf = open({str(a / 'f')!r}, 'a')\n"
                             f"os.chdir({str(a)!r})\nprint('ok', flush=True)\n"
                             "while True:\n    f.write('x'); f.flush(); time.sleep(0.01)\n"],
                            stdout=subprocess.PIPE, text=True)
    try:
        cgroup.add(proc.pid)
        assert proc.stdout.readline().strip() == "ok"
        yield proc
    finally:
        kill_and_reap(proc)


def _on(pid: int, path) -> bool:
    dev = os.stat(path).st_dev
    return any(os.stat(f"/proc/{pid}/fd/{fd}").st_dev == dev
               for fd in os.listdir(f"/proc/{pid}/fd")) and \
        os.stat(f"/proc/{pid}/cwd").st_dev == dev


def test_switch_request_moves_a_cgroup(daemon, two_mounts, holder, cgroup):
    a, b = two_mounts
    assert _on(holder.pid, a)
    assert daemon.text(f"switch;source={a};target={b};freeze_cgroup={cgroup.path}") == 0
    assert _on(holder.pid, b) and not _on(holder.pid, a)
    wait_for(lambda: (b / "f").stat().st_size > 0, what="writes on B")
    assert not cgroup.frozen()


def test_switch_request_by_device_is_refused(daemon, two_mounts, cgroup):
    a, b = two_mounts
    reply = daemon.json({"cmd": "switch", "device": os.stat(a).st_dev, "target": str(b),
                         "freeze_cgroup": str(cgroup.path)})
    assert reply["code"] == 95 and "source=" in reply["message"]  # EOPNOTSUPP


def test_manager_cli_switch_delegates_to_the_engine(two_mounts, holder, cgroup):
    a, b = two_mounts
    done = subprocess.run([sys.executable, "-m", "spfs.manager.cli", "switch", "--source",
                           str(a), "--target", str(b), "--cgroup", str(cgroup.path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert _on(holder.pid, b)


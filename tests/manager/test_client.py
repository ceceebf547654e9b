"""spfs-client manage / status against a live manager (stand-in SPFS in a container)."""

import json

from spfs.manager import client_cmd


def run(capsys, *argv) -> tuple[int, str]:
    code = client_cmd.main(list(argv))
    return code, capsys.readouterr().out


def test_manage_text_and_json(daemon, capsys):
    assert run(capsys, "manage", "-s", daemon.socket_path, "mode;all;mode=stub") == (0, "0\n")
    code, out = run(capsys, "manage", "-s", daemon.socket_path, "mode;all")
    assert code == 1 and out.startswith("-22 (EINVAL")
    code, out = run(capsys, "manage", "-s", daemon.socket_path, '{"cmd": "status"}')
    assert code == 0 and json.loads(out)["data"] == {"mounts": []}


def test_manage_sends_mount_data_after_a_nul(daemon, container, cgroup, capsys):
    mp = container.base / "mp"
    mp.mkdir()
    assert daemon.text(f"mount;id=7;mode=stub;mountpoint={mp};ns_pid={container.pid}") == 0
    code, out = run(capsys, "manage", "-s", daemon.socket_path, "--data", "size=1m,nr_inodes=9",
                    f"replace;id=7;source=x;type=nosuchfs;flags=0;freeze_cgroup={cgroup.path}")
    assert (code, out) == (0, "0\n")
    status = daemon.status()["7"]
    assert status["replace"]["phase"] == "held" and status["freeze_cgroup"] == str(cgroup.path)
    assert status["real_fs"] == {"source": "x", "fstype": "nosuchfs", "flags": 0,
                                 "data": "size=1m,nr_inodes=9"}


def test_status_table(daemon, container, capsys):
    mp = container.base / "mp"
    mp.mkdir()
    assert daemon.text(f"mount;id=7;mode=stub;mountpoint={mp};ns_pid={container.pid}") == 0
    code, out = run(capsys, "status", "-s", daemon.socket_path)
    header, row = out.splitlines()
    assert code == 0 and header.split()[:3] == ["ID", "MODE", "PHASE"]
    assert row.split()[:4] == ["7", "stub", "-", str(mp)]
    code, out = run(capsys, "status", "-s", daemon.socket_path, "--id", "nope")
    assert code == 1


def test_unreachable_manager(tmp_path, capsys):
    assert client_cmd.main(["status", "-s", str(tmp_path / "none.sock")]) == 1

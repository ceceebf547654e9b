"""The control socket and spfs-client: commands, malformed requests, permissions."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from spfs.fs import control_client
from spfs_testlib import NOBODY, SpfsMount, run_as, write_manifest

CLIENT = [sys.executable, "-m", "spfs.client.cli"]


def raw_request(path: str, data: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.send(data)
        return json.loads(sock.recv(1 << 20))


@pytest.mark.parametrize("data, error", [
    (b"not json", "EINVAL"),
    (b"[1, 2]", "EINVAL"),
    (b'{"op": "explode"}', "EINVAL"),
    (b'{"op": "set_mode"}', "EINVAL"),
    (b'{"op": "set_mode", "mode": "warp"}', "EINVAL"),
    (b'{"op": "set_mode", "mode": "restore"}', "EINVAL"),
    (b'{"op": "set_mode", "mode": "proxy"}', "EINVAL"),
    (b'{"op": "set_mode", "mode": "proxy", "proxy_dir": "/nonexistent/spfs"}', "ENOENT"),
    (b'{"op": "set_mode", "mode": "proxy", "proxy_dir": 7}', "EINVAL"),
    (b'{"op": "set_mode", "mode": "stub", "extra": 1}', "EINVAL"),
    (b'{"op": "add_manifest_entries", "entries": []}', "EINVAL"),
    (b'{"op": "invalidate", "paths": "x"}', "EINVAL"),
])
def test_malformed_requests_get_errors_and_change_nothing(proxy: SpfsMount, data: bytes,
                                                          error: str) -> None:
    (proxy.target / "f").write_bytes(b"still here")
    before = proxy.status()
    answer = raw_request(proxy.socket, data)
    assert answer["error"] == error and answer["code"] != 0 and answer["message"]
    after = proxy.status()
    assert (after["mode"], after["proxy_dir"], after["switches"]) == \
        (before["mode"], before["proxy_dir"], before["switches"])
    assert (proxy.mountpoint / "f").read_bytes() == b"still here"


def test_non_root_clients_are_refused(proxy: SpfsMount) -> None:
    # so that only SO_PEERCRED stands in the way
    os.chmod(os.path.dirname(proxy.socket), 0o711)
    os.chmod(proxy.socket, 0o666)
    result = run_as(NOBODY, f"""
from spfs.fs import control_client
try:
    control_client.set_mode({proxy.socket!r}, "stub")
except control_client.ControlError as exc:
    print(exc.error)
""")
    assert result.stdout.strip() == "EPERM", result.stderr
    assert proxy.status()["mode"] == "proxy"


def test_transitions_follow_the_state_machine(spfs_factory: Callable[..., SpfsMount],
                                              tmp: Path) -> None:
    mount = spfs_factory("restore")
    other = tmp / "other"
    other.mkdir()
    with pytest.raises(control_client.ControlError, match="restore -> restore"):
        mount.set_mode("restore")
    mount.set_mode("stub")
    for bad in ("stub", "restore"):
        with pytest.raises(control_client.ControlError, match="not allowed"):
            mount.set_mode(bad)
    mount.set_mode("proxy", tmp / "target")
    mount.set_mode("proxy", other)
    assert mount.status()["proxy_dir"] == str(other)
    mount.set_mode("stub")
    mount.set_mode("proxy", tmp / "target")
    with pytest.raises(control_client.ControlError, match="proxy -> restore"):
        mount.set_mode("restore")
    assert mount.status()["switches"] == 5
    logged = [l for l in mount.log.read_text().splitlines() if "mode change" in l and " done in " in l]
    assert len(logged) == 5 and all(" ms (invalidate " in l for l in logged)


def test_proxy_to_proxy_moves_names_but_keeps_open_handles(proxy: SpfsMount, tmp: Path) -> None:
    new = tmp / "new"
    new.mkdir()
    (proxy.target / "f").write_bytes(b"old target")
    (new / "f").write_bytes(b"new target")
    handle = open(proxy.mountpoint / "f", "rb")
    try:
        proxy.set_mode("proxy", new)
        assert (proxy.mountpoint / "f").read_bytes() == b"new target"
        assert handle.read() == b"old target"  # by identity, not by path
    finally:
        handle.close()


def test_add_manifest_entries_and_invalidate(spfs_factory: Callable[..., SpfsMount],
                                             tmp: Path) -> None:
    mount = spfs_factory("restore")
    m = mount.mountpoint
    assert control_client.add_manifest_entries(mount.socket, [
        {"path": "a/b", "type": "file", "mode": 0o600, "size": 3}]) == 1
    assert os.stat(m / "a" / "b").st_size == 3
    extra = write_manifest(tmp / "extra.json", [{"path": "a/c", "type": "dir"}])
    assert control_client.add_manifest_entries(mount.socket, manifest_file=str(extra)) == 1
    assert os.path.isdir(m / "a" / "c")
    for bad in ([{"path": "a/b", "type": "file"}], [{"path": "../x", "type": "file"}],
                [{"path": "ok", "type": "file"}, {"path": "a/b/under_file", "type": "file"}]):
        with pytest.raises(control_client.ControlError):
            control_client.add_manifest_entries(mount.socket, bad)
    assert not (m / "ok").exists()  # the batch with one bad entry added nothing
    result = control_client.invalidate(mount.socket)
    assert result["completed"] and result["errors"] == 0 and result["items"] > 0
    assert control_client.invalidate(mount.socket, ["a/b"])["completed"]
    mount.set_mode("stub")
    with pytest.raises(control_client.ControlError, match="restore mode"):
        control_client.add_manifest_entries(mount.socket, [{"path": "z", "type": "file"}])


def test_spfs_client_cli(proxy: SpfsMount) -> None:
    def client(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLIENT, *args], capture_output=True, text=True, timeout=30)

    status = client("status", "--socket-path", proxy.socket)
    assert status.returncode == 0 and json.loads(status.stdout)["mode"] == "proxy"
    switched = client("mode", "--socket-path", proxy.socket, "--mode", "stub")
    assert switched.returncode == 0 and json.loads(switched.stdout)["new"] == "stub"
    refused = client("mode", "--socket-path", proxy.socket, "--mode", "restore")
    assert refused.returncode == 1 and "not allowed" in refused.stderr
    back = client("mode", "--socket-path", proxy.socket, "--mode", "proxy",
                  "--proxy-dir", str(proxy.target))
    assert back.returncode == 0
    assert json.loads(client("status", "--socket-path", proxy.socket).stdout)["mode"] == "proxy"
    missing = client("status", "--socket-path", proxy.socket + ".nope")
    assert missing.returncode == 1 and "ENOENT" in missing.stderr


def test_switches_leave_mounts_inside_spfs_alone(proxy: SpfsMount, tmp: Path) -> None:
    (proxy.mountpoint / "sub").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "spfs-inner", str(proxy.mountpoint / "sub")],
                   check=True)
    try:
        (proxy.mountpoint / "sub" / "inner").write_bytes(b"on the inner tmpfs")
        proxy.set_mode("stub")
        proxy.set_mode("proxy", proxy.target)
        control_client.invalidate(proxy.socket)
        assert (proxy.mountpoint / "sub" / "inner").read_bytes() == b"on the inner tmpfs"
        assert not (proxy.target / "sub" / "inner").exists()
    finally:
        subprocess.run(["umount", "-l", str(proxy.mountpoint / "sub")], check=False)


def test_large_entry_lists_are_sent_in_several_messages(spfs_factory: Callable[..., SpfsMount],
                                                        tmp: Path) -> None:
    from spfs.fs.manifest import ManifestEntry
    mount = spfs_factory("restore")
    entries = [ManifestEntry(path=f"many/{'n' * 200}{i:05d}", type="file", mode=0o600, size=i)
               for i in range(3000)]  # about 750 KiB of JSON: too big for one SEQPACKET
    assert control_client.add_manifest_entries(mount.socket, entries) == 3000
    names = os.listdir(mount.mountpoint / "many")
    assert len(names) == 3000
    assert os.stat(mount.mountpoint / "many" / f"{'n' * 200}02999").st_size == 2999


def test_a_known_directory_that_became_a_symlink_is_not_followed_on_a_switch(
        proxy: SpfsMount, tmp: Path) -> None:
    """Rebinding after a switch resolves known names without symlinks (issue 12): a directory
    that is a symlink in the new target goes stale instead of being bound to whatever the
    symlink names."""
    (proxy.target / "d" / "sub").mkdir(parents=True)
    other = tmp / "other-target"
    (other / "elsewhere" / "sub").mkdir(parents=True)
    (other / "elsewhere" / "sub" / "inside").write_text("not the directory that was open")
    (other / "d").symlink_to("elsewhere")
    held = os.open(proxy.mountpoint / "d" / "sub", os.O_RDONLY | os.O_DIRECTORY)
    try:
        proxy.set_mode("stub")
        proxy.set_mode("proxy", other)
        with pytest.raises(OSError) as caught:
            os.listdir(held)
        assert caught.value.errno == errno.ESTALE
    finally:
        os.close(held)

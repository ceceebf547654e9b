"""Manifest validation, and hostile manifests refused by the daemon with nothing mounted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from spfs.fs.manifest import MAX_FILE_SIZE, ManifestError, load_manifest, parse_manifest

from spfs_testlib import SpfsMount, is_mounted, write_manifest


def doc(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "entries": list(entries)}


def test_valid_manifest_parses_with_implicit_parents_first(tmp: Path) -> None:
    source = tmp / "src.bin"
    source.write_bytes(b"x" * 10)
    manifest = parse_manifest(doc(
        {"path": "d/e/f", "type": "file", "mode": 0o600, "size": 10, "uid": 7, "gid": 8,
         "content_source": str(source)},
        {"path": "d", "type": "dir", "mode": 0o700},
        {"path": "l", "type": "symlink", "target": "../anything/at/all"},
        {"path": "p", "type": "fifo"}, {"path": "s", "type": "socket"}))
    assert [e.path for e in manifest.entries] == ["d", "l", "p", "s", "d/e/f"]
    f = manifest.entries[-1]
    assert (f.mode, f.uid, f.gid, f.size, f.content_source) == (0o600, 7, 8, 10, str(source))


@pytest.mark.parametrize("entry, message", [
    ({"path": "../etc/passwd", "type": "file"}, "'..'"),
    ({"path": "a/../../b", "type": "file"}, "'..'"),
    ({"path": "/etc/passwd", "type": "file"}, "absolute"),
    ({"path": "a//b", "type": "file"}, "empty"),
    ({"path": "", "type": "file"}, "non-empty"),
    ({"path": "a\u0000b", "type": "file"}, "NUL"),
    ({"path": "x" * 256, "type": "file"}, "longer than 255"),
    ({"path": "f", "type": "file", "size": MAX_FILE_SIZE + 1}, "out of range"),
    ({"path": "f", "type": "file", "size": -1}, "out of range"),
    ({"path": "f", "type": "file", "size": 1.5}, "integer"),
    ({"path": "f", "type": "file", "mode": 0o170777}, "out of range"),
    ({"path": "f", "type": "file", "uid": -1}, "out of range"),
    ({"path": "f", "type": "blockdev"}, "type must be"),
    ({"path": "f", "type": "symlink"}, "target"),
    ({"path": "f", "type": "dir", "size": 5}, "only files"),
    ({"path": "f", "type": "file", "content_source": "relative"}, "absolute path"),
    ({"path": "f", "type": "file", "content_source": "/nonexistent/spfs"}, "No such file"),
    ({"path": "f", "type": "file", "colour": "red"}, "unknown keys"),
])
def test_hostile_entries_are_rejected(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(doc(entry))


def test_duplicates_and_files_as_parents_are_rejected() -> None:
    with pytest.raises(ManifestError, match="duplicate"):
        parse_manifest(doc({"path": "a", "type": "file"}, {"path": "a", "type": "dir"}))
    with pytest.raises(ManifestError, match="not a dir"):
        parse_manifest(doc({"path": "a", "type": "file"}, {"path": "a/b", "type": "file"}))
    with pytest.raises(ManifestError, match="version"):
        parse_manifest({"version": 2, "entries": []})


def test_broken_json_is_a_clear_error(tmp: Path) -> None:
    bad = tmp / "bad.json"
    bad.write_text('{"version": 1, "entries": [')
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(bad)


@pytest.mark.parametrize("entries", [
    [{"path": "../escape", "type": "file"}],
    [{"path": "/abs", "type": "file"}],
    [{"path": "dup", "type": "file"}, {"path": "dup", "type": "file"}],
    [{"path": "huge", "type": "file", "size": 1 << 62}],
])
def test_daemon_refuses_hostile_manifest_and_mounts_nothing(
        tmp: Path, spfs_factory: Callable[..., SpfsMount], entries: list[dict[str, Any]]) -> None:
    manifest = write_manifest(tmp / "m.json", entries)
    mount = spfs_factory("restore", "--manifest", str(manifest), wait_ready=False)
    assert mount.proc.wait(20) == 2
    assert mount.proc.stderr is not None
    err = mount.proc.stderr.read().decode()
    assert "not mounted" in err and "entry" in err
    assert not is_mounted(mount.mountpoint)
    assert not Path(mount.socket).exists()
    assert json.loads(manifest.read_text())  # the file itself is untouched

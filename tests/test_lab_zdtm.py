"""Host-side parts of the zdtm lab runner: reading upstream's Makefile and .desc files, the
private apt options, the zdtm arguments, naming the tests a failed dump names."""

from __future__ import annotations

from pathlib import Path

from spfs.lab.zdtm.build import TestInfo, read_desc
from spfs.lab.zdtm.build import test_kinds as kinds_of
from spfs.lab.zdtm.run import _culprits, not_applicable
from spfs.lab.zdtm.run import test_args as args_of
from spfs.lab.zdtm.source import PrivateApt

MAKEFILE = """\
TST_NOFILE	:=				\\
		busyloop00			\\
		sleeping00			\\

TST_FILE	=				\\
		write_read00			\\
		fifo				\\

TST_DIR		=				\\
		cwd00				\\

TST_DIR_FILE	=				\\
		chroot				\\

TST_STATE	=				\\
		conntracks			\\
"""


def test_kinds_come_from_the_makefile_lists(tmp_path: Path) -> None:
    mk = tmp_path / "Makefile"
    mk.write_text(MAKEFILE)
    assert kinds_of(mk) == {"busyloop00": "nofile", "sleeping00": "nofile",
                              "write_read00": "file", "fifo": "file", "cwd00": "dir",
                              "chroot": "dirfile"}


def test_desc_is_a_python_literal(tmp_path: Path) -> None:
    (tmp_path / "a.desc").write_text("{'flags': 'suid crfail', 'opts': '--link-remap'}\n")
    (tmp_path / "b.desc").write_text("{oops\n")
    assert read_desc(tmp_path, "a") == {"flags": "suid crfail", "opts": "--link-remap"}
    assert "unparsed" in read_desc(tmp_path, "b")
    assert read_desc(tmp_path, "none") == {}
    crfail = TestInfo("a", "file", read_desc(tmp_path, "a"), built=True)
    assert "crfail" in not_applicable(crfail)
    assert not_applicable(TestInfo("c", "file", {}, built=True)) == ""
    assert "not built" in not_applicable(TestInfo("d", "file", {}, error="ld: -lfoo"))


def test_zdtm_arguments_are_relative_to_the_tests_cwd() -> None:
    assert args_of(TestInfo("fifo", "file")) == [
        "--pidfile=fifo.pid", "--outfile=/zdtm/out/fifo.out", "--filename=fifo.test"]
    assert args_of(TestInfo("chroot", "dirfile"))[2:] == [
        "--dirname=chroot.dir.test", "--filename=chroot.test"]
    assert args_of(TestInfo("cwd00", "dir"))[2:] == ["--dirname=cwd00.test"]


def test_private_apt_points_every_dir_under_its_root(tmp_path: Path) -> None:
    apt = PrivateApt(tmp_path / "apt")
    apt.prepare()
    opts = apt.options()
    values = [o.split("=", 1)[1] for o in opts if "=" in o and o.startswith("Dir")]
    assert values and all(v.startswith(str(tmp_path)) for v in values), values
    sources = (tmp_path / "apt" / "etc" / "sources.list").read_text()
    assert "deb-src" in sources and " trixie main" in sources and "signed-by=" in sources


LOG = """\
(13.55) Dumping opened files (pid: 889)
(13.58) Error (criu/files.c:377): Can't stat fd 20: Stale file handle
(13.58) Error (criu/files.c:505): Can't get stat on 4
(13.59) Error (criu/cr-dump.c:1635): Dump files (pid: 889) failed with -1
(14.72) Error (criu/cr-dump.c:2053): Dumping FAILED.
"""


def test_a_failed_dump_names_its_tests_by_pid_or_file(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text(LOG)
    started = {"rmdir_open": "123", "fifo": "124"}
    # 377 is a line number in the log, not a pid: it must not name the fifo test
    got = _culprits(log, "criu dump failed", {889: "rmdir_open", 377: "fifo"}, started)
    assert list(got) == ["rmdir_open"]
    assert "Stale file handle" in got["rmdir_open"]
    log.write_text("(28.1) Error (criu/files-reg.c:950): Can't dump ghost file "
                   "/zdtm/work-zdtm0/fifo.test of 2148491840 size, increase limit\n")
    assert list(_culprits(log, "", {}, started)) == ["fifo"]
    log.write_text("(1.0) Error (criu/mount.c:1): something nobody can place\n")
    assert _culprits(log, "", {}, started) == {}

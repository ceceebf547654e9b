"""Parsing of /proc text the engine depends on."""

from spfs.swap.procfs import parse_fdinfo

def test_fdinfo_inotify_fields_are_hex():
    """The kernel prints an inotify watch's wd in hex too: wd 10 is "wd:a" (it was missed)."""
    text = ("pos:\t0\nflags:\t02004000\nmnt_id:\t17\nino:\t1038\n"
            "inotify wd:a ino:2 sdev:28 mask:100 ignored_mask:0 fhandle-bytes:c fhandle-type:1 "
            "f_handle:c34fe76e0200000000000000\n")
    (watch,) = parse_fdinfo(text).inotify
    assert (watch.wd, watch.ino, watch.sdev, watch.mask, watch.handle_type) == (10, 2, 0x28, 0x100, 1)
    assert watch.handle == bytes.fromhex("c34fe76e0200000000000000")

"""Parsing of both wire forms, without any I/O."""

import errno
import json

import pytest

from spfs.manager.protocol import (HoldMode, ModeRequest, MountRequest, ReplaceAllRequest,
                                   ReplaceRequest, Reply, RequestError, SpfsMode,
                                   StatusRequest, SwitchRequest, WireForm, decode_text_reply,
                                   encode_json_reply, encode_text_reply, parse_packet)


def parse(packet: bytes):
    return parse_packet(packet).request


def rejects(packet: bytes, code: int = errno.EINVAL) -> str:
    with pytest.raises(RequestError) as info:
        parse_packet(packet)
    assert info.value.code == code
    return info.value.message


class TestTextForm:
    def test_vzcriu_mount(self):
        req = parse(b"mount;id=87;mode=restore;mountpoint=/run/criu/spfs-87;"
                    b"ns_mountpoint=/mnt/nfs;ns_pid=4242\0")
        assert req == MountRequest(id="87", mode=SpfsMode.RESTORE,
                                   mountpoint="/run/criu/spfs-87", ns_pid=4242,
                                   ns_mountpoint="/mnt/nfs")
        assert req.container_mountpoint == "/mnt/nfs"

    def test_vzcriu_3_18_mount_with_root(self):
        req = parse(b"mount;id=87;mode=restore;mountpoint=/mnt/nfs;ns_pid=4242;root=/vz/root\0")
        assert req.root == "/vz/root" and req.container_mountpoint == "/mnt/nfs"

    def test_vzcriu_replace_with_blob(self):
        data = b"vers=4.1,rsize=1048576,hard,proto=tcp,addr=10.200.0.1"
        req = parse(b"replace;id=87;source=10.200.0.1:/share;type=nfs4;flags=3072;"
                    b"bindmounts=/srv/a,/srv/b,;freeze_cgroup=/sys/fs/cgroup/freezer/ct1\0"
                    + data + b"\0")
        assert req == ReplaceRequest(id="87", source="10.200.0.1:/share", fstype="nfs4",
                                     flags=3072, bindmounts=("/srv/a", "/srv/b"),
                                     freeze_cgroup="/sys/fs/cgroup/freezer/ct1",
                                     data=data.decode(), hold=HoldMode.HOLD)

    def test_replace_all_and_mode_all(self):
        assert parse(b"replace;all;mode=release\0") == ReplaceAllRequest(HoldMode.RELEASE)
        assert parse(b"mode;all;mode=stub\0") == ModeRequest(mode=SpfsMode.STUB)

    def test_mode_stub_needs_no_proxy_dir(self):
        # the C manager's strdup(NULL) made stub mounts crash: here they are fine
        assert parse(b"mount;id=1;mode=stub;mountpoint=/m").mode is SpfsMode.STUB

    def test_switch(self):
        req = parse(b"switch;source=/a;target=/b;freeze_cgroup=/sys/fs/cgroup/freezer/x;"
                    b"ns_pid=5")
        assert req == SwitchRequest(target="/b", freeze_cgroup="/sys/fs/cgroup/freezer/x",
                                    source="/a", ns_pid=5)
        assert parse(b"switch;device=2049;target=/b;freeze_cgroup=/c").device == 2049

    def test_status(self):
        assert parse(b"status") == StatusRequest()
        assert parse(b"status;id=3;") == StatusRequest(id="3")

    def test_options_are_matched_by_prefix_like_c(self):
        # "all" has no value: any token starting with it selects it, as strncmp does
        assert parse(b"replace;allx;mode=hold") == ReplaceAllRequest(HoldMode.HOLD)

    def test_empty_tokens_are_ignored(self):
        assert parse(b"mode;;all;;mode=stub;") == ModeRequest(mode=SpfsMode.STUB)

    @pytest.mark.parametrize("packet, needle", [
        (b"mount;id=1;mode=stub;mountpoint=/m;id=2", "duplicated id"),
        (b"mode;all;all;mode=stub", "duplicated all"),
        (b"mount;id=1;mode=stub;mountpoint=/m;colour=red", "unsupported option"),
        (b"mount;id=;mode=stub;mountpoint=/m", "empty"),
        (b"mount;id=1;mode=proxy;mountpoint=/m", "proxy directory"),
        (b"mount;id=1;mode=golem;mountpoint=/m", "mode must be"),
        (b"mount;id=1;mode=stub;mountpoint=relative", "absolute"),
        (b"mount;id=1;mode=stub;mountpoint=/m;ns_pid=12x", "decimal"),
        (b"mount;id=1;mode=stub;mountpoint=/m;ns_pid=-1", "decimal"),
        (b"mount;id=1;mode=stub;mountpoint=/m;ns_pid=0", "positive pid"),
        (b"mount;id=../x;mode=stub;mountpoint=/m", "invalid id"),
        (b"mode;mode=stub", "id= or all"),
        (b"mode;id=1;all;mode=stub", "not both"),
        (b"mode;all;mode=restore", "mode must be"),
        (b"replace;id=1;source=s;type=nfs;flags=1;mode=later", "hold|release"),
        (b"replace;id=1;source=s;type=nfs", "flags"),
        (b"replace;id=1;source=s;type=nfs;flags=0x10", "decimal"),
        (b"replace;id=1;source=s;type=nfs;flags=99999999999999999999999", "range"),
        (b"replace;id=1;source=s;type=n/fs;flags=1", "filesystem type"),
        (b"replace;all", "needs mode"),
        (b"replace;all;id=1;mode=hold", "takes only mode"),
        (b"switch;target=/b;freeze_cgroup=/c", "exactly one"),
        (b"switch;source=/a;device=1;target=/b;freeze_cgroup=/c", "exactly one"),
        (b"mode;all;mode=stub\0trailing data", "no data"),
        (b"frobnicate;x=1", "unknown command"),
        (b"", "unknown command"),
        (b"\xff\xfe;", "unknown command"),
    ])
    def test_malformed(self, packet, needle):
        assert needle in rejects(packet)

    def test_oversized(self):
        rejects(b"status;" + b";" * 70000, errno.EMSGSIZE)


class TestJsonForm:
    def test_mount(self):
        req = parse(json.dumps({"cmd": "mount", "id": "7", "mode": "stub",
                                "mountpoint": "/m", "ns_pid": 9}).encode())
        assert req == MountRequest(id="7", mode=SpfsMode.STUB, mountpoint="/m", ns_pid=9)

    def test_replace(self):
        req = parse(json.dumps({"cmd": "replace", "id": "7", "source": "srv:/x",
                                "type": "nfs", "flags": 0, "bindmounts": ["/a"],
                                "mode": "release", "data": "vers=3"}).encode())
        assert req.bindmounts == ("/a",) and req.hold is HoldMode.RELEASE
        assert req.data == "vers=3"

    def test_all_false_is_absent(self):
        assert parse(b'{"cmd": "mode", "id": "1", "all": false, "mode": "stub"}').id == "1"

    @pytest.mark.parametrize("doc, needle", [
        ('[1, 2]', "unknown command"),  # not JSON to us: only an object is
        ('{"cmd": "x"} ', "unknown command"),
        ('{"cmd": 3}', "unknown command"),
        ('{"cmd": "mount", "id": 7, "mode": "stub", "mountpoint": "/m"}', "must be str"),
        ('{"cmd": "mount", "id": "7", "mode": "stub", "mountpoint": "/m", "x": 1}',
         "unsupported field"),
        ('{"cmd": "replace", "id": "1", "source": "s", "type": "t", "flags": true}',
         "must be int"),
        ('{"cmd": "replace", "id": "1", "source": "s", "type": "t", "flags": -1}', "range"),
        ('{"cmd": "replace", "id": "1", "source": "s", "type": "t", "flags": 1, '
         '"bindmounts": [1]}', "list of strings"),
        ('{"cmd": "mode", "all": 1, "mode": "stub"}', "must be bool"),
        ('{"cmd": "status"', "malformed JSON"),
        ('{"cmd": "status", "id": "\\u0000"}', "invalid id"),
        ('{"cmd": ' + '[' * 50000, "malformed JSON"),
    ])
    def test_malformed(self, doc, needle):
        assert needle in rejects(doc.encode())

    def test_form_detection(self):
        assert parse_packet(b'  {"cmd": "status"}').form is WireForm.JSON
        assert parse_packet(b"status").form is WireForm.TEXT


class TestReplies:
    def test_text_reply_is_a_native_negative_errno(self):
        packet = encode_text_reply(Reply.error(errno.ENOENT, "x"))
        assert len(packet) == 4 and decode_text_reply(packet) == -errno.ENOENT
        assert decode_text_reply(encode_text_reply(Reply())) == 0

    def test_json_reply(self):
        body = json.loads(encode_json_reply(Reply.error(errno.EBUSY, "busy")))
        assert body == {"code": errno.EBUSY, "error": "EBUSY", "message": "busy", "data": None}

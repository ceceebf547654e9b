"""Requests of the spfs-manager control socket: parsing and validation, no I/O.

Two wire forms arrive on the same socket, one request per packet:

* the C manager's text form, ``cmd;opt=value;opt=value`` optionally followed by a NUL and a
  binary blob (the mount data of ``replace``).  Options are matched by prefix in table order as
  the C ``parse_cmd_options`` does; an unknown or duplicated option, or an empty value, is an
  error.
* JSON, a packet whose first non-blank byte is ``{``: ``{"cmd": ..., <same names>}``.

Everything here is pure so that it can be fuzzed: `parse_packet` either returns a validated
request dataclass or raises `RequestError`.
"""

from __future__ import annotations

import enum
import errno
import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Union

# Written by a manager as it exits: the status of every SPFS it had (cli._write_final_status)
FINAL_STATUS_NAME = "spfs-manager.final.json"
# The C manager reads one 4096-byte page; we accept more (long bind lists, big mount data)
# but keep a hard bound so a peer cannot make us buffer without limit.
MAX_PACKET_BYTES = 65536
MAX_PATH_BYTES = 4096
MAX_MOUNT_DATA_BYTES = 16384
MAX_BINDMOUNTS = 256
MAX_PATH_MAP = 4096

_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_FSTYPE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class RequestError(Exception):
    """A request that cannot be honoured; `code` is a positive errno."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> RequestError:
    return RequestError(errno.EINVAL, message)


class WireForm(enum.Enum):
    TEXT = "text"
    JSON = "json"


class SpfsMode(enum.Enum):
    """Modes a `mount` request may start SPFS in; `mode` requests take STUB or PROXY."""

    RESTORE = "restore"
    STUB = "stub"
    PROXY = "proxy"


class HoldMode(enum.Enum):
    HOLD = "hold"
    RELEASE = "release"


@dataclass(frozen=True)
class MountRequest:
    id: str
    mode: SpfsMode
    mountpoint: str
    proxy_dir: str | None = None
    ns_pid: int | None = None
    root: str | None = None
    ns_mountpoint: str | None = None
    manifest: str | None = None  # restore mode: the SPFS manifest file (JSON form only)

    @property
    def container_mountpoint(self) -> str:
        return self.ns_mountpoint or self.mountpoint


@dataclass(frozen=True)
class ModeRequest:
    mode: SpfsMode
    id: str | None = None  # None means every SPFS of the manager ("all")
    proxy_dir: str | None = None
    ns_pid: int | None = None


@dataclass(frozen=True)
class ReplaceRequest:
    id: str
    source: str
    fstype: str
    flags: int
    hold: HoldMode = HoldMode.HOLD
    freeze_cgroup: str | None = None
    bindmounts: tuple[str, ...] = ()
    data: str = ""
    # JSON form only, for SPFS mounted outside the container and bound in by CRIU
    # (criu-spfs): the container's namespaces and mountpoint, known only after restore;
    # silly-renamed files as `{name on SPFS: name on the real fs}`, and names to delete on
    # the real fs once nothing is left on SPFS (CRIU's link_remap.N files).
    ns_pid: int | None = None
    ns_mountpoint: str | None = None
    path_map: tuple[tuple[str, str], ...] = ()
    remove_after: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReplaceAllRequest:
    """`replace;all;mode=...`: only changes hold/release of every pending replace."""

    hold: HoldMode


@dataclass(frozen=True)
class SwitchRequest:
    target: str
    freeze_cgroup: str
    source: str | None = None
    device: int | None = None
    ns_pid: int | None = None


@dataclass(frozen=True)
class StatusRequest:
    id: str | None = None


Request = Union[
    MountRequest, ModeRequest, ReplaceRequest, ReplaceAllRequest, SwitchRequest, StatusRequest
]


@dataclass(frozen=True)
class ParsedPacket:
    form: WireForm
    request: Request


# ---------------------------------------------------------------------------------------------
# value checks shared by both forms


def _check_id(value: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise _invalid(f"invalid id {value!r}: 1-64 characters of [A-Za-z0-9_.:-]")
    return value


def _check_path(name: str, value: str) -> str:
    if not value.startswith("/"):
        raise _invalid(f"{name} must be an absolute path, got {value!r}")
    if "\0" in value or len(value.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise _invalid(f"{name} is not a valid path")
    return value


def _check_pid(name: str, value: int) -> int:
    if not 0 < value < 2**22 + 1:
        raise _invalid(f"{name} must be a positive pid, got {value}")
    return value


def _decimal(name: str, text: str, maximum: int) -> int:
    # C's xatoi accepts a sign and leading blanks; nothing in the protocol needs them.
    if not text.isascii() or not text.isdigit():
        raise _invalid(f"{name} must be a decimal number, got {text!r}")
    value = int(text)
    if value > maximum:
        raise _invalid(f"{name} out of range: {text}")
    return value


def _spfs_mode(value: str, allowed: tuple[SpfsMode, ...]) -> SpfsMode:
    for mode in allowed:
        if mode.value == value:
            return mode
    names = "|".join(m.value for m in allowed)
    raise _invalid(f"mode must be {names}, got {value!r}")


def _hold_mode(value: str) -> HoldMode:
    for mode in HoldMode:
        if mode.value == value:
            return mode
    raise _invalid(f"replace mode must be hold|release, got {value!r}")


def _bindmount_list(values: list[str]) -> tuple[str, ...]:
    # vzcriu leaves a trailing comma ("a,b,"): empty elements carry no path.
    paths = [v for v in values if v]
    if len(paths) > MAX_BINDMOUNTS:
        raise _invalid(f"too many bind mounts ({len(paths)} > {MAX_BINDMOUNTS})")
    return tuple(_check_path("bindmounts", p) for p in paths)


def _check_mount_data(data: str) -> str:
    if len(data.encode("utf-8", "surrogateescape")) > MAX_MOUNT_DATA_BYTES:
        raise _invalid("mount data too long")
    if "\0" in data:
        raise _invalid("mount data must not contain NUL bytes")
    return data


# ---------------------------------------------------------------------------------------------
# building requests from a name -> value mapping (both forms end up here)

_Options = dict[str, Any]


def _build_mount(o: _Options) -> MountRequest:
    _require(o, "id", "mode", "mountpoint")
    mode = _spfs_mode(o["mode"], tuple(SpfsMode))
    if mode is SpfsMode.PROXY and o.get("proxy_dir") is None:
        raise _invalid("no proxy directory was provided (proxy_dir=)")
    return MountRequest(
        id=_check_id(o["id"]),
        mode=mode,
        mountpoint=_check_path("mountpoint", o["mountpoint"]),
        proxy_dir=_optional_path(o, "proxy_dir"),
        ns_pid=_optional_pid(o, "ns_pid"),
        root=_optional_path(o, "root"),
        ns_mountpoint=_optional_path(o, "ns_mountpoint"),
        manifest=_optional_path(o, "manifest"),
    )


def _build_mode(o: _Options) -> ModeRequest:
    if o.get("all") and o.get("id") is not None:
        raise _invalid("give either id= or all, not both")
    if not o.get("all") and o.get("id") is None:
        raise _invalid("mount id wasn't provided (id= or all)")
    _require(o, "mode")
    mode = _spfs_mode(o["mode"], (SpfsMode.STUB, SpfsMode.PROXY))
    if mode is SpfsMode.PROXY and o.get("proxy_dir") is None:
        raise _invalid("no proxy directory was provided (proxy_dir=)")
    return ModeRequest(
        mode=mode,
        id=None if o.get("all") else _check_id(o["id"]),
        proxy_dir=_optional_path(o, "proxy_dir"),
        ns_pid=_optional_pid(o, "ns_pid"),
    )


def _build_replace(o: _Options) -> ReplaceRequest | ReplaceAllRequest:
    hold = _hold_mode(o["mode"]) if o.get("mode") is not None else HoldMode.HOLD
    if o.get("all"):
        extra = sorted(k for k, v in o.items() if k not in ("all", "mode") and v is not None)
        if extra:
            raise _invalid(f"replace with 'all' takes only mode=, not {', '.join(extra)}")
        if o.get("mode") is None:
            raise _invalid("replace with 'all' needs mode=hold|release")
        return ReplaceAllRequest(hold=hold)
    _require(o, "id", "source", "type", "flags")
    source = o["source"]
    if "\0" in source or len(source.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise _invalid("source is not valid")
    if not _FSTYPE_RE.fullmatch(o["type"]):
        raise _invalid(f"invalid filesystem type {o['type']!r}")
    return ReplaceRequest(
        id=_check_id(o["id"]),
        source=source,
        fstype=o["type"],
        flags=o["flags"],
        hold=hold,
        freeze_cgroup=_optional_path(o, "freeze_cgroup"),
        bindmounts=_bindmount_list(o.get("bindmounts") or []),
        data=_check_mount_data(o.get("data") or ""),
        ns_pid=_optional_pid(o, "ns_pid"),
        ns_mountpoint=_optional_path(o, "ns_mountpoint"),
        path_map=_path_map(o.get("path_map") or {}),
        remove_after=tuple(_relative_path("remove_after", p) for p in o.get("remove_after") or []),
    )


def _relative_path(name: str, value: Any) -> str:
    """A path below a filesystem root: relative, no `..`, `.` or empty components."""
    if not isinstance(value, str) or not value or "\0" in value or \
            len(value.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise _invalid(f"{name}: {str(value)[:80]!r} is not a valid path")
    if value.startswith("/") or any(part in ("", ".", "..") for part in value.split("/")):
        raise _invalid(f"{name}: {value[:80]!r} must be relative and stay below the root")
    return value


def _path_map(value: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    if len(value) > MAX_PATH_MAP:
        raise _invalid(f"path_map has more than {MAX_PATH_MAP} entries")
    return tuple((_relative_path("path_map", k), _relative_path("path_map", v))
                 for k, v in value.items())


def _build_switch(o: _Options) -> SwitchRequest:
    _require(o, "target", "freeze_cgroup")
    if (o.get("source") is None) == (o.get("device") is None):
        raise _invalid("either source= or device= must be given (exactly one)")
    return SwitchRequest(
        target=_check_path("target", o["target"]),
        freeze_cgroup=_check_path("freeze_cgroup", o["freeze_cgroup"]),
        source=_optional_path(o, "source"),
        device=o.get("device"),
        ns_pid=_optional_pid(o, "ns_pid"),
    )


def _build_status(o: _Options) -> StatusRequest:
    return StatusRequest(id=_check_id(o["id"]) if o.get("id") is not None else None)


def _require(o: _Options, *names: str) -> None:
    for name in names:
        if o.get(name) is None:
            raise _invalid(f"{name} wasn't provided")


def _optional_path(o: _Options, name: str) -> str | None:
    value = o.get(name)
    return None if value is None else _check_path(name, value)


def _optional_pid(o: _Options, name: str) -> int | None:
    value = o.get(name)
    return None if value is None else _check_pid(name, value)


# ---------------------------------------------------------------------------------------------
# the text form


class _Kind(enum.Enum):
    STRING = "string"
    PID = "pid"
    FLAGS = "flags"
    DEVICE = "device"
    LIST = "list"
    PRESENT = "present"  # an option without "=value", like "all"


@dataclass(frozen=True)
class _TextOption:
    prefix: str  # what the C table matches with strncmp, "=" included for valued options
    kind: _Kind = _Kind.STRING

    @property
    def name(self) -> str:
        return self.prefix.rstrip("=")


# Table order matters: like C, the first prefix that matches a token wins.
_TEXT_OPTIONS: dict[str, tuple[_TextOption, ...]] = {
    "mount": (
        _TextOption("id="),
        _TextOption("ns_pid=", _Kind.PID),
        _TextOption("root="),
        _TextOption("mode="),
        _TextOption("proxy_dir="),
        _TextOption("mountpoint="),
        _TextOption("ns_mountpoint="),
    ),
    "mode": (
        _TextOption("id="),
        _TextOption("mode="),
        _TextOption("proxy_dir="),
        _TextOption("ns_pid=", _Kind.PID),
        _TextOption("all", _Kind.PRESENT),
    ),
    "replace": (
        _TextOption("id="),
        _TextOption("source="),
        _TextOption("type="),
        _TextOption("flags=", _Kind.FLAGS),
        _TextOption("freeze_cgroup="),
        _TextOption("bindmounts=", _Kind.LIST),
        _TextOption("mode="),
        _TextOption("all", _Kind.PRESENT),
    ),
    "switch": (
        _TextOption("source="),
        _TextOption("target="),
        _TextOption("freeze_cgroup="),
        _TextOption("device=", _Kind.DEVICE),
        _TextOption("ns_pid=", _Kind.PID),
    ),
    "status": (_TextOption("id="),),
}

_BUILDERS = {
    "mount": _build_mount,
    "mode": _build_mode,
    "replace": _build_replace,
    "switch": _build_switch,
    "status": _build_status,
}


def _text_value(option: _TextOption, raw: str) -> Any:
    if option.kind is _Kind.PID:
        return _decimal(option.name, raw, 2**31 - 1)
    if option.kind is _Kind.FLAGS:
        return _decimal(option.name, raw, 2**64 - 1)
    if option.kind is _Kind.DEVICE:
        return _decimal(option.name, raw, 2**64 - 1)
    if option.kind is _Kind.LIST:
        return raw.split(",")
    return raw


def _parse_text_options(command: str, text: str) -> _Options:
    table = _TEXT_OPTIONS[command]
    values: _Options = {}
    for token in text.split(";"):
        if not token:
            continue
        option = next((o for o in table if token.startswith(o.prefix)), None)
        if option is None:
            raise _invalid(f"unsupported option for {command}: {token[:80]!r}")
        if option.name in values:
            raise _invalid(f"duplicated {option.name} option")
        if option.kind is _Kind.PRESENT:
            values[option.name] = True
            continue
        raw = token[len(option.prefix):]
        if not raw:
            raise _invalid(f"option {option.name} is empty")
        values[option.name] = _text_value(option, raw)
    return values


def parse_text(packet: bytes) -> Request:
    head, _, blob = packet.partition(b"\0")
    text = head.decode("utf-8", "surrogateescape")
    command, _, options = text.partition(";")
    if command not in _BUILDERS:
        raise _invalid(f"unknown command {command[:40]!r}")
    values = _parse_text_options(command, options)
    if blob:
        if command != "replace":
            raise _invalid(f"{command} takes no data after the NUL")
        # vzcriu sends the data NUL-terminated; the terminator is not part of it.
        values["data"] = blob.rstrip(b"\0").decode("utf-8", "surrogateescape")
    return _BUILDERS[command](values)


# ---------------------------------------------------------------------------------------------
# the JSON form

_JSON_TYPES: dict[str, dict[str, type | tuple[type, ...]]] = {
    "mount": {"id": str, "mode": str, "mountpoint": str, "proxy_dir": str, "ns_pid": int,
              "root": str, "ns_mountpoint": str, "manifest": str},
    "mode": {"id": str, "mode": str, "proxy_dir": str, "ns_pid": int, "all": bool},
    "replace": {"id": str, "source": str, "type": str, "flags": int, "freeze_cgroup": str,
                "bindmounts": list, "mode": str, "all": bool, "data": str, "ns_pid": int,
                "ns_mountpoint": str, "path_map": dict, "remove_after": list},
    "switch": {"source": str, "target": str, "freeze_cgroup": str, "device": int,
               "ns_pid": int},
    "status": {"id": str},
}


def _check_json_field(command: str, name: str, value: Any) -> Any:
    expected = _JSON_TYPES[command].get(name)
    if expected is None:
        raise _invalid(f"unsupported field for {command}: {name[:80]!r}")
    # bool is an int in Python; a flag field must not accept true and a number field must not
    # accept a bool.
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
        raise _invalid(f"field {name} must be {expected.__name__}")
    if name == "flags" and not 0 <= value < 2**64:
        raise _invalid("flags out of range")
    if name == "device" and not 0 <= value < 2**64:
        raise _invalid("device out of range")
    if name == "ns_pid":
        _check_pid(name, value)
    if name == "bindmounts" and not all(isinstance(p, str) for p in value):
        raise _invalid("bindmounts must be a list of strings")
    if isinstance(value, str) and not value and name != "data":
        raise _invalid(f"option {name} is empty")
    return value


def parse_json(packet: bytes) -> Request:
    try:
        document = json.loads(packet.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _invalid(f"malformed JSON: {str(exc)[:120]}") from None
    if not isinstance(document, dict):
        raise _invalid("a JSON request must be an object")
    command = document.get("cmd")
    if not isinstance(command, str) or command not in _BUILDERS:
        raise _invalid(f"unknown command {str(command)[:40]!r}")
    values = {
        name: _check_json_field(command, name, value)
        for name, value in document.items()
        if name != "cmd" and value is not None
    }
    if values.get("all") is False:
        del values["all"]
    return _BUILDERS[command](values)


def is_json(packet: bytes) -> bool:
    return packet.lstrip(b" \t\r\n")[:1] == b"{"


def parse_packet(packet: bytes) -> ParsedPacket:
    """Parse one packet in whichever form it is; raises `RequestError`."""
    form = WireForm.JSON if is_json(packet) else WireForm.TEXT
    if len(packet) > MAX_PACKET_BYTES:
        raise RequestError(errno.EMSGSIZE, f"request larger than {MAX_PACKET_BYTES} bytes")
    if form is WireForm.JSON:
        return ParsedPacket(form, parse_json(packet))
    return ParsedPacket(form, parse_text(packet))


def form_of(packet: bytes) -> WireForm:
    return WireForm.JSON if is_json(packet) else WireForm.TEXT


# ---------------------------------------------------------------------------------------------
# replies


@dataclass
class Reply:
    code: int = 0  # 0 or a positive errno
    message: str = "ok"
    data: dict[str, Any] | None = field(default=None)

    @classmethod
    def error(cls, code: int, message: str) -> Reply:
        return cls(code=code, message=message)


def encode_text_reply(reply: Reply) -> bytes:
    """The C manager answers with one native int: 0 or a negative errno."""
    return (-reply.code).to_bytes(4, sys.byteorder, signed=True)


def decode_text_reply(packet: bytes) -> int:
    if len(packet) != 4:
        raise ValueError(f"a text reply is 4 bytes, got {len(packet)}")
    return int.from_bytes(packet, sys.byteorder, signed=True)


def encode_json_reply(reply: Reply) -> bytes:
    body = {
        "code": reply.code,
        "error": errno.errorcode.get(reply.code) if reply.code else None,
        "message": reply.message,
        "data": reply.data,
    }
    return json.dumps(body, sort_keys=True).encode("utf-8")


def encode_reply(form: WireForm, reply: Reply) -> bytes:
    return encode_json_reply(reply) if form is WireForm.JSON else encode_text_reply(reply)

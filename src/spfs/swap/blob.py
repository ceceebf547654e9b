"""The injected machine code (assembled from blob.S, kept here as bytes) and its data block.

`tests/swap/test_blob.py` re-assembles blob.S with GNU as, when available, and checks
the bytes below against it.  Offsets are those of the labels in blob.S.
"""

from __future__ import annotations

import struct

from spfs.swap.arch import UserRegs

CODE = bytes.fromhex(
    "4d85ed0f8490000000498b5c2438498b"
    "7c2408480fbae3017303488b3f498b74"
    "2410480fbae3027303488b36498b5424"
    "18480fbae3037303488b124d8b542420"
    "480fbae30473034d8b124d8b44242848"
    "0fbae30573034d8b004d8b4c2430480f"
    "bae30673034d8b09498b04240f054989"
    "442448498b4c24404885c97403488901"
    "483d01f0ffff7205f6c301740e4983c4"
    "5049ffcde967ffffff31c04889c34d85"
    "ff74144c89f74c89feb80b0000000f05"
    "eb050f054889c3b8ea000000488b3d3d"
    "000000488b353e000000488b153f0000"
    "000f05488d254e000000415f415e415d"
    "415c5d5b415b415a4159415858595a5e"
    "5f9d488b251f000000ff252100000090"
)

ENTRY_RUN = 0x00
ENTRY_SINGLE = 0xB2
MARKER_END = 0xD3
DATA = 0x100
SIZE = 0x1A8
TABLE_ENTRY_SIZE = 80

# Pop order of the epilogue, then rflags.
SAVED_ORDER = "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi eflags".split()

FLAG_ALLOW_FAIL = 1


def flag_indirect(arg_index: int) -> int:
    return 1 << (1 + arg_index)


def image(tgid: int, tid: int, marker_signal: int, resume: UserRegs) -> bytes:
    """The code plus a data block telling the epilogue how to resume the task."""
    data = struct.pack("<5Q", tgid, tid, marker_signal, resume.rsp, resume.rip)
    data += struct.pack("<16Q", *(getattr(resume, name) for name in SAVED_ORDER))
    out = CODE + data
    assert len(out) == SIZE
    return out

"""The injected machine code (assembled from blob.S, kept here as bytes) and its data block.

`tests/swap/test_blob.py` re-assembles blob.S with GNU as, when available, and checks
the bytes below against it.  Offsets are those of the labels in blob.S.
"""

from __future__ import annotations

import struct

from spfs.swap.arch import UserRegs

CODE = bytes.fromhex(
    "4d85ed0f84b4000000498b5c2438498b"
    "7c2408480fbae3017303488b3f498b74"
    "2410480fbae3027303488b36498b5424"
    "18480fbae3037303488b124d8b542420"
    "480fbae30473034d8b124d8b44242848"
    "0fbae30573034d8b004d8b4c2430480f"
    "bae30673034d8b09498b04240f054989"
    "442448498b4c24404885c97403488901"
    "483d01f0ffff730c4885c07524480fba"
    "e307731df6c30175184889d948c1e920"
    "741d486bd1504901d44929cde94fffff"
    "ff4983c45049ffcde943ffffff31c048"
    "89c34d85ff74144c89f74c89feb80b00"
    "00000f05eb050f054889c3b8ea000000"
    "488b3d41000000488b3542000000488b"
    "15430000000f05488d2552000000415f"
    "415e415d415c5d5b415b415a41594158"
    "58595a5e5f9d488b2523000000ff2525"
    "0000000f1f440000"
)

ENTRY_RUN = 0x00
LOOP_SYSCALL_END = 0x6E  # rip of a task stopped by a signal sent by a table entry
ENTRY_SINGLE = 0xD6
MARKER_END = 0xF7
DATA = 0x128
SIZE = 0x1D0
TABLE_ENTRY_SIZE = 80

# Pop order of the epilogue, then rflags.
SAVED_ORDER = "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi eflags".split()

FLAG_ALLOW_FAIL = 1
FLAG_ZERO_FAILS = 1 << 7
SKIP_SHIFT = 32  # flags bits 32-63: entries to skip forward on failure


def flag_indirect(arg_index: int) -> int:
    return 1 << (1 + arg_index)


def image(tgid: int, tid: int, marker_signal: int, resume: UserRegs) -> bytes:
    """The code plus a data block telling the epilogue how to resume the task."""
    data = struct.pack("<5Q", tgid, tid, marker_signal, resume.rsp, resume.rip)
    data += struct.pack("<16Q", *(getattr(resume, name) for name in SAVED_ORDER))
    out = CODE + data
    assert len(out) == SIZE
    return out

"""The embedded machine code matches blob.S, and the table layout matches the loop's offsets."""

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from spfs.swap import blob
from spfs.swap.table import Addr, Load, SyscallTable

BLOB_S = Path(blob.__file__).with_name("blob.S")


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("objcopy") is None,
                    reason="GNU binutils not installed")
def test_code_bytes_match_assembled_source(tmp_path):
    obj = tmp_path / "blob.o"
    raw = tmp_path / "blob.bin"
    subprocess.run(["as", "--64", "-o", str(obj), str(BLOB_S)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(raw)], check=True)
    assembled = raw.read_bytes()
    assert assembled[: len(blob.CODE)] == blob.CODE
    assert len(assembled) == blob.SIZE
    symbols = subprocess.run(["nm", str(obj)], check=True, capture_output=True, text=True).stdout
    offsets = {line.split()[2]: int(line.split()[0], 16) for line in symbols.splitlines()}
    assert offsets["single"] == blob.ENTRY_SINGLE
    assert offsets["marker_end"] == blob.MARKER_END
    assert offsets["data"] == blob.DATA
    assert offsets["loop_syscall_end"] == blob.LOOP_SYSCALL_END


def test_table_serialization_resolves_slots_and_indirect_arguments():
    table = SyscallTable()
    slot = table.slot()
    table.call(434, 1234, 0, store=slot)
    table.call(3, Load(slot), allow_fail=True)
    path = table.blob(b".\0")
    table.call(161, Addr(path))
    base = 0x10000
    data = table.serialize(base)
    entries = [struct.unpack_from("<10Q", data, i * blob.TABLE_ENTRY_SIZE) for i in range(3)]
    data_start = base + 3 * blob.TABLE_ENTRY_SIZE
    assert entries[0][0] == 434 and entries[0][8] == data_start + slot.offset
    assert entries[1][1] == data_start + slot.offset
    assert entries[1][7] == blob.FLAG_ALLOW_FAIL | blob.flag_indirect(0)
    assert entries[2][1] == data_start + path.offset and entries[2][7] == 0
    assert data[3 * blob.TABLE_ENTRY_SIZE + path.offset:][:2] == b".\0"


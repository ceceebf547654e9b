"""A table of syscalls for the injected loop (see blob.S), built before its address is known.

Arguments are plain integers, `Addr(ref)` (the address of a slot or data item) or
`Load(ref)` (the value stored in a slot when the entry runs: how an fd returned by one
entry is used by the next).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from spfs.swap import blob


@dataclass(frozen=True)
class Ref:
    offset: int  # from the start of the data area


@dataclass(frozen=True)
class Addr:
    ref: Ref


@dataclass(frozen=True)
class Load:
    ref: Ref


Arg = int | Addr | Load


@dataclass
class Entry:
    nr: int
    args: tuple[Arg, ...]
    store: Ref | None
    allow_fail: bool
    what: str


@dataclass
class SyscallTable:
    entries: list[Entry] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    marks: dict[str, int] = field(default_factory=dict)  # name -> index of the entry that makes it happen
    critical: list[tuple[int, int]] = field(default_factory=list)  # [lo, hi) entries that always run to the end

    def mark(self, name: str) -> None:
        self.marks[name] = len(self.entries) - 1

    def done_marks(self, failed_index: int | None) -> set[str]:
        """Names whose entry ran (all of them when failed_index is None)."""
        return {m for m, i in self.marks.items() if failed_index is None or i < failed_index}

    def slot(self) -> Ref:
        return self.blob(bytes(8))

    def blob(self, payload: bytes) -> Ref:
        while len(self.data) % 8:
            self.data.append(0)
        ref = Ref(len(self.data))
        self.data += payload
        return ref

    def call(self, nr: int, *args: Arg, store: Ref | None = None, allow_fail: bool = False,
             what: str = "") -> int:
        if len(args) > 6:
            raise ValueError("a syscall takes at most 6 arguments")
        self.entries.append(Entry(nr, args, store, allow_fail, what or f"syscall {nr}"))
        return len(self.entries) - 1

    def extend(self, other: "SyscallTable") -> None:
        """Append another table's entries, relocating its data behind ours."""
        while len(self.data) % 8:
            self.data.append(0)
        shift = len(self.data)
        self.data += other.data

        def move(value):
            if isinstance(value, Addr):
                return Addr(Ref(value.ref.offset + shift))
            if isinstance(value, Load):
                return Load(Ref(value.ref.offset + shift))
            return value

        for e in other.entries:
            store = Ref(e.store.offset + shift) if e.store else None
            self.entries.append(Entry(e.nr, tuple(move(a) for a in e.args), store, e.allow_fail, e.what))

    @property
    def size(self) -> int:
        return len(self.entries) * blob.TABLE_ENTRY_SIZE + len(self.data)

    def data_address(self, base: int, ref: Ref) -> int:
        return base + len(self.entries) * blob.TABLE_ENTRY_SIZE + ref.offset

    def compile(self) -> tuple[array, list[int]]:
        """Entry words laid out for base 0, plus the indices of the words holding addresses.

        Done once per table (before the stop); serialize() then only adds the base."""
        words = array("Q")
        relocs: list[int] = []
        data_start = len(self.entries) * blob.TABLE_ENTRY_SIZE
        for entry in self.entries:
            flags = blob.FLAG_ALLOW_FAIL if entry.allow_fail else 0
            words.append(entry.nr)
            for index, arg in enumerate(entry.args + (0,) * (6 - len(entry.args))):
                if isinstance(arg, (Load, Addr)):
                    if isinstance(arg, Load):
                        flags |= blob.flag_indirect(index)
                    relocs.append(len(words))
                    words.append(data_start + arg.ref.offset)
                else:
                    words.append(arg & 0xFFFFFFFFFFFFFFFF)
            words.append(flags)
            if entry.store is not None:
                relocs.append(len(words))
                words.append(data_start + entry.store.offset)
            else:
                words.append(0)
            words.append(0)
        self._compiled = (words, relocs, len(self.entries), len(self.data))
        return words, relocs

    def serialize(self, base: int) -> bytes:
        compiled = getattr(self, "_compiled", None)
        if compiled is None or compiled[2:] != (len(self.entries), len(self.data)):
            self.compile()
        words, relocs = self._compiled[0], self._compiled[1]
        out = array("Q", words)
        for index in relocs:
            out[index] += base
        return out.tobytes() + bytes(self.data)

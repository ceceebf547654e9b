"""A table of syscalls for the injected loop (see blob.S), built before its address is known.

Arguments are plain integers, `Addr(ref)` (the address of a slot or data item),
`Load(ref)` (the value stored in a slot when the entry runs: how an fd returned by one
entry is used by the next) or `Late(name)` (a value known only at injection time, given
to serialize()).  An entry may name a label to skip forward to when it fails (`jump`):
the loop's only branch.
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


@dataclass(frozen=True)
class Late:
    name: str


Arg = int | Addr | Load | Late
END = "end"  # the label past the last entry
PARK_OK, PARK_FAILED = "park ok", "park failed"  # where commit tables stop for the manager (tables.py)


@dataclass
class Entry:
    nr: int
    args: tuple[Arg, ...]
    store: Ref | None
    allow_fail: bool
    what: str
    jump: str | None = None  # label to continue at when this entry fails
    zero_fails: bool = False  # a result of 0 is a failure too
    branch: bool = False  # fails on purpose (control flow), not a real failure


@dataclass
class SyscallTable:
    entries: list[Entry] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    labels: dict[str, int] = field(default_factory=dict)  # name -> index of the entry it names
    boundaries: list[int] = field(default_factory=list)  # entries starting a step (no temporary fd open)

    def label(self, name: str) -> None:
        self.labels[name] = len(self.entries)

    def slot(self) -> Ref:
        """8 bytes holding -1 until an entry stores into it: a never-filled fd slot is EBADF."""
        return self.blob(b"\xff" * 8)

    def skip_to(self, label: str, what: str) -> None:
        """An entry that always fails (close(-1)) and so continues at `label`: a plain jump."""
        self.entries.append(Entry(3, (-1,), None, False, what, jump=label, branch=True))

    def blob(self, payload: bytes) -> Ref:
        while len(self.data) % 8:
            self.data.append(0)
        ref = Ref(len(self.data))
        self.data += payload
        return ref

    def call(self, nr: int, *args: Arg, store: Ref | None = None, allow_fail: bool = False,
             what: str = "", jump: str | None = None, zero_fails: bool = False) -> int:
        if len(args) > 6:
            raise ValueError("a syscall takes at most 6 arguments")
        self.entries.append(Entry(nr, args, store, allow_fail, what or f"syscall {nr}", jump, zero_fails))
        return len(self.entries) - 1

    def first_failure(self, results: list[int]) -> int | None:
        """Index of the first real failure, given each entry's result (read back from the task)."""
        for index, (entry, result) in enumerate(zip(self.entries, results)):
            if entry.allow_fail or entry.branch:
                continue
            if -4096 < result < 0 or (result == 0 and entry.zero_fails):
                return index
        return None

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
            self.entries.append(Entry(e.nr, tuple(move(a) for a in e.args), store, e.allow_fail, e.what,
                                      e.jump, e.zero_fails, e.branch))

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
        late: list[tuple[int, str]] = []
        data_start = len(self.entries) * blob.TABLE_ENTRY_SIZE
        labels = {**self.labels, END: len(self.entries)}
        for position, entry in enumerate(self.entries):
            flags = blob.FLAG_ALLOW_FAIL if entry.allow_fail else 0
            if entry.zero_fails:
                flags |= blob.FLAG_ZERO_FAILS
            if entry.jump is not None:
                skip = labels[entry.jump] - position
                if skip <= 0:
                    raise ValueError(f"entry {position} ({entry.what}) jumps backwards to {entry.jump}")
                flags |= skip << blob.SKIP_SHIFT
            words.append(entry.nr)
            for index, arg in enumerate(entry.args + (0,) * (6 - len(entry.args))):
                if isinstance(arg, (Load, Addr)):
                    if isinstance(arg, Load):
                        flags |= blob.flag_indirect(index)
                    relocs.append(len(words))
                    words.append(data_start + arg.ref.offset)
                elif isinstance(arg, Late):
                    late.append((len(words), arg.name))
                    words.append(0)
                else:
                    words.append(arg & 0xFFFFFFFFFFFFFFFF)
            words.append(flags)
            if entry.store is not None:
                relocs.append(len(words))
                words.append(data_start + entry.store.offset)
            else:
                words.append(0)
            words.append(0)
        self._compiled = (words, relocs, late, len(self.entries), len(self.data))
        return words, relocs

    def serialize(self, base: int, late: dict[str, int] | None = None) -> bytes:
        compiled = getattr(self, "_compiled", None)
        if compiled is None or compiled[3:] != (len(self.entries), len(self.data)):
            self.compile()
        words, relocs, late_words = self._compiled[0], self._compiled[1], self._compiled[2]
        out = array("Q", words)
        for index in relocs:
            out[index] += base
        for index, name in late_words:
            out[index] = late[name] & 0xFFFFFFFFFFFFFFFF
        return out.tobytes() + bytes(self.data)

"""Bytes of a restore-mode file: zeros, a content source, or a private memfd once written.

Nothing is materialised until someone writes or truncates, so a manifest can describe huge
files at no cost. The first modification copies the base bytes into a memfd (sparse: zero
ranges cost nothing) and all later I/O goes there.
"""

from __future__ import annotations

import os


class FileContent:
    def __init__(self, size: int = 0, source: str | None = None) -> None:
        self.size = size
        self.source = source
        self._source_fd: int | None = None
        self._memfd: int | None = None

    def _source_descriptor(self) -> int:
        if self._source_fd is None:
            assert self.source is not None
            self._source_fd = os.open(self.source, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        return self._source_fd

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        if self._memfd is not None:
            data = os.pread(self._memfd, length, offset)
        elif self.source is not None:
            data = os.pread(self._source_descriptor(), length, offset)
        else:
            return bytes(length)
        # A source shorter than the declared size reads as zeros past its end.
        return data if len(data) == length else data + bytes(length - len(data))

    def _materialise(self) -> int:
        if self._memfd is None:
            memfd = os.memfd_create("spfs-restore", os.MFD_CLOEXEC)
            try:
                if self.source is not None:
                    src = self._source_descriptor()
                    copied = 0
                    while copied < self.size:
                        chunk = os.pread(src, min(1 << 20, self.size - copied), copied)
                        if not chunk:
                            break
                        os.pwrite(memfd, chunk, copied)
                        copied += len(chunk)
                os.ftruncate(memfd, self.size)
            except BaseException:
                os.close(memfd)
                raise
            self._memfd = memfd
            self._close_source()
        return self._memfd

    def write(self, offset: int, data: bytes) -> int:
        written = os.pwrite(self._materialise(), data, offset)
        self.size = max(self.size, offset + written)
        return written

    def truncate(self, size: int) -> None:
        if self._memfd is None and self.source is None:
            self.size = size  # still all zeros: nothing to store
            return
        os.ftruncate(self._materialise(), size)
        self.size = size

    def _close_source(self) -> None:
        if self._source_fd is not None:
            os.close(self._source_fd)
            self._source_fd = None

    def close(self) -> None:
        self._close_source()
        if self._memfd is not None:
            os.close(self._memfd)
            self._memfd = None

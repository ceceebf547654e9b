"""Linux system calls Python lacks, shared by every package (ctypes, errno as OSError)."""

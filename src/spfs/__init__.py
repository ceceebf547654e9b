"""spfs: NFS mount migration for containers checkpointed and restored with CRIU."""

__version__ = "0.1.0"

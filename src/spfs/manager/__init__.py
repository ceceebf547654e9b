"""spfs-manager."""

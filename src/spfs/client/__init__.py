"""spfs-client."""

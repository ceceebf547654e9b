"""spfs."""

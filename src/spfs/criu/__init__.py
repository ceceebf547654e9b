"""criu-spfs."""

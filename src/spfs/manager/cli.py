"""Command line of spfs-manager (placeholder until its issue lands)."""

import sys

from spfs.placeholder import not_implemented


def main() -> int:
    return not_implemented("spfs-manager")


if __name__ == "__main__":
    sys.exit(main())

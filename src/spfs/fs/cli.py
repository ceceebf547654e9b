"""Command line of spfs (placeholder until its issue lands)."""

import sys

from spfs.placeholder import not_implemented


def main() -> int:
    return not_implemented("spfs")


if __name__ == "__main__":
    sys.exit(main())

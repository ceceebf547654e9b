"""Entry point for commands whose issue has not landed yet."""

import sys


def not_implemented(name: str) -> int:
    print(f"{name}: not implemented yet", file=sys.stderr)
    return 2

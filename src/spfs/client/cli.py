"""`spfs-client`: command line for the SPFS control socket (and, later, the manager).

Each subcommand is a module `spfs.client.<name>_cmd` defining NAME, HELP,
add_arguments(parser) and run(args) -> exit code. Modules are discovered at start, so a
new subcommand is one new file and nothing here changes.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType

import spfs.client


def subcommand_modules() -> list[ModuleType]:
    names = sorted(info.name for info in pkgutil.iter_modules(spfs.client.__path__)
                   if info.name.endswith("_cmd"))
    return [importlib.import_module(f"spfs.client.{name}") for name in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spfs-client", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in subcommand_modules():
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())

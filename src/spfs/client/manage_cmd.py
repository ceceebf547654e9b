"""`spfs-client manage`: one raw request (C text form or JSON) to spfs-manager."""

from spfs.manager.client_cmd import MANAGE_HELP as HELP
from spfs.manager.client_cmd import add_manage_arguments as add_arguments
from spfs.manager.client_cmd import run_manage as run

NAME = "manage"
__all__ = ["NAME", "HELP", "add_arguments", "run"]

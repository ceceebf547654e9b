"""Live reference swap: move what running processes hold on mount A to mount B (x86-64)."""

from spfs.swap.api import abandon, commit, discover, prepare, settle, switch
from spfs.swap.engine import FailPoint
from spfs.swap.model import (FreezerLeft, ListenerBusy, RefreezeFailed, SwapChanged, SwapError, SwapPlan, SwapReport, TasksPending,
                             ThawFailed)

__all__ = ["FailPoint", "FreezerLeft", "ListenerBusy", "RefreezeFailed", "SwapChanged", "SwapError", "SwapPlan", "SwapReport",
           "TasksPending", "ThawFailed", "abandon", "commit", "discover", "prepare", "settle", "switch"]

"""Live reference swap: move what running processes hold on mount A to mount B (x86-64)."""

from spfs.swap.api import abandon, commit, discover, prepare, switch
from spfs.swap.engine import FailPoint
from spfs.swap.model import SwapError, SwapPlan, SwapReport

__all__ = ["FailPoint", "SwapError", "SwapPlan", "SwapReport", "abandon", "commit", "discover", "prepare", "switch"]

"""Concrete kinds. Importing a module registers its kind; add new kinds to the list below."""

from .dense import Dense
from .kronecker import Kronecker
from .lowrank import LowRank
from .monarch import Monarch
from .nystrom import Nystrom
from .sketched import Sketched
from .tt import TT

__all__ = ["Dense", "Kronecker", "LowRank", "Monarch", "Nystrom", "Sketched", "TT"]

"""Concrete kinds. Importing a module registers its kind; add new kinds to the list below."""

from .cp import CP
from .dense import Dense
from .kronecker import Kronecker
from .lowrank import LowRank
from .monarch import Monarch
from .nystrom import Nystrom
from .sketched import Sketched
from .tt import TT
from .tucker import Tucker

__all__ = ["CP", "Dense", "Kronecker", "LowRank", "Monarch", "Nystrom", "Sketched", "TT", "Tucker"]

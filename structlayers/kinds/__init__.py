"""Concrete kinds. Importing a module registers its kind; add new kinds to the list below."""

from .dense import Dense
from .kronecker import Kronecker
from .lowrank import LowRank
from .nystrom import Nystrom

__all__ = ["Dense", "Kronecker", "LowRank", "Nystrom"]

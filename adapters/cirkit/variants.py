"""Old home of :mod:`adapters.cirkit.bench.variants`; re-exports it for one release."""

from .bench.config import default_ranks
from .bench.variants import (
    CIRKIT_MATERIALISED,
    CIRKIT_OPTIMIZED,
    CIRKIT_OPTIMIZED_LINEAR,
    EXACT,
    EXACT_SEMIRING,
    Variant,
    circuit_variants,
    swapped,
)

__all__ = ["CIRKIT_MATERIALISED", "CIRKIT_OPTIMIZED", "CIRKIT_OPTIMIZED_LINEAR", "EXACT", "EXACT_SEMIRING",
           "Variant", "circuit_variants", "swapped", "default_ranks"]

"""Time of the squared digits circuit: log c²(x) of a batch, log Z, and log Z with its gradient.

Every variant ``adapters.cirkit.variants.circuit_variants`` returns for one fixed
configuration (``_circuits.VARIANTS``: cirkit's materialised path, cirkit's
optimize=True path and the exact ``kronecker`` swap, each in cirkit's log-space and the
adapter's linear-space evaluation, and lowrank / nystrom approximations, square and flat,
at ranks 2 and 4), at K = 8 and 16 units per layer of ``c`` (K² in ``c²``). The circuits are untrained (``seed=0``): timings do not depend on the values.
``x`` is a batch of 64 random digits. See ``_circuits.py`` for the grid and the cache.
"""

from . import _circuits as circuits


class SquaredDigits(circuits.DigitsCase):
    """``digits_squared_circuit(K)`` compiled in complex-lse-sum, folded, float32."""

    # One call per sample (asv gives a benchmark with a setup number=1). Per process
    # (2 rounds = 2 processes): at least 1 sample, up to 10, stopping after 1 s; fast calls
    # get 20 samples in all, the slowest (cirkit's log c²(x) at K=16, 0.2-0.5 s) 6 to 10.
    repeat = (1, 10, 1.0)

    def time_log_density(self, cache, variant, k):
        circuits.log_density(self.model, self.x)

    def time_log_partition(self, cache, variant, k):
        circuits.log_partition(self.model)

    def time_log_partition_backward(self, cache, variant, k):
        circuits.log_partition_backward(self.model, self.params)

"""Peak memory of exactly one circuit call, in MiB: log c²(x) of a batch, log Z, log Z + gradient.

The grid and the calls of ``circuits.py`` (every variant of ``_circuits.VARIANTS`` at
K = 8 and 16, untrained circuits, 64 random digits). Measured as in ``memory.py``:
``structlayers.benchmarking.peak_rss_mib`` resets the kernel's high-water mark just
before the call and reports how far it rose above the resident memory before it.
Counts the output, intermediate tensors (cirkit's materialised Kronecker weights
included) and, for the backward, saved activations and gradients; not the model or
the input. Linux with glibc only (skipped elsewhere).
"""

from . import _circuits as circuits


class SquaredDigits(circuits.DigitsCase):
    """``digits_squared_circuit(K)`` compiled in complex-lse-sum, folded, float32."""

    unit = "MiB"

    def track_log_density(self, cache, variant, k):
        return circuits.common.peak_rss_mib(lambda: circuits.log_density(self.model, self.x))

    def track_log_partition(self, cache, variant, k):
        return circuits.common.peak_rss_mib(lambda: circuits.log_partition(self.model))

    def track_log_partition_backward(self, cache, variant, k):
        return circuits.common.peak_rss_mib(
            lambda: circuits.log_partition_backward(self.model, self.params))

"""Peak memory of exactly one forward, and one forward + backward, in MiB.

Not asv's ``peakmem_`` benchmarks: those report the peak RSS of the whole
process (``import torch`` alone is ~250 MiB) and cannot isolate one call.
Here ``_common.peak_rss_mib`` resets the kernel's high-water mark just before
the call and reports how far it rose above the resident memory before it (see
its docstring). Includes the output (and for the backward the saved
activations and the gradients of the input and the parameters); excludes the
layer and the input, which exist before the call. Linux only (skipped elsewhere).
"""

from . import _common as common


class _PeakMemory:
    unit = "MiB"

    def track_forward(self, cache, kind, rank, size):
        return common.peak_rss_mib(lambda: common.forward(self.layer, self.x))

    def track_forward_backward(self, cache, kind, rank, size):
        return common.peak_rss_mib(
            lambda: common.forward_backward(self.layer, self.x_grad, self.grad_inputs))


class KroneckerInput(_PeakMemory, common.KroneckerCase):
    """Layers from ``structlayers.from_kronecker``; size is K (W is K^2 x K^2)."""


class DenseInput(_PeakMemory, common.DenseCase):
    """Layers from ``structlayers.from_dense``; size is n (W is n x n)."""

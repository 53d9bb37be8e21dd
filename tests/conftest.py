"""Suite-wide settings.

One torch thread: results are bit-reproducible, and the many small LAPACK calls
the constructors make do not pay OpenMP start-up and contention costs (on a
busy 2-core machine those made a 64 x 64 SVD 300x slower than single-threaded).
"""

import torch

torch.set_num_threads(1)

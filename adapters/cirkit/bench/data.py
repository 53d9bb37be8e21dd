"""Data for the benchmark circuits, as integer tensors; nothing is ever downloaded.

* :func:`digits_data`: scikit-learn's bundled 8x8 digits (values 0..16), split by class.
* :func:`load_mnist`: MNIST from local IDX files (optionally gzipped) or an ``.npz``.
* :func:`pool_images`, :func:`pooled_splits`: average-pool flattened images by a factor.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from pathlib import Path
from typing import NamedTuple, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["DataSplits", "digits_data", "load_mnist", "pool_images", "pooled_splits",
           "DIGITS_SHAPE", "DIGITS_CATEGORIES", "DIGITS_CLASSES", "MNIST_SHAPE", "MNIST_CATEGORIES"]

DIGITS_SHAPE = (8, 8)
DIGITS_CATEGORIES = 17
DIGITS_CLASSES = 10
MNIST_SHAPE = (28, 28)
MNIST_CATEGORIES = 256


class DataSplits(NamedTuple):
    """Train/test splits: ``x_*`` integer tensors ``(N, D)`` (or ``(N, H, W)``), ``y_*`` LongTensor ``(N,)``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def digits_data(seed: int = 0, test_fraction: float = 0.2) -> DataSplits:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), split by class.

    Returns:
        :class:`DataSplits` with ``x_*`` LongTensor ``(N, 64)``, values 0..16 (row-major
        pixels), ``y_*`` LongTensor ``(N,)`` in 0..9. The split is stratified by label
        and a function of ``seed`` only; ``N_test = round(1797 · test_fraction)`` up to
        per-class rounding.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - sklearn is a test dependency
        raise ImportError("digits_data needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    x = torch.as_tensor(d.data).round().long()
    y = torch.as_tensor(d.target).long()
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for cls in torch.unique(y).tolist():
        idx = torch.nonzero(y == cls).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = int(round(idx.numel() * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr = torch.cat(train_idx)
    te = torch.cat(test_idx)
    tr = tr[torch.randperm(tr.numel(), generator=g)]
    te = te[torch.randperm(te.numel(), generator=g)]
    return DataSplits(x[tr], y[tr], x[te], y[te])


_IDX_TYPES = {0x08: ("B", 1), 0x09: ("b", 1), 0x0B: (">h", 2), 0x0C: (">i", 4),
              0x0D: (">f", 4), 0x0E: (">d", 8)}
_MNIST_FILES = {
    "x_train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "y_train": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "x_test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "y_test": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _read_idx(path: Path) -> Tensor:
    """Parse one IDX file (optionally gzip-compressed) into a uint8 tensor."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"corrupt IDX file {path}: cannot read it ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"corrupt IDX file {path}: bad magic number {raw[:4].hex() or '(empty)'}")
    type_code, ndim = raw[2], raw[3]
    if type_code != 0x08:
        known = "known but unsupported" if type_code in _IDX_TYPES else "unknown"
        raise ValueError(f"corrupt IDX file {path}: data type 0x{type_code:02x} is {known}; MNIST uses unsigned bytes (0x08)")
    if ndim < 1 or len(raw) < 4 + 4 * ndim:
        raise ValueError(f"corrupt IDX file {path}: truncated header ({ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    expected = math.prod(dims)
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(
            f"corrupt IDX file {path}: header says {'x'.join(map(str, dims))} = {expected} bytes, "
            f"file holds {len(body)}"
        )
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def _find_idx(root: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        for suffix in ("", ".gz"):
            p = root / (name + suffix)
            if p.is_file():
                return p
    return None


def load_mnist(
    path: str | os.PathLike[str],
    *,
    flatten: bool = True,
    dtype: torch.dtype = torch.uint8,
) -> DataSplits:
    """Read MNIST from local files; never downloads.

    ``path`` is either

    * a directory holding the four IDX files ``train-images-idx3-ubyte``,
      ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``
      (each optionally ``.gz``; the ``train-images.idx3-ubyte`` spelling is accepted too),
      or, failing that, a file ``mnist.npz`` in it; or
    * an ``.npz`` file with arrays ``x_train, y_train, x_test, y_test`` (Keras layout).

    Returns:
        :class:`DataSplits`: ``x_*`` of shape ``(N, H·W)`` (``flatten``) or ``(N, H, W)``,
        values 0..255, in ``dtype`` (uint8 by default: 70k images as int64 would take
        440 MB; :func:`train_squared_circuit` converts batches to long), ``y_*`` LongTensor.

    Raises:
        FileNotFoundError: the path or some of the files do not exist (names listed).
        ValueError: a file is corrupt (bad magic, truncated, not gzip, wrong shapes, image
            and label counts differ, missing npz keys).
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"MNIST path {root} does not exist (load_mnist never downloads)")
    arrays: dict[str, Tensor] = {}
    if root.is_file():
        if root.suffix != ".npz":
            raise ValueError(f"MNIST file {root} is not an .npz file; pass an .npz or a directory of IDX files")
        arrays = _read_mnist_npz(root)
        source = str(root)
    else:
        found = {key: _find_idx(root, names) for key, names in _MNIST_FILES.items()}
        missing = [names[0] for key, names in _MNIST_FILES.items() if found[key] is None]
        if missing and (root / "mnist.npz").is_file() and len(missing) == len(_MNIST_FILES):
            arrays = _read_mnist_npz(root / "mnist.npz")
            source = str(root / "mnist.npz")
        elif missing:
            raise FileNotFoundError(
                f"MNIST files missing in {root}: {', '.join(missing)} (optionally .gz), or put "
                "an mnist.npz there; load_mnist never downloads"
            )
        else:
            arrays = {key: _read_idx(p) for key, p in found.items() if p is not None}
            source = str(root)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dim() != 3:
            raise ValueError(f"MNIST {split} images in {source} must be (N, H, W), got shape {tuple(x.shape)}")
        if y.dim() != 1:
            raise ValueError(f"MNIST {split} labels in {source} must be (N,), got shape {tuple(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"MNIST {split} split in {source}: {x.shape[0]} images but {y.shape[0]} labels"
            )

    def prep(x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1) if flatten else x
        return x.to(dtype)

    return DataSplits(prep(arrays["x_train"]), arrays["y_train"].long(),
                      prep(arrays["x_test"]), arrays["y_test"].long())


def _read_mnist_npz(path: Path) -> dict[str, Tensor]:
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("it holds a single array, not named arrays")
            present = list(z.files)
            raw = {k: z[k] for k in _MNIST_FILES if k in present}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        # np.load raises ValueError ("pickled data") for files that are not archives
        raise ValueError(f"corrupt MNIST npz {path}: {e}") from e
    missing = [k for k in _MNIST_FILES if k not in raw]
    if missing:
        raise ValueError(
            f"MNIST npz {path} lacks arrays {', '.join(missing)} (has {', '.join(present) or 'none'})"
        )
    out = {}
    for k, a in raw.items():
        if a.dtype.kind not in "ui" or (a.size and (a.min() < 0 or a.max() > 255)):
            raise ValueError(f"MNIST npz {path}: {k} must hold integers in 0..255, got dtype {a.dtype}")
        out[k] = torch.from_numpy(np.ascontiguousarray(a).astype(np.uint8 if k.startswith("x") else np.int64))
    return out


def pool_images(x: Tensor, shape: Tuple[int, int], factor: int) -> Tensor:
    """Average-pool flattened images ``(N, H·W)`` by ``factor`` -> ``(N, H/f · W/f)``;
    values are rounded back to integer categories."""
    if factor == 1:
        return x
    h, w = shape
    img = x.reshape(-1, 1, h, w).double()
    pooled = torch.nn.functional.avg_pool2d(img, factor)
    return pooled.round().long().reshape(x.shape[0], -1)


def pooled_splits(data: DataSplits, shape: Tuple[int, int], factor: int) -> DataSplits:
    """:func:`pool_images` applied to both splits' images."""
    return DataSplits(pool_images(data.x_train, shape, factor), data.y_train,
                      pool_images(data.x_test, shape, factor), data.y_test)

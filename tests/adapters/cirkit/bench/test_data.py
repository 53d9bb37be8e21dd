"""Digits and MNIST loading, pooling (adapters.cirkit.bench.data)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.cirkit.bench.data import DataSplits, digits_data, load_mnist


# ----------------------------------------------------------------------------- data


def test_digits_data_splits():
    d = digits_data(seed=0, test_fraction=0.25)
    assert d.x_train.dtype == d.x_test.dtype == d.y_train.dtype == torch.long
    assert d.x_train.shape[1] == d.x_test.shape[1] == 64
    assert d.x_train.shape[0] + d.x_test.shape[0] == 1797
    assert abs(d.x_test.shape[0] - 0.25 * 1797) < 10
    assert int(d.x_train.min()) == 0 and int(d.x_train.max()) == 16
    assert set(d.y_test.tolist()) == set(range(10))
    again, other = digits_data(seed=0, test_fraction=0.25), digits_data(seed=1, test_fraction=0.25)
    assert all(torch.equal(u, v) for u, v in zip(d, again))
    assert not torch.equal(d.x_test, other.x_test)
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        digits_data(test_fraction=1.0)


def write_idx(path: Path, array: np.ndarray) -> None:
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


@pytest.fixture
def mnist_arrays():
    rng = np.random.default_rng(0)
    return dict(x_train=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
                y_train=rng.integers(0, 10, 5, dtype=np.uint8),
                x_test=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
                y_test=rng.integers(0, 10, 3, dtype=np.uint8))


def write_mnist_dir(root: Path, arrays, gz_train: bool = True) -> None:
    root.mkdir(exist_ok=True)
    ext = ".gz" if gz_train else ""
    write_idx(root / f"train-images-idx3-ubyte{ext}", arrays["x_train"])
    write_idx(root / f"train-labels-idx1-ubyte{ext}", arrays["y_train"])
    write_idx(root / "t10k-images-idx3-ubyte", arrays["x_test"])
    write_idx(root / "t10k-labels-idx1-ubyte", arrays["y_test"])


def check_mnist(d: DataSplits, arrays, flatten: bool = True) -> None:
    shape = (-1, 784) if flatten else (-1, 28, 28)
    for key in ("x_train", "x_test"):
        got = getattr(d, key)
        assert got.dtype == torch.uint8
        assert np.array_equal(got.numpy(), arrays[key].reshape(shape))
    for key in ("y_train", "y_test"):
        got = getattr(d, key)
        assert got.dtype == torch.long and np.array_equal(got.numpy(), arrays[key])


def test_load_mnist_idx_directory(tmp_path, mnist_arrays):
    write_mnist_dir(tmp_path / "m", mnist_arrays)
    check_mnist(load_mnist(tmp_path / "m"), mnist_arrays)
    check_mnist(load_mnist(str(tmp_path / "m"), flatten=False), mnist_arrays, flatten=False)
    assert load_mnist(tmp_path / "m", dtype=torch.long).x_train.dtype == torch.long


def test_load_mnist_npz(tmp_path, mnist_arrays):
    np.savez(tmp_path / "mnist.npz", **mnist_arrays)
    check_mnist(load_mnist(tmp_path / "mnist.npz"), mnist_arrays)
    check_mnist(load_mnist(tmp_path), mnist_arrays)  # a directory holding only mnist.npz


def test_load_mnist_missing_files(tmp_path, mnist_arrays):
    with pytest.raises(FileNotFoundError, match="does not exist .*never downloads"):
        load_mnist(tmp_path / "nowhere")
    write_mnist_dir(tmp_path / "m", mnist_arrays)
    (tmp_path / "m" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="missing in .*: t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte, train-labels-idx1-ubyte"):
        load_mnist(tmp_path / "empty")


@pytest.mark.parametrize("corruption,message", [
    ("magic", "bad magic number"),
    ("truncated", r"header says 5x28x28 = 3920 bytes, file holds 3900"),
    ("dtype", "data type 0x0d is known but unsupported"),
    ("gzip", "cannot read it"),
    ("count", "5 images but 4 labels"),
])
def test_load_mnist_corrupt_idx(tmp_path, mnist_arrays, corruption, message):
    root = tmp_path / "m"
    write_mnist_dir(root, mnist_arrays, gz_train=False)
    images = root / "train-images-idx3-ubyte"
    raw = images.read_bytes()
    if corruption == "magic":
        images.write_bytes(b"\x01\x02" + raw[2:])
    elif corruption == "truncated":
        images.write_bytes(raw[:-20])
    elif corruption == "dtype":
        images.write_bytes(raw[:2] + b"\x0d" + raw[3:])
    elif corruption == "gzip":
        images.unlink()
        (root / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip data")
    else:
        write_idx(root / "train-labels-idx1-ubyte", mnist_arrays["y_train"][:4])
    with pytest.raises(ValueError, match=message):
        load_mnist(root)


def test_load_mnist_corrupt_npz(tmp_path, mnist_arrays):
    np.savez(tmp_path / "partial.npz", x_train=mnist_arrays["x_train"], y_train=mnist_arrays["y_train"])
    with pytest.raises(ValueError, match="lacks arrays x_test, y_test"):
        load_mnist(tmp_path / "partial.npz")
    (tmp_path / "junk.npz").write_bytes(b"definitely not a zip archive")
    with pytest.raises(ValueError, match="corrupt MNIST npz"):
        load_mnist(tmp_path / "junk.npz")
    np.savez(tmp_path / "float.npz", **{**mnist_arrays, "x_train": mnist_arrays["x_train"] / 255.0})
    with pytest.raises(ValueError, match="x_train must hold integers in 0..255"):
        load_mnist(tmp_path / "float.npz")
    (tmp_path / "images.txt").write_text("hello")
    with pytest.raises(ValueError, match="not an .npz file"):
        load_mnist(tmp_path / "images.txt")

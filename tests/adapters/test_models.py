"""Tests of adapters.cirkit.models: circuit builders, data loaders, training, caching."""

from __future__ import annotations

import gzip
import itertools
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.cirkit import models as M
from cirkit.backend.torch.layers import TorchSumLayer
from cirkit.backend.torch.parameters.nodes import TorchKroneckerParameter

TINY = dict(image_shape=(2, 2), num_categories=3)  # 3**4 = 81 states: brute force is cheap


def all_states(num_variables: int, num_categories: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(num_categories), repeat=num_variables)))


def assert_normalised(cm: M.CompiledCircuitModel, num_categories: int) -> None:
    """Σ_x p_o(x) = 1 for every output o, by enumerating every state."""
    x = all_states(cm.num_variables, num_categories)
    with torch.no_grad():
        ll = cm.log_likelihood(x)
    assert ll.shape == (x.shape[0], cm.num_outputs)
    assert ll.dtype == torch.float64
    torch.testing.assert_close(torch.logsumexp(ll, 0), torch.zeros(cm.num_outputs, dtype=torch.float64),
                               atol=1e-10, rtol=0)


def assert_square_of_base(cm: M.CompiledCircuitModel, x: torch.Tensor) -> None:
    """log c²(x) = 2 Re log c(x) (per output; the diagonal of c²'s O² outputs)."""
    with torch.no_grad():
        lsq = cm.log_density(x)
        lc = cm.log_base(x)
    assert lsq.shape == lc.shape == (x.shape[0], cm.num_outputs)
    torch.testing.assert_close(lsq, 2 * lc.real, atol=1e-6, rtol=1e-9)


@pytest.fixture(scope="module")
def digits() -> M.DataSplits:
    return M.digits_data(seed=0)


@pytest.fixture(scope="module")
def small_digits(digits) -> M.DataSplits:
    return M.DataSplits(digits.x_train[:256], digits.y_train[:256], digits.x_test[:128], digits.y_test[:128])


# ----------------------------------------------------------------------------- builders


@pytest.mark.parametrize("product", ["hadamard", "kronecker"])
@pytest.mark.parametrize("complex_weights", [False, True])
def test_one_sum_circuit_is_normalised_and_has_one_kronecker_layer(product, complex_weights):
    m = M.one_sum_circuit(3, num_categories=3, product=product, complex=complex_weights)
    assert m.num_outputs == 3 and m.num_variables == 2 and m.is_squared
    cm = m.compile(fold=False, dtype=torch.float64, seed=0)
    assert cm.semiring == "complex-lse-sum"
    assert_normalised(cm, 3)
    assert_square_of_base(cm, all_states(2, 3))
    sums = [layer for layer in cm.density.layers if isinstance(layer, TorchSumLayer)]
    kron = [s for s in sums if isinstance(s.weight.outputs[0], TorchKroneckerParameter)]
    assert len(kron) == 1
    ki = 3 if product == "hadamard" else 9
    assert kron[0].weight().shape == (1, 3 * 3, ki * ki)  # (F, O², Ki²) = kron(W, W)
    # cirkit squares a Kronecker product layer into a Kronecker layer followed by a
    # constant permutation sum layer of (Ki²)² entries; a Hadamard layer needs none
    assert len(sums) == (1 if product == "hadamard" else 2)
    assert M.squared_weight_entries(m.circuit) == 9 * ki**2 + (0 if product == "hadamard" else 81**2)


def test_one_sum_circuit_sum_product_semiring_matches():
    m = M.one_sum_circuit(2, num_categories=3, num_outputs=1)
    a = m.compile("sum-product", dtype=torch.float64, seed=1)
    b = m.compile("complex-lse-sum", dtype=torch.float64, seed=1)
    x = all_states(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    assert_normalised(a, 3)


@pytest.mark.parametrize("region_graph", ["random-binary-tree", "linear-tree"])
def test_deep_cp_circuit_compiles_and_is_normalised(region_graph):
    m = M.deep_cp_circuit(6, 3, region_graph=region_graph, num_categories=2)
    assert m.num_variables == 6
    cm = m.compile(dtype=torch.float64, seed=0)
    assert_normalised(cm, 2)
    assert_square_of_base(cm, all_states(6, 2))


def test_deep_cp_circuit_depth_and_outputs():
    m = M.deep_cp_circuit(8, 2, depth=2, num_categories=2, num_outputs=2)  # multivariate leaves
    cm = m.compile(dtype=torch.float64, seed=0)
    assert cm.log_partition().shape == (2,)
    assert_normalised(cm, 2)
    with pytest.raises(ValueError, match=r"depth must be in \[1, 3\]"):
        M.deep_cp_circuit(8, 2, depth=4)
    with pytest.raises(ValueError, match="linear tree over 8 variables has depth 7"):
        M.deep_cp_circuit(8, 2, depth=3, region_graph="linear-tree")
    with pytest.raises(ValueError, match="unknown region graph 'quad-tree-2'"):
        M.deep_cp_circuit(8, 2, region_graph="quad-tree-2")


SQUARABLE = [(rg, layer) for rg in M.SQUARABLE_REGION_GRAPHS for layer in M.SUM_PRODUCT_LAYERS]


@pytest.mark.parametrize("region_graph,layer", SQUARABLE)
def test_tiny_image_squared_circuit_brute_force(region_graph, layer):
    """Σ_x c(x)²/Z = 1 over all 81 states and log c² = 2 log|c|, float64."""
    m = M.digits_squared_circuit(2, region_graph, layer, **TINY)
    cm = m.compile(dtype=torch.float64, seed=0)
    assert_normalised(cm, 3)
    assert_square_of_base(cm, all_states(4, 3))


@pytest.mark.parametrize("region_graph", ["quad-tree-2", "random-binary-tree"])
def test_tiny_image_complex_squared_circuit_brute_force(region_graph):
    m = M.digits_squared_circuit(2, region_graph, "cp", complex=True, **TINY)
    cm = m.compile(dtype=torch.float64, seed=0)
    assert m.complex_weights and cm.semiring == "complex-lse-sum"
    assert_normalised(cm, 3)
    assert_square_of_base(cm, all_states(4, 3))


def test_tiny_image_monotone_weights_in_lse_sum():
    m = M.digits_squared_circuit(2, weight_activation="softmax", **TINY)
    assert m.default_semiring == "lse-sum"
    cm = m.compile(dtype=torch.float64, seed=0)
    assert cm.semiring == "lse-sum"
    assert_normalised(cm, 3)
    assert_square_of_base(cm, all_states(4, 3))


@pytest.mark.parametrize("region_graph,layer", [
    ("quad-tree-2", "cp"), ("quad-tree-2", "cp-t"), ("quad-tree-2", "tucker"),
    ("quad-tree-4", "cp"), ("random-binary-tree", "cp"), ("linear-tree", "cp"),
])
def test_digits_squared_circuit_compiles_and_evaluates(region_graph, layer, digits):
    m = M.digits_squared_circuit(2, region_graph, layer)
    assert m.num_variables == 64 and m.num_categories == 17 and m.num_outputs == 1
    assert m.squared is not None and m.partition is not None
    assert len(m.partition.scope) == 0
    cm = m.compile(seed=0)
    x = digits.x_test[:16]
    with torch.no_grad():
        ll = cm(x)
        logz = cm.log_partition()
    assert ll.shape == (16, 1) and ll.dtype == torch.float32
    assert torch.isfinite(ll).all() and (ll < 0).all()
    assert logz.shape == (1,) and torch.isfinite(logz).all()


def test_digits_squared_circuit_is_square_of_base_float64(digits):
    cm = M.digits_squared_circuit(3).compile(dtype=torch.float64, seed=0)
    assert_square_of_base(cm, digits.x_test[:32])


def test_compiled_parts_share_parameters():
    m = M.digits_squared_circuit(2, **TINY)
    cm = m.compile(dtype=torch.float64, seed=0)
    ids = [{id(p) for p in part.parameters()} for part in (cm.base, cm.density, cm.partition)]
    assert ids[0] and ids[0] == ids[1] == ids[2]
    assert {id(p) for p in cm.parameters()} == ids[0]
    x = all_states(4, 3)
    with torch.no_grad():
        before_z, before_c = cm.log_partition().clone(), cm.log_base(x).clone()
        for p in cm.base.parameters():
            p.mul_(1.5)
        # the squared circuit and Z see the change made through the base circuit
        assert not torch.allclose(cm.log_partition(), before_z)
        assert not torch.allclose(cm.log_base(x), before_c)
    assert_normalised(cm, 3)
    assert_square_of_base(cm, x)


def test_compile_seed_is_reproducible_and_restores_rng():
    m = M.digits_squared_circuit(2, **TINY)
    state = torch.random.get_rng_state()
    a, b = m.compile(seed=3), m.compile(seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    c = m.compile(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())


def test_compile_in_a_given_context():
    from cirkit.pipeline import PipelineContext

    m = M.digits_squared_circuit(2, **TINY)
    ctx = PipelineContext(backend="torch", semiring="complex-lse-sum", fold=False, optimize=True)
    cm = m.compile(context=ctx, dtype=torch.float64, seed=0)
    assert cm.semiring == "complex-lse-sum"
    assert_normalised(cm, 3)
    with pytest.raises(ValueError, match="either context= or semiring"):
        m.compile("lse-sum", context=ctx)


def test_float64_parameters_and_outputs():
    cm = M.digits_squared_circuit(2, complex=True, **TINY).compile(dtype=torch.float64, seed=0)
    dtypes = {p.dtype for p in cm.parameters()}
    assert dtypes == {torch.float64, torch.complex128}
    assert cm.log_partition().dtype == torch.float64
    assert torch.get_default_dtype() == torch.float32  # restored after compile / evaluation


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("kwargs,message", [
    (dict(region_graph="not-a-graph"), "unknown region graph 'not-a-graph'"),
    (dict(region_graph="quad-graph"), "'quad-graph' is not structured-decomposable"),
    (dict(region_graph="poon-domingos"), "'poon-domingos' is not structured-decomposable"),
    (dict(layer="mixture"), "unknown sum-product layer 'mixture'"),
    (dict(region_graph="quad-tree-4", layer="tucker", num_units=8), "too large to square"),
    (dict(complex=True, weight_activation="softmax"), "complex sum weights take no activation"),
    (dict(weight_activation="relu"), "unknown weight_activation 'relu'"),
])
def test_digits_squared_circuit_rejects_bad_arguments(kwargs, message):
    kwargs = {"num_units": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        M.digits_squared_circuit(**kwargs)


def test_semiring_checks():
    signed = M.digits_squared_circuit(2, **TINY)
    with pytest.raises(ValueError, match="signed real sum weights .* need semiring 'complex-lse-sum'"):
        signed.compile("lse-sum")
    with pytest.raises(ValueError, match="unknown semiring 'max-product'"):
        signed.compile("max-product")
    cplx = M.digits_squared_circuit(2, complex=True, **TINY)
    with pytest.raises(ValueError, match="complex sum weights need semiring 'complex-lse-sum'"):
        cplx.compile("sum-product")
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        signed.compile(dtype=torch.float16)
    with pytest.raises(ValueError, match="monotone .* needs non-negative sum weights"):
        M.digits_classifier_circuit(2, weight_activation="none")


def test_model_input_checks(digits):
    cm = M.digits_squared_circuit(2, **TINY).compile(seed=0)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 4\)"):
        cm(torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer category indices"):
        cm(torch.zeros(3, 4))
    big = M.digits_squared_circuit(2).compile(seed=0)
    with pytest.raises(ValueError, match=r"training data values must be in 0\.\.16"):
        M.train_squared_circuit(big, digits.x_train[:8] + 1, epochs=1, progress=False)


# ----------------------------------------------------------------------------- classifier


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("squared", [False, True])
def test_classifier_tiny_each_class_is_normalised(squared, shared):
    m = M.digits_classifier_circuit(2, squared=squared, shared=shared, num_classes=3, **TINY)
    assert m.num_outputs == 3 and m.is_squared == squared
    assert m.default_semiring == ("complex-lse-sum" if squared else "lse-sum")
    assert len(m.circuit.outputs) == (1 if shared else 3)
    cm = m.compile(dtype=torch.float64, seed=0)
    assert_normalised(cm, 3)
    if squared:  # shared: outputs y1*C + y2 of c², the diagonal is c_y(x)²
        assert_square_of_base(cm, all_states(4, 3))
    else:
        torch.testing.assert_close(cm.log_partition(), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    x = all_states(4, 3)
    with torch.no_grad():
        ll = cm(x)
    if not shared:  # independent circuits: the classes' densities differ everywhere
        assert (ll[:, 0] - ll[:, 1]).abs().min() > 0


def test_digits_classifier_circuit_trains_and_predicts(small_digits):
    cm = M.digits_classifier_circuit(2, region_graph="quad-graph", shared=True).compile(seed=0)
    assert cm.num_outputs == 10
    with torch.no_grad():
        assert cm(small_digits.x_test[:5]).shape == (5, 10)
    hist = M.train_classifier_circuit(cm, small_digits, epochs=2, batch_size=64, lr=0.1, seed=0, progress=False)
    assert len(hist.test_accuracy) == 2 and len(hist.test_nll) == 2
    assert hist.test_nll[-1] < hist.initial_test_nll
    pred = cm.predict(small_digits.x_test)
    assert pred.shape == (128,) and pred.dtype == torch.long and 0 <= int(pred.min()) <= int(pred.max()) < 10
    hist = M.train_classifier_circuit(cm, small_digits, epochs=1, batch_size=64, lr=0.05, seed=0,
                                      progress=False, objective="discriminative")
    assert hist.objective == "cross-entropy" and len(hist.test_accuracy) == 1
    with pytest.raises(ValueError, match="unknown objective"):
        M.train_classifier_circuit(cm, small_digits, epochs=1, objective="hinge")
    with pytest.raises(ValueError, match="needs labelled data"):
        M.train_squared_circuit(cm, small_digits.x_train, epochs=1, progress=False)


# ----------------------------------------------------------------------------- training


def test_training_reduces_nll_and_reports_bpd(small_digits):
    cm = M.digits_squared_circuit(2).compile(seed=0)
    hist = M.train_squared_circuit(cm, small_digits, epochs=2, batch_size=64, lr=0.1, seed=0, progress=False)
    assert len(hist.train_nll) == len(hist.test_nll) == len(hist.epoch_seconds) == 2
    assert hist.test_nll[-1] < hist.initial_test_nll
    assert hist.train_nll[-1] < hist.train_nll[0]
    assert hist.test_bpd[-1] == pytest.approx(hist.test_nll[-1] / (64 * math.log(2)))
    assert hist.test_nll[-1] == pytest.approx(M.evaluate_nll(cm, small_digits.x_test), rel=1e-6)


def test_training_float64_and_pair_data(small_digits):
    cm = M.digits_squared_circuit(2, complex=True).compile(dtype=torch.float64, seed=0)
    before = M.evaluate_nll(cm, small_digits.x_test)
    hist = M.train_squared_circuit(cm, (small_digits.x_train, small_digits.x_test), epochs=1,
                                   batch_size=128, lr=0.1, seed=0, progress=False)
    assert hist.test_nll[0] < before
    assert {p.dtype for p in cm.parameters()} <= {torch.float64, torch.complex128}


def test_progress_without_tqdm_prints_to_stderr(small_digits, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm...` raises ImportError
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    cm = M.digits_squared_circuit(2, **TINY).compile(seed=0)
    x = torch.randint(0, 3, (40, 4), generator=torch.Generator().manual_seed(0))
    M.train_squared_circuit(cm, x, epochs=1, batch_size=16, lr=0.05, progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/1: train nll" in err and "bpd" in err


def test_training_rejects_bad_data():
    cm = M.digits_squared_circuit(2, **TINY).compile(seed=0)
    with pytest.raises(TypeError, match="data must be a DataSplits"):
        M.train_squared_circuit(cm, [1, 2, 3], epochs=1)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        M.train_squared_circuit(cm, torch.zeros(4, 4, dtype=torch.long), epochs=0)


# ----------------------------------------------------------------------------- caching


CACHE_CFG = dict(num_units=2, epochs=1, seed=7, batch_size=256, lr=0.05)


def _params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_seed_trains_to_identical_parameters_and_cache_is_reused(tmp_path, monkeypatch):
    a = M.trained_digits_model(cache_dir=tmp_path / "a", **CACHE_CFG)
    b = M.trained_digits_model(cache_dir=tmp_path / "b", **CACHE_CFG)
    assert not a.from_cache and not b.from_cache
    assert a.path.name == b.path.name and a.path.is_file()
    assert _params_equal(a.model, b.model)
    assert a.history.train_nll == b.history.train_nll
    initial = M.digits_squared_circuit(2).compile(seed=7)
    assert not _params_equal(a.model, initial)  # training did move the parameters

    def no_training(*args, **kwargs):
        raise AssertionError("trained_digits_model retrained despite a cache hit")

    monkeypatch.setattr(M, "train_squared_circuit", no_training)
    c = M.trained_digits_model(cache_dir=tmp_path / "a", **CACHE_CFG)
    assert c.from_cache and c.path == a.path
    assert _params_equal(c.model, a.model)
    assert c.history.test_nll == a.history.test_nll
    x = M.digits_data().x_test[:8]
    with torch.no_grad():
        torch.testing.assert_close(c.model(x), a.model(x), rtol=0, atol=0)


def test_cache_key_and_default_directory(tmp_path, monkeypatch):
    cfg = dict(num_units=2, epochs=1)
    assert M.cache_key(cfg) == M.cache_key(dict(cfg))
    assert M.cache_key(cfg) != M.cache_key(dict(cfg, epochs=2))
    monkeypatch.setenv("STRUCTLAYERS_CACHE", str(tmp_path / "env"))
    assert M.default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("STRUCTLAYERS_CACHE")
    assert M.default_cache_dir() == Path.home() / ".cache" / "structlayers"


def test_cache_uses_env_dir_and_replaces_corrupt_file(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTLAYERS_CACHE", str(tmp_path))
    cfg = dict(CACHE_CFG, num_units=1, seed=1)
    first = M.trained_digits_model(**cfg)
    assert first.path.parent == tmp_path / "cirkit" and not first.from_cache
    first.path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="ignoring unreadable cache file"):
        again = M.trained_digits_model(**cfg)
    assert not again.from_cache and _params_equal(again.model, first.model)
    assert M.trained_digits_model(**cfg).from_cache


# ----------------------------------------------------------------------------- data


def test_digits_data_splits():
    d = M.digits_data(seed=0, test_fraction=0.25)
    assert d.x_train.dtype == d.x_test.dtype == d.y_train.dtype == torch.long
    assert d.x_train.shape[1] == d.x_test.shape[1] == 64
    assert d.x_train.shape[0] + d.x_test.shape[0] == 1797
    assert abs(d.x_test.shape[0] - 0.25 * 1797) < 10
    assert int(d.x_train.min()) == 0 and int(d.x_train.max()) == 16
    assert set(d.y_test.tolist()) == set(range(10))
    again, other = M.digits_data(seed=0, test_fraction=0.25), M.digits_data(seed=1, test_fraction=0.25)
    assert all(torch.equal(u, v) for u, v in zip(d, again))
    assert not torch.equal(d.x_test, other.x_test)
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        M.digits_data(test_fraction=1.0)


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


def check_mnist(d: M.DataSplits, arrays, flatten: bool = True) -> None:
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
    check_mnist(M.load_mnist(tmp_path / "m"), mnist_arrays)
    check_mnist(M.load_mnist(str(tmp_path / "m"), flatten=False), mnist_arrays, flatten=False)
    assert M.load_mnist(tmp_path / "m", dtype=torch.long).x_train.dtype == torch.long


def test_load_mnist_npz(tmp_path, mnist_arrays):
    np.savez(tmp_path / "mnist.npz", **mnist_arrays)
    check_mnist(M.load_mnist(tmp_path / "mnist.npz"), mnist_arrays)
    check_mnist(M.load_mnist(tmp_path), mnist_arrays)  # a directory holding only mnist.npz


def test_load_mnist_missing_files(tmp_path, mnist_arrays):
    with pytest.raises(FileNotFoundError, match="does not exist .*never downloads"):
        M.load_mnist(tmp_path / "nowhere")
    write_mnist_dir(tmp_path / "m", mnist_arrays)
    (tmp_path / "m" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="missing in .*: t10k-labels-idx1-ubyte"):
        M.load_mnist(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte, train-labels-idx1-ubyte"):
        M.load_mnist(tmp_path / "empty")


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
        M.load_mnist(root)


def test_load_mnist_corrupt_npz(tmp_path, mnist_arrays):
    np.savez(tmp_path / "partial.npz", x_train=mnist_arrays["x_train"], y_train=mnist_arrays["y_train"])
    with pytest.raises(ValueError, match="lacks arrays x_test, y_test"):
        M.load_mnist(tmp_path / "partial.npz")
    (tmp_path / "junk.npz").write_bytes(b"definitely not a zip archive")
    with pytest.raises(ValueError, match="corrupt MNIST npz"):
        M.load_mnist(tmp_path / "junk.npz")
    np.savez(tmp_path / "float.npz", **{**mnist_arrays, "x_train": mnist_arrays["x_train"] / 255.0})
    with pytest.raises(ValueError, match="x_train must hold integers in 0..255"):
        M.load_mnist(tmp_path / "float.npz")
    (tmp_path / "images.txt").write_text("hello")
    with pytest.raises(ValueError, match="not an .npz file"):
        M.load_mnist(tmp_path / "images.txt")


def test_default_classifier_has_independent_class_circuits(small_digits):
    m = M.digits_classifier_circuit(2)
    assert m.config["shared"] is False and not m.is_squared and len(m.circuit.outputs) == 10
    cm = m.compile(seed=0)
    hist = M.train_classifier_circuit(cm, small_digits, epochs=2, batch_size=64, lr=0.1, seed=0, progress=False)
    assert hist.test_accuracy[-1] > 0.5  # 10 classes: chance is about 0.1
    torch.testing.assert_close(cm.log_partition(), torch.zeros(10), atol=1e-5, rtol=0)

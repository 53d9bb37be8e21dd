"""The kind registry (structlayers.registry): names, dispatch, registration, no import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import structlayers as sl
import structlayers.base
import structlayers.registry as registry

from .helpers import random_factors, rel

KINDS = ["cp", "dense", "kronecker", "lowrank", "monarch", "nystrom", "sketched", "tt", "tucker"]


def test_available_lists_every_kind_sorted():
    assert sl.available() == registry.available() == KINDS
    for name in KINDS:
        assert registry.get(name).kind == name


def test_base_and_package_re_export_the_registry_functions():
    for name in ("available", "get", "create", "from_dense", "from_kronecker"):
        assert getattr(structlayers.base, name) is getattr(registry, name)
        assert getattr(sl, name) is getattr(registry, name)


def test_constructors_by_name_equal_the_class_methods():
    a, b = random_factors(2, (3, 4), (2, 3), seed=30)
    by_name = registry.from_kronecker("lowrank", a, b, rank=3)
    by_class = sl.LowRank.from_kronecker(a, b, rank=3)
    assert torch.equal(by_name.to_dense(), by_class.to_dense())
    w = by_class.to_dense().detach()
    assert rel(registry.from_dense("kronecker", w, factor_shapes=((3, 4), (2, 3))).to_dense(), w) < 1e-10
    made = registry.create("monarch", 12, 10, 3, num_blocks=(2, 3), block_rank=2, seed=0)
    assert isinstance(made, sl.Monarch) and (made.num_folds, made.out_features, made.in_features) == (3, 10, 12)


def test_registering_the_same_class_again_is_a_no_op():
    before = dict(registry._REGISTRY)
    registry.register("lowrank", sl.LowRank)
    assert registry._REGISTRY == before


def test_registry_imports_nothing_from_the_package_at_run_time():
    """base imports the registry; the registry may name base's classes in annotations only."""
    tree = ast.parse(Path(registry.__file__).read_text())
    for node in tree.body:  # module level; an ``if TYPE_CHECKING:`` block is not executed
        if isinstance(node, ast.ImportFrom):
            assert not node.level and node.module != "structlayers", ast.dump(node)
        if isinstance(node, ast.Import):
            assert all(not alias.name.startswith("structlayers") for alias in node.names)


def test_registry_dispatch_and_custom_kind():
    assert sl.get("lowrank") is sl.LowRank
    layer = sl.from_dense("lowrank", torch.randn(6, 5, dtype=torch.float64), rank=2)
    assert isinstance(layer, sl.LowRank) and layer.rank == 2
    # A new kind is one class plus its registration (run in a fresh interpreter).
    code = textwrap.dedent(
        """
        import torch, structlayers as sl
        class Scaled(sl.StructuredSumLayer, kind="scaled-identity"):
            def __init__(self, in_features, out_features, num_folds=1):
                super().__init__(in_features, out_features, num_folds)
                self.scale = torch.nn.Parameter(torch.ones(num_folds, 1, 1))
            def forward(self, x):
                return self.scale * x
            def flops(self, batch_size):
                return batch_size * self.num_folds * self.in_features
            @classmethod
            def from_dense(cls, w): raise NotImplementedError
            @classmethod
            def from_kronecker(cls, a, b): raise NotImplementedError
        assert "scaled-identity" in sl.available() and sl.get("scaled-identity") is Scaled
        layer = sl.create("scaled-identity", 4, 4, 2)
        assert torch.equal(layer.to_dense(), torch.eye(4).expand(2, 4, 4))
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_duplicate_kind_name_is_refused():
    with pytest.raises(ValueError, match="a structured layer kind named 'lowrank' is already registered"):
        class Again(sl.StructuredSumLayer, kind="lowrank"):  # noqa: F841
            pass

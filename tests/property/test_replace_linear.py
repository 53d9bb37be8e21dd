"""replace_linear on generated module trees: nested containers, shared Linears, filters.

For every generated tree and filter set: the input model is untouched; each Linear is
converted exactly when one of its names is included, none is excluded and it is large
enough; modules shared under several names stay one module; the report lists each
replacement once with all its names; full-rank conversions keep the weights exactly.
"""

from __future__ import annotations

import fnmatch

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import structlayers as sl

from .settings import bounded

KEYS = ["enc", "dec", "head", "a", "b"]
PATTERNS = ["*", "enc*", "*.0", "head", "a", "dec.*", "*head*", "b.?"]


@st.composite
def trees(draw):
    """(model, pool): a tree of Sequential / ModuleDict containers whose leaves are Linears
    drawn from a small pool, so that some leaves are the same module under several names."""
    pool = [nn.Linear(draw(st.sampled_from([4, 8, 16, 20])), draw(st.sampled_from([4, 8, 16, 20])),
                      bias=draw(st.booleans())).double()
            for _ in range(draw(st.integers(1, 4)))]

    def node(depth):
        if depth == 0 or draw(st.integers(0, 2)) == 0:
            return draw(st.sampled_from(pool))
        children = [node(depth - 1) for _ in range(draw(st.integers(1, 3)))]
        if draw(st.booleans()):
            return nn.Sequential(*children)
        keys = draw(st.lists(st.sampled_from(KEYS), min_size=len(children), max_size=len(children), unique=True))
        return nn.ModuleDict(dict(zip(keys, children)))

    torch.manual_seed(draw(st.integers(0, 2**16)))
    for lin in pool:
        lin.reset_parameters()
    root = node(3)
    return (root if not isinstance(root, nn.Linear) or draw(st.booleans()) else nn.Sequential(root)), pool


filters = st.one_of(st.none(), st.sampled_from(PATTERNS), st.lists(st.sampled_from(PATTERNS), max_size=3))


def names_by_module(model):
    """id(Linear) -> every qualified name of it (the model itself is "")."""
    out = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (nn.Linear, sl.Linear)):
            out.setdefault(id(module), (module, []))[1].append(name)
    return out


def matches(names, patterns):
    patterns = [patterns] if isinstance(patterns, str) else (patterns or [])
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


@bounded(150)
@given(tree=trees(), include=filters, exclude=filters, min_features=st.sampled_from([0, 5, 10, 16]))
def test_replace_linear_on_generated_trees(tree, include, exclude, min_features):
    model, _ = tree
    before = {k: v.clone() for k, v in model.state_dict().items()}
    originals = names_by_module(model)
    expected = {key for key, (lin, names) in originals.items()
                if (include is None or matches(names, include)) and not matches(names, exclude)
                and min(lin.in_features, lin.out_features) >= min_features}
    if not expected:
        with pytest.raises(ValueError, match="no nn.Linear in the model matches"):
            sl.replace_linear(model, "lowrank", include=include, exclude=exclude, min_features=min_features,
                              rank=1)
        return
    new, report = sl.replace_linear(model, lambda name, lin: ("lowrank", {"rank": min(lin.weight.shape)}),
                                    include=include, exclude=exclude, min_features=min_features)
    # the input is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(isinstance(lin, nn.Linear) for lin, _ in originals.values())
    # every original module maps to one module of the copy, under all its names
    by_name = dict(new.named_modules(remove_duplicate=False)) if not isinstance(new, sl.Linear) else {"": new}
    for key, (lin, names) in originals.items():
        targets = {id(by_name[n]) for n in names}
        assert len(targets) == 1, names
        target = by_name[names[0]]
        assert isinstance(target, sl.Linear) == (key in expected), names
        if key in expected:  # full rank: exact
            assert torch.allclose(target.weight, lin.weight, rtol=1e-10, atol=1e-12)
            assert (target.bias is None) == (lin.bias is None)
    # one report row per converted module, with all its names
    rows = {tuple(sorted(r.names)) for r in report.replaced}
    assert rows == {tuple(sorted(originals[key][1])) for key in expected}
    assert len(report.replaced) == len(expected)
    assert report.params_after == sum(p.numel() for key in expected
                                      for p in by_name[originals[key][1][0]].parameters())

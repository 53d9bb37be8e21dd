"""Validation of the evidence ``x`` given to a compiled circuit, once, at the entry points.

cirkit itself indexes its input layers with ``x`` as given: extra columns are ignored, a
transposed batch passes when B > D, fractional values are truncated and negative
categories wrap around. :func:`check_evidence` refuses all of these with a message
naming the problem and what would be right.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from cirkit.backend.torch.circuits import TorchCircuit
from cirkit.backend.torch.layers import TorchCategoricalLayer


def _width(circuit) -> int:
    """The number of columns x must have: one per variable id of the circuit's scope."""
    scope = list(circuit.scope)
    return max(scope) + 1 if scope else 0


#: dtypes cirkit indexes categorical tables with as categories (uint8 would act as a mask)
INDEX_DTYPES = (torch.long, torch.int32)

_LIMITS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _category_limits(circuit, width: int) -> Optional[Tensor]:
    """Per column, the number of categories of the categorical input layers reading it
    (the smallest if several; -1 where none does), or None without categorical layers.
    Cached per circuit (a circuit's layers are fixed once compiled)."""
    if circuit not in _LIMITS:
        _LIMITS[circuit] = _read_category_limits(circuit, width)
    return _LIMITS[circuit]


def _read_category_limits(circuit, width: int) -> Optional[Tensor]:
    layers = [layer for layer in circuit.layers if isinstance(layer, TorchCategoricalLayer)]
    if not layers:
        return None
    limits = torch.full((width,), -1, dtype=torch.long)
    for layer in layers:
        columns = layer.scope_idx.detach().flatten().cpu().long()
        current = limits[columns]
        k = torch.full_like(current, int(layer.num_categories))
        limits[columns] = torch.where(current < 0, k, torch.minimum(current, k))
    return limits


def _checked_mask(integrate: object, x: Tensor) -> Optional[Tensor]:
    """The entries of x that are integrated out (their values are not read), as a (B, D)
    bool tensor; None when there is no usable mask (a malformed one is reported later)."""
    if not isinstance(integrate, Tensor) or integrate.dtype != torch.bool:
        return None
    if integrate.shape == x.shape[1:]:
        return integrate.to(x.device).expand_as(x)
    if integrate.shape == x.shape:
        return integrate.to(x.device)
    return None


def check_evidence(circuit, x: object, integrate: object = None, name: str = "x") -> Optional[Tensor]:
    """Raise a TypeError / ValueError naming ``name`` unless ``x`` is valid evidence for
    ``circuit``; return x.

    Valid: None for a circuit without variables (a partition function); else a tensor of
    shape (B, D), D = the number of variables of the circuit's scope, of dtype torch.long or
    torch.int32 and every category in [0, num_categories) of its categorical input layer when the
    circuit has categorical inputs (other inputs: a floating dtype, no NaN). Entries that
    ``integrate`` (a bool mask, (D,) or (B, D)) marks as integrated out are not read, so
    their values are not checked.
    """
    if not isinstance(circuit, TorchCircuit):
        raise TypeError(f"expected a compiled cirkit TorchCircuit, got {type(circuit).__name__}")
    width = _width(circuit)
    if x is None:
        if width:
            raise ValueError(f"{name} is None, but the circuit has variables: pass {name} of shape (B, D), "
                             f"D = {width}")
        return None
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, {width}), got {type(x).__name__}; "
                        f"convert it with torch.as_tensor({name})")
    if not width:
        raise ValueError(f"the circuit has no variables (a partition function): call it without {name}, "
                         f"got {name} of shape {tuple(x.shape)}")
    if x.dim() != 2 or x.shape[1] != width:
        transposed = x.dim() == 2 and x.shape[0] == width
        raise ValueError(f"{name} must have shape (B, D) with D = {width} variables, got {tuple(x.shape)}"
                         + (f"; is it transposed? pass {name}.T" if transposed else ""))
    limits = _category_limits(circuit, width)
    mask = _checked_mask(integrate, x)
    if limits is not None:
        if x.dtype not in INDEX_DTYPES:
            whole = x.dtype != torch.bool and not x.is_floating_point() and not x.is_complex()
            raise TypeError(f"{name} must hold integer categories of dtype torch.long or torch.int32, got dtype "
                            f"{x.dtype}; " + (f"convert with {name}.long()" if whole else
                                              f"a fractional or boolean value is not a category (convert with "
                                              f"{name}.long() only if the values are whole)"))
        read = ~mask if mask is not None else torch.ones_like(x, dtype=torch.bool)
        limit = limits.to(x.device)
        covered = read & (limit >= 0)
        bad = covered & ((x < 0) | (x >= limit))
        if bool(bad.any()):
            b, v = (int(i) for i in torch.nonzero(bad)[0])
            raise ValueError(f"{name} has {int(bad.sum())} categories out of range, e.g. {name}[{b}, {v}] = "
                             f"{int(x[b, v])} for variable {v} with {int(limit[v])} categories; each must be "
                             f"in [0, {int(limit[v])})")
    elif x.is_floating_point() or x.is_complex():
        nan = torch.isnan(x) if mask is None else torch.isnan(x) & ~mask
        if bool(nan.any()):
            raise ValueError(f"{name} contains {int(nan.sum())} NaN value(s) in observed entries; mark missing "
                             f"values with integrate= instead")
    return x


__all__ = ["check_evidence"]

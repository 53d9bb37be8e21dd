"""Drop-in replacements for ``torch.nn.Linear`` built on structured sum layers."""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from .base import StructuredSumLayer, create, from_dense

KindPolicy = Union[str, Callable[[str, nn.Linear], Optional[Union[str, Tuple[str, dict]]]]]


class Linear(nn.Module):
    """``nn.Linear``-compatible layer: inputs (..., in_features) -> (..., out_features).

    Holds a one-fold :class:`StructuredSumLayer` (``self.layer``) and an optional bias.
    ``Linear("lowrank", 512, 256, rank=32)`` initialises randomly;
    :meth:`from_linear` converts a trained ``nn.Linear``.
    """

    def __init__(self, kind: str, in_features: int, out_features: int, bias: bool = True, **options) -> None:
        super().__init__()
        dtype, device = options.get("dtype"), options.get("device")
        self._attach(create(kind, in_features, out_features, 1, **options),
                     torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    def _attach(self, layer: StructuredSumLayer, bias: Optional[torch.Tensor]) -> None:
        if layer.num_folds != 1:
            raise ValueError(f"Linear wraps a one-fold layer, got {layer.num_folds} folds")
        self.layer = layer
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bias = nn.Parameter(bias) if bias is not None else None

    @classmethod
    def from_layer(cls, layer: StructuredSumLayer, bias: Optional[torch.Tensor] = None) -> "Linear":
        """Wrap an existing one-fold structured layer (and a bias of shape (out_features,))."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        if bias is not None and tuple(bias.shape) != (layer.out_features,):
            raise ValueError(f"bias must have shape ({layer.out_features},), got {tuple(bias.shape)}")
        module._attach(layer, None if bias is None else bias.detach().clone())
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str, **options) -> "Linear":
        """Convert a (trained) ``nn.Linear``: its weight through ``kind.from_dense``, its bias copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = from_dense(kind, linear.weight.detach(), **options)
        return cls.from_layer(layer, linear.bias)

    @property
    def kind(self) -> str:
        return self.layer.kind

    @property
    def weight(self) -> torch.Tensor:
        """The represented (out_features, in_features) weight, materialised."""
        return self.layer.to_dense()[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expects inputs of shape (..., {self.in_features}), got {tuple(x.shape)}")
        lead = x.shape[:-1]
        y = self.layer(x.reshape(1, -1, self.in_features)).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@dataclass
class Replacement:
    name: str
    kind: str
    in_features: int
    out_features: int
    params_before: int
    params_after: int
    relative_error: float


@dataclass
class ReplacementReport:
    replaced: List[Replacement] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (name, why)

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.replaced)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.replaced)

    def __str__(self) -> str:
        lines = [f"{'layer':30s} {'kind':10s} {'shape':>12s} {'params':>18s} {'rel.err':>9s}"]
        for r in self.replaced:
            lines.append(f"{r.name:30s} {r.kind:10s} {f'{r.out_features}x{r.in_features}':>12s} "
                         f"{f'{r.params_before}->{r.params_after}':>18s} {r.relative_error:9.3e}")
        lines += [f"{name:30s} skipped: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _matches(name: str, patterns: Optional[Iterable[str]]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def replace_linear(
    model: nn.Module,
    kind: KindPolicy,
    *,
    include: Optional[Iterable[str]] = None,
    exclude: Optional[Iterable[str]] = None,
    min_features: int = 16,
    **options,
) -> Tuple[nn.Module, ReplacementReport]:
    """A copy of ``model`` whose ``nn.Linear`` layers are converted; ``model`` is untouched.

    Args:
        kind: a kind name, or ``policy(name, linear)`` returning a kind name, a
            ``(kind, options)`` pair, or None to keep that layer.
        include / exclude: glob patterns on qualified module names (``"encoder.*"``).
        min_features: layers with min(in, out) below this are kept (a structured
            layer cannot save anything there).
        options: passed to ``from_dense`` of every converted layer (merged under a
            policy's own options).

    Returns (new_model, report). Raises ValueError when no layer matches the filters.
    """
    include, exclude = (list(include) if include is not None else None), list(exclude or ())
    new_model = copy.deepcopy(model)
    report = ReplacementReport()
    targets = []
    for name, module in new_model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, Linear):
            continue
        if include is not None and not _matches(name, include):
            continue
        if _matches(name, exclude):
            report.skipped.append((name, "excluded"))
            continue
        if min(module.in_features, module.out_features) < min_features:
            report.skipped.append((name, f"min(in, out) = {min(module.in_features, module.out_features)} < min_features={min_features}"))
            continue
        choice = kind(name, module) if callable(kind) else kind
        if choice is None:
            report.skipped.append((name, "policy kept it"))
            continue
        layer_kind, layer_options = (choice, {}) if isinstance(choice, str) else choice
        targets.append((name, module, layer_kind, {**options, **layer_options}))
    if not targets:
        raise ValueError(
            f"no nn.Linear in the model matches include={include}, exclude={exclude or None}, "
            f"min_features={min_features}" + (f" (skipped: {report.skipped})" if report.skipped else ""))
    # Build every replacement before touching the copy, so a failure leaves nothing half-done.
    built = []
    for name, module, layer_kind, layer_options in targets:
        try:
            new = Linear.from_linear(module, layer_kind, **layer_options)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"cannot convert {name!r} ({module.out_features}x{module.in_features}): {exc}") from exc
        built.append((name, module, new))
    for name, module, new in built:
        parent_name, _, attr = name.rpartition(".")
        setattr(new_model.get_submodule(parent_name) if parent_name else new_model, attr, new)
        report.replaced.append(Replacement(
            name=name, kind=new.kind, in_features=module.in_features, out_features=module.out_features,
            params_before=sum(p.numel() for p in module.parameters()),
            params_after=sum(p.numel() for p in new.parameters()),
            relative_error=new.layer.relative_error(module.weight.detach())))
    return new_model, report

"""Drop-in replacements for ``torch.nn.Linear`` and ``torch.nn.Conv2d`` built on structured
sum layers, and the conversion of whole models (:func:`convert_model`)."""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (check_bool, check_choice, check_input, check_nonnegative_int, check_patterns, check_policy,
                      check_policy_choice, check_positive_int)
from .base import StructuredSumLayer, create, from_dense

KindPolicy = Union[str, Callable[[str, nn.Module], Optional[Union[str, Tuple[str, dict]]]]]


class Linear(nn.Module):
    """``nn.Linear``-compatible layer: inputs (..., in_features) -> (..., out_features).

    Holds a one-fold :class:`StructuredSumLayer` (``self.layer``) and an optional bias.
    ``Linear("lowrank", 512, 256, rank=32)`` initialises randomly;
    :meth:`from_linear` converts a trained ``nn.Linear``.
    """

    def __init__(self, kind: str, in_features: int, out_features: int, bias: bool = True, **options) -> None:
        super().__init__()
        check_bool(bias, "bias")
        layer = create(kind, in_features, out_features, 1, **options)
        self._attach(layer, torch.zeros(out_features, dtype=layer.dtype, device=layer.device) if bias else None)

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
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Linear expects a torch.Tensor x, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expects inputs of shape (..., {self.in_features}), got {tuple(x.shape)}")
        lead = x.shape[:-1]
        y = self.layer(x.reshape(1, -1, self.in_features)).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
Size2d = Union[int, Tuple[int, int]]  # one int for both, or (height, width), as nn.Conv2d takes it


def _pair(value: object, name: str, *, allow_zero: bool = False) -> Tuple[int, int]:
    """An int or a pair of ints (height, width), as nn.Conv2d takes them."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2:
        raise ValueError(f"{name} must be an int or a pair (height, width), got {value!r}")
    check = check_nonnegative_int if allow_zero else check_positive_int
    return check(items[0], name), check(items[1], name)


class Conv2d(nn.Module):
    """``nn.Conv2d``-compatible layer: (N, C_in, H, W) or (C_in, H, W) -> (N, C_out, H_out, W_out).

    The kernel of each group is a ``(C_out/groups) x (C_in/groups · kh · kw)`` matrix (input
    channel major, as ``F.unfold`` lays out a patch); the ``groups`` matrices are the folds
    of one structured layer (``self.layer``). The forward applies that layer to the unfolded
    patches, ``(groups, N·H_out·W_out, C_in/groups·kh·kw)``, or, when the kind's cheapest
    order costs at least the dense kernel, runs ``F.conv2d`` with the materialised kernel.
    ``Conv2d("lowrank", 64, 128, 3, padding=1, rank=16)`` initialises randomly;
    :meth:`from_conv` converts a trained ``nn.Conv2d``.
    """

    def __init__(self, kind: str, in_channels: int, out_channels: int, kernel_size: Size2d, stride: Size2d = 1,
                 padding: Union[Size2d, str] = 0, dilation: Size2d = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", **options) -> None:
        super().__init__()
        check_bool(bias, "bias")
        geometry = self._geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                  padding_mode)
        cin, cout, (kh, kw), groups = geometry["in_channels"], geometry["out_channels"], geometry["kernel_size"], \
            geometry["groups"]
        layer = create(kind, cin // groups * kh * kw, cout // groups, groups, **options)
        self._attach(layer, geometry,
                     torch.zeros(cout, dtype=layer.dtype, device=layer.device) if bias else None)

    @staticmethod
    def _geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode) -> dict:
        in_channels = check_positive_int(in_channels, "in_channels")
        out_channels = check_positive_int(out_channels, "out_channels")
        groups = check_positive_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        kernel_size, stride, dilation = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), \
            _pair(dilation, "dilation")
        padding_mode = check_choice(padding_mode, PADDING_MODES, "padding_mode")
        if isinstance(padding, str):
            padding = check_choice(padding, ("valid", "same"), "padding")
            if padding == "same" and stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
        else:
            padding = _pair(padding, "padding", allow_zero=True)
        return dict(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
                    padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode)

    def _attach(self, layer: StructuredSumLayer, geometry: dict, bias: Optional[torch.Tensor]) -> None:
        for key, value in geometry.items():
            setattr(self, key, value)
        self.layer = layer
        self.bias = nn.Parameter(bias) if bias is not None else None
        # (left, right, top, bottom) padding applied before unfolding; "same" may be asymmetric
        if self.padding == "valid":
            pad = (0, 0, 0, 0)
        elif self.padding == "same":
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            pad = (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
        else:
            pad = (self.padding[1], self.padding[1], self.padding[0], self.padding[0])
        self._pad = pad

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, kind: str, **options) -> "Conv2d":
        """Convert a (trained) ``nn.Conv2d``: each group's kernel matrix through
        ``kind.from_dense`` (one fold per group), the bias and the geometry copied."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        geometry = cls._geometry(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                 conv.dilation, conv.groups, conv.padding_mode)
        layer = from_dense(kind, _kernel_matrix(conv).detach(), **options)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._attach(layer, geometry, None if conv.bias is None else conv.bias.detach().clone())
        return module

    @property
    def kind(self) -> str:
        return self.layer.kind

    @property
    def weight(self) -> torch.Tensor:
        """The represented (out_channels, in_channels/groups, kh, kw) kernel, materialised."""
        return self.layer.to_dense().reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, "x", self.layer.dtype, f"this {self.kind} Conv2d")
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"Conv2d expects inputs of shape (N, {self.in_channels}, H, W) or "
                             f"({self.in_channels}, H, W), got {tuple(x.shape)}")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if any(self._pad):
            x = F.pad(x, self._pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        # (F.conv2d applies this formula too; unfold needs it to lay the output out)
        h_out, w_out = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        if h_out < 1 or w_out < 1:
            raise ValueError(f"Conv2d: the (padded) input {h}x{w} is smaller than the dilated kernel "
                             f"{dh * (kh - 1) + 1}x{dw * (kw - 1) + 1}")
        layer, g = self.layer, self.groups
        rows = n * h_out * w_out
        # Where the kind's cheapest order costs a dense kernel's products or more (dense, or
        # rebuild + GEMM), torch's own convolution does them without the unfolded copy.
        if rows == 0 or layer.flops(rows) >= g * rows * layer.out_features * layer.in_features:
            y = F.conv2d(x, self.weight, None, self.stride, 0, self.dilation, g)
        else:
            patches = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)  # (N, C·kh·kw, L)
            patches = patches.view(n, g, layer.in_features, -1).permute(1, 0, 3, 2).reshape(g, rows, -1)
            y = layer(patches)  # (groups, N·L, C_out/groups)
            y = y.view(g, n, h_out * w_out, -1).permute(1, 0, 3, 2).reshape(n, self.out_channels, h_out, w_out)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, {self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, padding_mode={self.padding_mode}")


def _kernel_matrix(conv: nn.Conv2d) -> torch.Tensor:
    """An ``nn.Conv2d``'s kernel as (groups, out/groups, in/groups · kh · kw), a view."""
    return conv.weight.reshape(conv.groups, conv.out_channels // conv.groups, -1)


@dataclass
class Replacement:
    name: str  # the first qualified name of the module ("" for the model itself)
    kind: str
    in_features: int
    out_features: int
    params_before: int
    params_after: int
    relative_error: float
    names: Tuple[str, ...] = ()  # every qualified name of the module (shared modules have several)


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
            label = " = ".join(r.names or (r.name,)) or "(model)"
            lines.append(f"{label:30s} {r.kind:10s} {f'{r.out_features}x{r.in_features}':>12s} "
                         f"{f'{r.params_before}->{r.params_after}':>18s} {r.relative_error:9.3e}")
        lines += [f"{name:30s} skipped: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _matches(name: str, patterns: Optional[Iterable[str]]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


# ------------------------------------------------------- module replacement, generic
@dataclass
class _Site:
    """One module to convert and every place it is installed (shared modules have several)."""

    module: nn.Module
    places: List[Tuple[Optional[nn.Module], str]]  # (parent, attribute); (None, "") for the root
    names: List[str]


def _sites(model: nn.Module, convertible: Type[nn.Module]) -> List[_Site]:
    """Every module of type ``convertible`` reachable from ``model``, once, with all its names,
    in the order of first appearance."""
    found: Dict[int, _Site] = {}
    if isinstance(model, convertible):
        found[id(model)] = _Site(model, [(None, "")], [""])
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():  # not named_children(): it hides repeats
            if child is None or not isinstance(child, convertible):
                continue
            site = found.setdefault(id(child), _Site(child, [], []))
            name = f"{parent_name}.{attr}" if parent_name else attr
            if (parent, attr) not in [(p, a) for p, a in site.places]:
                site.places.append((parent, attr))
            if name not in site.names:
                site.names.append(name)
    return list(found.values())


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _parameter_owners(model: nn.Module) -> Dict[int, List[Tuple[str, nn.Module, str]]]:
    """id(parameter) -> every (module name, module, attribute) holding it directly."""
    owners: Dict[int, List[Tuple[str, nn.Module, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((name, module, attr))
    return owners


def _check_carryable(site: _Site, owners: Dict[int, List[Tuple[str, nn.Module, str]]]) -> None:
    """Raise where a module's state cannot move to its replacement: hooks registered on it
    (they would silently stop firing) and parameters shared with another module (the tie
    would silently break)."""
    label = " = ".join(repr(n) for n in site.names) or "the model"
    hooks = [h for h in _HOOKS if getattr(site.module, h, None)]
    if hooks:
        raise ValueError(
            f"model: {label} has hooks ({', '.join(h.strip('_') for h in hooks)}) that the replacement "
            f"cannot carry over; remove them before converting (and register them on the new module), "
            f"or leave the module out with exclude=")
    for p in site.module.parameters(recurse=False):
        for name, other, attr in owners.get(id(p), []):
            if other is not site.module:
                raise ValueError(
                    f"model: {label} shares its parameter with {name or 'the model'!r} "
                    f"({type(other).__name__}.{attr}), a tie the replacement cannot keep; untie them "
                    f"first, or leave {site.names[0]!r} out with exclude=")


def _carry_state(old: nn.Module, new: nn.Module, weight_names: Tuple[str, ...]) -> nn.Module:
    """Training mode and requires_grad of ``old`` onto ``new`` (dtype and device come with the
    conversion). Parameters of ``new`` that stand in for ``old``'s ``weight_names`` get the
    first one's requires_grad; the others keep the flag of the same-named parameter of ``old``."""
    new.train(old.training)
    own = dict(old.named_parameters(recurse=False))
    weight_grad = own[weight_names[0]].requires_grad
    for name, p in new.named_parameters():
        p.requires_grad_(own[name].requires_grad if name in own and name not in weight_names else weight_grad)
    return new


def _type_name(cls: type) -> str:
    """``nn.Linear`` for torch.nn classes, else the class name."""
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__name__


@dataclass(frozen=True)
class _Convertible:
    """A module type :func:`convert_model` converts: ``convert(module, kind, options)`` builds
    the replacement, ``matrix(module)`` gives its weight as (F, out, in) (a view)."""

    type: Type[nn.Module]
    convert: Callable[[nn.Module, str, dict], nn.Module]
    matrix: Callable[[nn.Module], torch.Tensor]


def _replace_modules(
    model: nn.Module,
    convertibles: Tuple[_Convertible, ...],
    kind,
    *,
    include,
    exclude,
    min_features: int,
    options: dict,
) -> Tuple[nn.Module, ReplacementReport]:
    """The body of :func:`convert_model` and :func:`replace_linear`, for any module types."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_policy(kind, "kind", "f(name, module)")
    include, exclude = check_patterns(include, "include"), check_patterns(exclude, "exclude") or []
    min_features = check_nonnegative_int(min_features, "min_features")
    new_model = copy.deepcopy(model)
    report = ReplacementReport()
    owners = _parameter_owners(new_model)
    by_type = {c.type: c for c in convertibles}

    def convertible(module: nn.Module) -> _Convertible:
        return next(c for t, c in by_type.items() if isinstance(module, t))

    def features(module: nn.Module) -> Tuple[int, int]:
        shape = convertible(module).matrix(module).shape
        return shape[-1], shape[-2]

    targets = []
    for site in _sites(new_model, tuple(by_type)):
        module, names, first = site.module, site.names, site.names[0]
        if include is not None and not any(_matches(n, include) for n in names):
            continue
        if any(_matches(n, exclude) for n in names):  # one excluded name keeps a shared module
            report.skipped.append((first, "excluded"))
            continue
        inp, out = features(module)
        if min(inp, out) < min_features:
            report.skipped.append((first, f"min(in, out) = {min(inp, out)} < min_features={min_features}"))
            continue
        choice = check_policy_choice(kind(first, module) if callable(kind) else kind, f"{first!r}")
        if choice is None:
            report.skipped.append((first, "policy kept it"))
            continue
        if any(t.is_meta for t in module.parameters()):
            raise ValueError(f"model: {first!r} is on the meta device and has no weights to approximate; "
                             f"load them first (model.to_empty(device=...) and load_state_dict), or build "
                             f"the structlayers module with device='meta' for an untrained model")
        _check_carryable(site, owners)
        layer_kind, layer_options = choice
        targets.append((site, layer_kind, {**options, **layer_options}))
    if not targets:
        types = " or ".join(_type_name(t) for t in by_type)
        raise ValueError(
            f"no {types} in the model matches include={include}, exclude={exclude or None}, "
            f"min_features={min_features}" + (f" (skipped: {report.skipped})" if report.skipped else ""))
    # Build every replacement before touching the copy, so a failure leaves nothing half-done.
    built = []
    for site, layer_kind, layer_options in targets:
        try:
            new = convertible(site.module).convert(site.module, layer_kind, layer_options)
        except (ValueError, TypeError) as exc:
            inp, out = features(site.module)
            raise type(exc)(f"cannot convert {site.names[0]!r} ({out}x{inp}): {exc}") from exc
        built.append((site, new))
    for site, new in built:
        for parent, attr in site.places:
            if parent is None:
                new_model = new
            else:
                setattr(parent, attr, new)
        inp, out = features(site.module)
        report.replaced.append(Replacement(
            name=site.names[0], kind=new.kind, in_features=inp, out_features=out,
            params_before=sum(p.numel() for p in site.module.parameters()),
            params_after=sum(p.numel() for p in new.parameters()),
            relative_error=new.layer.relative_error(convertible(site.module).matrix(site.module).detach()),
            names=tuple(site.names)))
    return new_model, report


def _convert_linear(linear: nn.Linear, kind: str, options: dict) -> "Linear":
    return _carry_state(linear, Linear.from_linear(linear, kind, **options), ("weight",))


def _convert_conv(conv: nn.Conv2d, kind: str, options: dict) -> "Conv2d":
    return _carry_state(conv, Conv2d.from_conv(conv, kind, **options), ("weight",))


_LINEAR = _Convertible(nn.Linear, _convert_linear, lambda m: m.weight[None])
_CONV2D = _Convertible(nn.Conv2d, _convert_conv, _kernel_matrix)
#: the module types convert_model knows, by the name its ``types`` argument uses
CONVERTIBLE = {"linear": _LINEAR, "conv2d": _CONV2D}


def convert_model(
    model: nn.Module,
    kind: KindPolicy,
    *,
    types: Union[str, Iterable[str]] = ("linear", "conv2d"),
    include: Optional[Union[str, Iterable[str]]] = None,
    exclude: Optional[Union[str, Iterable[str]]] = None,
    min_features: int = 16,
    **options,
) -> Tuple[nn.Module, ReplacementReport]:
    """A copy of ``model`` whose ``nn.Linear`` and ``nn.Conv2d`` layers are converted to
    :class:`Linear` and :class:`Conv2d` of ``kind``; ``model`` is untouched.

    Args:
        model: any module; a bare ``nn.Linear`` or ``nn.Conv2d`` comes back converted.
        kind: a kind name, or ``policy(name, module)`` returning a kind name, a
            ``(kind, options)`` pair, or None to keep that layer (a shared module is offered
            once, under its first name); anything else is a TypeError naming the layer.
        types: which module types to convert, of ``"linear"``, ``"conv2d"``.
        include / exclude: glob patterns on qualified module names (``"encoder.*"``); one
            string is one pattern.
        min_features: layers whose weight matrix has min(in, out) below this are kept (a
            structured layer cannot save anything there). A convolution's matrix is
            ``(out/groups) x (in/groups · kh · kw)`` per group.
        options: passed to ``from_dense`` of every converted layer (merged under a
            policy's own options).

    Shared modules stay shared: a module reachable under several names is converted once
    and the one replacement is installed under every name; it is included when any of its
    names is, kept when any is excluded, and reported once with all its names
    (``Replacement.names``). The replacement keeps the module's training mode, dtype,
    device and ``requires_grad`` flags. A module with hooks, or whose weight or bias is
    shared with another module (say an ``nn.Embedding``), raises a ValueError naming it:
    neither can be carried over.

    Returns (new_model, report). Raises ValueError when no layer matches the filters;
    nothing is modified on any error.
    """
    names = [types] if isinstance(types, str) else list(types) if isinstance(types, (list, tuple)) else None
    if not names or any(not isinstance(n, str) or n not in CONVERTIBLE for n in names):
        raise ValueError(f"types must be a non-empty list of {', '.join(map(repr, CONVERTIBLE))}, got {types!r}")
    return _replace_modules(model, tuple(CONVERTIBLE[n] for n in dict.fromkeys(names)), kind, include=include,
                            exclude=exclude, min_features=min_features, options=options)


def replace_linear(
    model: nn.Module,
    kind: KindPolicy,
    *,
    include: Optional[Union[str, Iterable[str]]] = None,
    exclude: Optional[Union[str, Iterable[str]]] = None,
    min_features: int = 16,
    **options,
) -> Tuple[nn.Module, ReplacementReport]:
    """A copy of ``model`` whose ``nn.Linear`` layers are converted; ``model`` is untouched.

    :func:`convert_model` with ``types="linear"`` (it converts ``nn.Conv2d`` as well): the
    same arguments, guarantees, report and errors; ``policy(name, linear)`` sees Linears only.
    """
    return convert_model(model, kind, types="linear", include=include, exclude=exclude,
                         min_features=min_features, **options)

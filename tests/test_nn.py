"""structlayers.Linear, Conv2d, replace_linear and convert_model, ending with real models on
scikit-learn's digits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import structlayers as sl

from .helpers import decaying_matrix, generator, rel
from .kind_specs import SPECS


def test_linear_accepts_any_leading_shape_and_matches_its_weight():
    layer = sl.Linear("lowrank", 20, 12, rank=4, dtype=torch.float64, seed=0)
    x = torch.randn(3, 5, 20, generator=generator(1), dtype=torch.float64)
    y = layer(x)
    assert y.shape == (3, 5, 12)
    assert rel(y, x @ layer.weight.T + layer.bias) < 1e-12
    with pytest.raises(ValueError, match=r"Linear expects inputs of shape \(\.\.\., 20\), got \(3, 19\)"):
        layer(torch.randn(3, 19, dtype=torch.float64))


def test_from_linear_keeps_weight_and_bias():
    torch.manual_seed(0)
    lin = nn.Linear(30, 20).double()
    with torch.no_grad():
        lin.weight.copy_(decaying_matrix(1, 20, 30, decay=0.7, seed=2)[0])
    exact = sl.Linear.from_linear(lin, "lowrank", rank=20)
    x = torch.randn(7, 30, generator=generator(3), dtype=torch.float64)
    assert rel(exact(x), lin(x)) < 1e-10
    approx = sl.Linear.from_linear(lin, "nystrom", rank=5)
    assert torch.equal(approx.bias, lin.bias)
    assert approx.layer.relative_error(lin.weight.detach()) <= 1.5 * sl.optimal_relative_error(lin.weight.detach(), 5)
    with pytest.raises(TypeError, match="from_linear expects an nn.Linear, got Conv1d"):
        sl.Linear.from_linear(nn.Conv1d(2, 2, 1), "lowrank", rank=1)


def test_replace_linear_copies_filters_and_reports():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 10)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new, report = sl.replace_linear(model, "lowrank", params_share=0.3)
    assert [r.name for r in report.replaced] == ["0", "2.0"]
    assert ("2.1", "min(in, out) = 10 < min_features=16") in report.skipped
    assert isinstance(new[0], sl.Linear) and isinstance(new[2][1], nn.Linear)
    for r in report.replaced:
        assert r.params_after < r.params_before and 0 < r.relative_error < 1
    # The input model is untouched.
    assert all(isinstance(m, nn.Linear) for m in (model[0], model[2][0], model[2][1]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    only, rep = sl.replace_linear(model, "nystrom", include=["2.*"], rank=8)
    assert [r.name for r in rep.replaced] == ["2.0"] and isinstance(only[0], nn.Linear)
    policy, rep = sl.replace_linear(model, lambda name, lin: ("lowrank", {"rank": 4}) if name == "0" else None)
    assert [r.name for r in rep.replaced] == ["0"] and policy[0].layer.rank == 4
    assert "lowrank" in str(rep)


def test_replace_linear_errors_leave_the_model_intact():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    with pytest.raises(ValueError, match="no nn.Linear in the model matches"):
        sl.replace_linear(model, "lowrank", include=["decoder.*"], rank=4)
    with pytest.raises(ValueError, match=r"cannot convert '0' \(64x64\): rank 65 exceeds"):
        sl.replace_linear(model, "lowrank", rank=65)
    assert isinstance(model[0], nn.Linear)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(32, 32)
        self.tied = self.enc  # the same module under a second name
        self.head = nn.Linear(32, 32)


def test_shared_modules_stay_shared_and_are_reported_once():
    torch.manual_seed(0)
    lin = nn.Linear(32, 32)
    seq = nn.Sequential(lin, nn.ReLU(), lin)
    new, report = sl.replace_linear(seq, "lowrank", rank=4)
    assert new[0] is new[2] and isinstance(new[0], sl.Linear)
    assert [r.names for r in report.replaced] == [("0", "2")]
    assert sum(p.numel() for p in new.parameters()) == report.params_after
    model = Tied()
    new, report = sl.replace_linear(model, "lowrank", rank=4)
    assert new.enc is new.tied and isinstance(new.enc, sl.Linear) and new.head is not new.enc
    assert [r.names for r in report.replaced] == [("enc", "tied"), ("head",)]
    assert "enc = tied" in str(report)
    # one excluded name keeps the shared module whole
    kept, report = sl.replace_linear(model, "lowrank", exclude="tied", rank=4)
    assert isinstance(kept.enc, nn.Linear) and kept.enc is kept.tied and ("enc", "excluded") in report.skipped


def test_a_bare_linear_comes_back_converted():
    torch.manual_seed(0)
    lin = nn.Linear(32, 32).double()
    new, report = sl.replace_linear(lin, "lowrank", rank=32)
    assert isinstance(new, sl.Linear) and "" not in dict(new.named_children())
    assert [r.name for r in report.replaced] == [""]
    x = torch.randn(3, 32, dtype=torch.float64)
    assert rel(new(x), lin(x)) < 1e-10


def test_a_string_filter_is_one_pattern():
    model = nn.Sequential()
    model.add_module("a", nn.Linear(32, 32))
    model.add_module("head", nn.Linear(32, 32))
    model.add_module("heads", nn.Sequential(nn.Linear(32, 32)))
    _, report = sl.replace_linear(model, "lowrank", include="head", rank=2)
    assert [r.name for r in report.replaced] == ["head"]
    _, report = sl.replace_linear(model, "lowrank", include="heads.*", rank=2)
    assert [r.name for r in report.replaced] == ["heads.0"]
    _, report = sl.replace_linear(model, "lowrank", exclude="a", rank=2)
    assert [r.name for r in report.replaced] == ["head", "heads.0"]


def test_module_state_is_carried_over():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)).double().eval()
    model[0].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    new, _ = sl.replace_linear(model, "lowrank", rank=4)
    assert not new.training and not any(m.training for m in new.modules())
    assert not any(p.requires_grad for p in new[0].layer.parameters()) and new[0].bias.requires_grad
    assert all(p.requires_grad for p in new[1].layer.parameters()) and not new[1].bias.requires_grad
    assert new[0].layer.dtype == torch.float64 and new[0].bias.dtype == torch.float64
    half, _ = sl.replace_linear(nn.Sequential(nn.Linear(32, 32)).half(), "lowrank", rank=4)
    assert half[0].layer.dtype == torch.float16 and half[0].bias.dtype == torch.float16


def test_hooks_and_ties_to_other_modules_are_refused_by_name():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    model[1].register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match=r"model: '1' has hooks \(forward_hooks\)"):
        sl.replace_linear(model, "lowrank", rank=2)
    pre = nn.Sequential(nn.Linear(32, 32))
    pre[0].register_forward_pre_hook(lambda *args: None)
    with pytest.raises(ValueError, match="forward_pre_hooks"):
        sl.replace_linear(pre, "lowrank", rank=2)
    lm = nn.Module()
    lm.embed = nn.Embedding(40, 32)
    lm.head = nn.Linear(32, 40, bias=False)
    lm.head.weight = lm.embed.weight
    with pytest.raises(ValueError, match=r"model: 'head' shares its parameter with 'embed' \(Embedding.weight\)"):
        sl.replace_linear(lm, "lowrank", rank=2)
    new, report = sl.replace_linear(model, "lowrank", exclude="1", rank=2)  # leaving it out works
    assert [r.name for r in report.replaced] == ["0"]


def test_a_meta_device_model_is_refused_by_name():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(ValueError, match="model: '0' is on the meta device"):
        sl.replace_linear(model, "lowrank", rank=2)


@pytest.mark.parametrize("junk", [5, ("lowrank",), ("lowrank", None), ["lowrank", {}], (3, {})])
def test_a_policy_returning_junk_is_a_type_error(junk):
    model = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(TypeError, match=r"the policy returned .* for '0'; a policy must return a kind name"):
        sl.replace_linear(model, lambda name, lin: junk)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(kind="lowrank", min_features=-5), ValueError, r"min_features must be a non-negative int below 2\*\*63, got -5"),
        (dict(kind="lowrank", min_features=2.5), TypeError, "min_features must be a non-negative int"),
        (dict(kind="fourier"), ValueError, "unknown structured layer kind 'fourier'"),
        (dict(kind=3), TypeError, r"kind must be a kind name or a policy function f\(name, module\)"),
        (dict(kind="lowrank", include=3), TypeError, "include must be a glob pattern or a list of them"),
        (dict(kind="lowrank", exclude=[None]), TypeError, "exclude must hold glob pattern strings"),
    ],
)
def test_bad_replace_linear_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        sl.replace_linear(nn.Sequential(nn.Linear(32, 32)), rank=2, **kwargs)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        sl.replace_linear("model", "lowrank", rank=2)


# ----------------------------------------------------------- Conv2d
GEOMETRIES = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(2, 3), padding="same", dilation=(1, 2)),  # asymmetric "same" padding
    dict(kernel_size=3, groups=2, padding=(1, 2), padding_mode="reflect", bias=False),
    dict(kernel_size=(3, 1), stride=(1, 2), padding=1, padding_mode="circular"),
    dict(kernel_size=1, padding="valid", padding_mode="replicate"),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: ",".join(f"{k}={v}" for k, v in g.items()))
@pytest.mark.parametrize("kind", sorted(sl.available()))
def test_from_conv_at_full_rank_equals_the_convolution(kind, geometry):
    """Every kind at its exact options reproduces nn.Conv2d in float64, batched and unbatched,
    values and gradients (input and kernel), over strides, dilations, groups, padding modes."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **geometry).double()
    matrix = conv.weight.detach().reshape(conv.groups, 6 // conv.groups, -1)
    options = SPECS[kind]["full_dense"](matrix)[0]
    layer = sl.Conv2d.from_conv(conv, kind, **options)
    assert rel(layer.weight, conv.weight) < 1e-12 and layer.layer.num_folds == conv.groups
    x = torch.randn(3, 4, 9, 8, dtype=torch.float64, requires_grad=True)
    y, y_ref = layer(x), conv(x)
    assert y.shape == y_ref.shape and rel(y, y_ref) < 1e-12
    assert rel(layer(x[1].detach()), y_ref[1]) < 1e-12
    g = torch.randn_like(y_ref)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref, gw_ref) = torch.autograd.grad(y_ref, (x, conv.weight), g)
    assert rel(gx, gx_ref) < 1e-10
    # the structured parameters' gradient is the kernel's gradient pulled back through W(θ)
    params = [p for p in layer.layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(layer(x.detach()), params, g)
    pulled = torch.autograd.grad((layer.weight * gw_ref).sum(), params)
    assert all(rel(a, b) < 1e-10 for a, b in zip(grads, pulled))


@pytest.mark.parametrize("groups, padding_mode", [(1, "zeros"), (2, "reflect")])
def test_conv_from_scratch_trains_and_saves_multiply_adds(groups, padding_mode):
    layer = sl.Conv2d("lowrank", 32, 64, 3, padding=1, groups=groups, padding_mode=padding_mode, rank=8,
                      dtype=torch.float64, seed=0)
    assert layer.weight.shape == (64, 32 // groups, 3, 3)
    assert torch.linalg.matrix_rank(layer.weight.reshape(groups, 64 // groups, -1)).tolist() == [8] * groups
    x = torch.randn(2, 32, 6, 7, dtype=torch.float64)
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="constant" if padding_mode == "zeros" else padding_mode)
    reference = nn.functional.conv2d(padded, layer.weight, layer.bias, groups=groups)
    assert rel(layer(x), reference) < 1e-12
    rows = 2 * 6 * 7
    # the structured (unfolded) path, not torch's convolution, ran: it is the cheaper one here
    assert layer.layer.flops(rows) < rows * 64 * 32 * 9 / groups / 2
    layer(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


@pytest.mark.parametrize("build, error, match", [
    (lambda: sl.Conv2d("lowrank", 6, 4, 3, groups=4, rank=1), ValueError, "groups=4 must divide in_channels=6"),
    (lambda: sl.Conv2d("lowrank", 4, 4, 3, padding="same", stride=2, rank=1), ValueError, "padding='same' needs stride 1"),
    (lambda: sl.Conv2d("lowrank", 4, 4, 3, padding="full", rank=1), ValueError, "unknown padding 'full'; choose one of 'valid', 'same'"),
    (lambda: sl.Conv2d("lowrank", 4, 4, 3, padding_mode="mirror", rank=1), ValueError, "unknown padding_mode 'mirror'"),
    (lambda: sl.Conv2d("lowrank", 4, 4, (1, 2, 3), rank=1), ValueError, r"kernel_size must be an int or a pair"),
    (lambda: sl.Conv2d("lowrank", 4, 4, 0, rank=1), ValueError, "kernel_size"),
    (lambda: sl.Conv2d("lowrank", 4, 4, 3, padding=-1, rank=1), ValueError, "padding"),
    (lambda: sl.Conv2d("lowrank", 4, 4, 3, bias="yes", rank=1), TypeError, "bias must be True or False"),
    (lambda: sl.Conv2d.from_conv(nn.Linear(4, 4), "lowrank", rank=1), TypeError, "from_conv expects an nn.Conv2d"),
    (lambda: sl.Conv2d("lowrank", 4, 4, 3, rank=1)(torch.ones(1, 3, 5, 5)), ValueError, r"shape \(N, 4, H, W\)"),
    (lambda: sl.Conv2d("lowrank", 4, 4, 3, rank=1)(torch.ones(4, 5)), ValueError, r"shape \(N, 4, H, W\)"),
    (lambda: sl.Conv2d("lowrank", 4, 4, 3, rank=1)(torch.ones(1, 4, 2, 5)), ValueError, "smaller than the dilated kernel 3x3"),
    (lambda: sl.Conv2d("lowrank", 4, 4, 3, rank=1)(torch.ones(1, 4, 5, 5, dtype=torch.float64)), TypeError, "x has dtype torch.float64"),
])
def test_bad_conv_arguments_are_named(build, error, match):
    with pytest.raises(error, match=match):
        build()


class SmallCNN(nn.Module):
    """8x8 digits -> 10 logits: two 3x3 convolutions, a pool, two linear layers."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                      nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.features(x.reshape(-1, 1, 8, 8)))


def test_convert_model_converts_convolutions_and_linears_and_keeps_ties():
    torch.manual_seed(0)
    model = SmallCNN().double()
    model.tied = model.features[2]  # one convolution under two names
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new, report = sl.convert_model(model, "lowrank", rank=4)
    # the first conv (16 x 9 kernel matrix) and the last linear (10 outputs) are below min_features
    assert [r.names for r in report.replaced] == [("tied", "features.2"), ("head.1",)]
    assert [name for name, _ in report.skipped] == ["features.0", "head.3"]
    assert (report.replaced[0].out_features, report.replaced[0].in_features) == (32, 144)
    assert isinstance(new.features[2], sl.Conv2d) and new.tied is new.features[2]
    assert isinstance(new.head[1], sl.Linear) and isinstance(new.features[0], nn.Conv2d)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    only_convs, report = sl.convert_model(model, "lowrank", types="conv2d", rank=4, min_features=8)
    assert [r.name for r in report.replaced] == ["tied", "features.0"]
    assert isinstance(only_convs.head[1], nn.Linear)
    linears, _ = sl.replace_linear(model, "lowrank", rank=4)
    assert isinstance(linears.features[2], nn.Conv2d) and isinstance(linears.head[1], sl.Linear)
    full, _ = sl.convert_model(model, "lowrank", rank=9, min_features=8, include="features.0")
    x = torch.randn(5, 64, dtype=torch.float64)
    assert rel(full(x), model(x)) < 1e-12


@pytest.mark.parametrize("types", ["conv3d", [], ["linear", 2], None])
def test_convert_model_names_bad_types(types):
    with pytest.raises(ValueError, match="types must be a non-empty list of 'linear', 'conv2d'"):
        sl.convert_model(SmallCNN(), "lowrank", types=types, rank=2)


def test_convert_model_without_a_match_says_which_types_it_looked_for():
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d in the model matches"):
        sl.convert_model(nn.Sequential(nn.ReLU()), "lowrank", rank=2)


# ----------------------------------------------------------- end to end: digits
@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=generator(0))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def _train(model, data, epochs, lr=3e-3):
    (x, y), _ = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = generator(1)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


def _accuracy(model, data) -> float:
    _, (x, y) = data
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def trained_mlp(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    _train(model, digits, epochs=15)
    return model


# Each kind gets about 30 % of the dense parameters of the two converted layers.
# (options, max accuracy drop right after conversion or None, fine-tune epochs, lr, max drop after it)
# Measured drops (torch 2.13, 1 thread): lowrank -0.005/+0.005, nystrom 0.05/0.007,
# kronecker 0.15/0.017, tt 0.37/0.025, monarch 0.43/0.037, sketched (projection fit) 0.78/0.020,
# cp 0.16/0.015, tucker 0.31/0.023.
CONVERSIONS = {
    "lowrank": ({}, 0.02, 3, 1e-3, 0.03),
    "nystrom": ({}, 0.08, 3, 1e-3, 0.03),
    "kronecker": ({}, None, 3, 1e-3, 0.04),
    "tt": ({}, None, 3, 1e-3, 0.05),
    "monarch": ({}, None, 3, 1e-3, 0.06),
    "cp": ({}, None, 3, 1e-3, 0.04),
    "tucker": ({}, None, 3, 1e-3, 0.05),
    # The sketched layer is meant to be trained: its conversion is far off, so it gets 10 epochs.
    "sketched": ({"fit": "projection", "seed": 0}, None, 10, 3e-3, 0.05),
}


@pytest.mark.parametrize("table", ["CONVERSIONS", "CNN_CONVERSIONS"])
def test_every_kind_has_a_digits_conversion(table):
    assert set(globals()[table]) == set(sl.available()) - {"dense"}


def _convert_and_fine_tune(model, digits, convert, conversions, kind, names):
    """The dense model reaches >= 0.95 test accuracy; ``kind``'s accuracy after
    ``convert(model, kind, params_share=0.3)`` (exactly the layers ``names``) and after a short
    fine-tune stays within the drops stated in ``conversions``; the model is untouched."""
    options, max_drop, epochs, lr, max_drop_tuned = conversions[kind]
    base = _accuracy(model, digits)
    assert base >= 0.95
    converted, report = convert(model, kind, params_share=0.3, **options)
    assert [r.name for r in report.replaced] == names
    assert report.params_after <= 0.31 * report.params_before
    after = _accuracy(converted, digits)
    if max_drop is not None:
        assert after >= base - max_drop, (kind, base, after)
    tuned = _accuracy(_train(converted, digits, epochs=epochs, lr=lr), digits)
    assert tuned >= base - max_drop_tuned, (kind, base, after, tuned)
    assert _accuracy(model, digits) == base  # the original is untouched by all of this
    return converted


@pytest.mark.parametrize("kind", sorted(CONVERSIONS))
def test_digits_mlp_conversion_and_fine_tune(digits, trained_mlp, kind):
    _convert_and_fine_tune(trained_mlp, digits, sl.replace_linear, CONVERSIONS, kind, ["0", "2"])


@pytest.fixture(scope="module")
def trained_cnn(digits):
    torch.manual_seed(0)
    return _train(SmallCNN(), digits, epochs=10)


# About 30 % of the dense parameters of the two converted layers (the 32 x 144 kernel of the
# second convolution and the 64 x 512 hidden linear layer); same fields as CONVERSIONS.
# Dense test accuracy 0.975. Measured drops after conversion / after fine-tuning (torch 2.13,
# 1 thread): lowrank 0.008/0.000, nystrom 0.040/-0.005, kronecker 0.091/0.008, tt 0.288/0.013,
# monarch 0.375/0.035, cp 0.071/0.013, tucker 0.103/0.008, sketched (projection fit) 0.872/0.015.
CNN_CONVERSIONS = {
    "lowrank": ({}, 0.02, 3, 1e-3, 0.02),
    "nystrom": ({}, 0.07, 3, 1e-3, 0.03),
    "kronecker": ({}, None, 3, 1e-3, 0.03),
    "tt": ({}, None, 3, 1e-3, 0.04),
    "monarch": ({}, None, 3, 1e-3, 0.06),
    "cp": ({}, None, 3, 1e-3, 0.04),
    "tucker": ({}, None, 3, 1e-3, 0.04),
    "sketched": ({"fit": "projection", "seed": 0}, None, 10, 3e-3, 0.04),
}


@pytest.mark.parametrize("kind", sorted(CNN_CONVERSIONS))
def test_digits_cnn_conversion_and_fine_tune(digits, trained_cnn, kind):
    """convert_model on the CNN: its second convolution and hidden linear layer."""
    converted = _convert_and_fine_tune(trained_cnn, digits, sl.convert_model, CNN_CONVERSIONS, kind,
                                       ["features.2", "head.1"])
    assert isinstance(converted.features[2], sl.Conv2d)

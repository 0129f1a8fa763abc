"""Issue 13, the PyTorch route: models built to break a rule must never come out wrong.

Every model here is built by an ``--arch`` file and folded through the CLI, as a user
runs it; its ONNX output is then checked independently of bnfold: against a float64
copy of the original, on fresh inputs, at other batch sizes and scaled by 100.  The
hypothesis tests draw the classes (hooks at random places, subclasses with a
perturbing ``forward``, reshape chains that mix the batch into the channels).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.fold_torch import fold_graph
from bnfold.graph import capture_model
from bnfold.rules import Reason
from tests.helpers import write_arch
from tests.models import randomize_all

MODELS = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn


    def _clamp_hook(module, args, out):
        return out.clamp(min=-0.25)


    def _clamp_pre_hook(module, args):
        return (args[0].clamp(max=0.5),)


    class ConvBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))


    def root_hook():
        model = ConvBN()
        model.register_forward_hook(lambda m, a, out: out * 3 + 1)
        return model


    def root_pre_hook():
        model = ConvBN()
        model.register_forward_pre_hook(lambda m, args: (args[0].abs(),))
        return model


    class Between(nn.Module):
        """conv -> Identity (a clamping hook) -> BN."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.mid = nn.Identity()
            self.bn = nn.BatchNorm2d(4)
            self.mid.register_forward_hook(_clamp_hook)

        def forward(self, x):
            return self.bn(self.mid(self.conv(x)))


    class BeforeLinear(nn.Module):
        """BN -> Identity (a clamping pre-hook) -> flatten -> Linear."""

        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.mid = nn.Identity()
            self.fc = nn.Linear(3 * 8 * 8, 5)
            self.mid.register_forward_pre_hook(_clamp_pre_hook)

        def forward(self, x):
            return self.fc(torch.flatten(self.mid(self.bn(x)), 1))


    class GeM(nn.AdaptiveAvgPool2d):
        """Generalised mean pooling: a pooling subclass that is not a plain average."""

        def forward(self, x):
            return F.adaptive_avg_pool2d(x.clamp(min=1e-6).pow(3), 1).pow(1 / 3)


    class ScaledFlatten(nn.Flatten):
        def forward(self, x):
            return super().forward(x) * 2 + 1


    class Neck(nn.Module):
        """BN -> a transparent-looking subclass -> Linear."""

        def __init__(self, middle):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.mid = middle
            self.flat = nn.Flatten()
            self.fc = nn.Linear(3, 5)

        def forward(self, x):
            return self.fc(self.flat(self.mid(self.bn(x))))


    def gem_neck():
        return Neck(GeM(1))


    def flatten_neck():
        model = Neck(nn.AdaptiveAvgPool2d(1))
        model.flat = ScaledFlatten()
        return model


    class StandardisedConv(nn.Conv2d):
        """Weight standardisation in _conv_forward (forward itself is torch's)."""

        def _conv_forward(self, x, weight, bias):
            mean = weight.mean((1, 2, 3), keepdim=True)
            w = (weight - mean) / (weight.std((1, 2, 3), keepdim=True) + 1e-5)
            return super()._conv_forward(x, w, bias)


    class ClampedConv(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):
            return super()._conv_forward(x.clamp(-1, 1), weight, bias)


    def standardised():
        model = ConvBN()
        model.conv = StandardisedConv(3, 4, 3)
        return model


    def clamped():
        model = ConvBN()
        model.conv = ClampedConv(3, 4, 3)
        return model


    class MixesBatch(nn.Module):
        """conv(x).transpose(0, 1).reshape(shape): the identity at batch 1 only."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y.transpose(0, 1).reshape(y.shape))


    class MCDropout(nn.Module):
        """BN -> dropout kept active at inference (train() overridden) -> Linear."""

        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(6)
            self.drop = nn.Dropout(0.5)
            self.fc = nn.Linear(6, 3)

        def train(self, mode=True):
            super().train(mode)
            self.drop.train(True)
            return self

        def forward(self, x):
            return self.fc(self.drop(self.bn(x)))


    class FrozenBatchNorm2d(nn.Module):
        """maskrcnn-benchmark's: no eps, its own arithmetic (rsqrt of the variance)."""

        def __init__(self, n):
            super().__init__()
            self.register_buffer("weight", torch.ones(n))
            self.register_buffer("bias", torch.zeros(n))
            self.register_buffer("running_mean", torch.zeros(n))
            self.register_buffer("running_var", torch.ones(n))

        def forward(self, x):
            scale = self.weight * self.running_var.rsqrt()
            bias = self.bias - self.running_mean * scale
            return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


    def frozen_lookalike():
        model = ConvBN()
        model.bn = FrozenBatchNorm2d(4)
        return model


    class Unbatched(nn.Module):
        """Conv1d on unbatched (C, L) input with L == C, then BatchNorm1d (channels: L)."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(8, 8, 1)
            self.bn = nn.BatchNorm1d(8)
            self.conv2 = nn.Conv1d(8, 8, 1)

        def forward(self, x):
            return self.conv2(self.bn(self.conv(x)))


    class Keywords(nn.Module):
        """Every call the fold pass reads, with keyword arguments."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.w = nn.Parameter(torch.randn(4, 4, 1, 1))
            self.bn2 = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 6 * 6, 5)
            self.bn3 = nn.BatchNorm1d(5)

        def forward(self, x):
            x = self.bn(input=self.conv(input=x))
            x = self.bn2(input=F.conv2d(x, weight=self.w, bias=None))
            return self.bn3(input=self.fc(input=torch.flatten(x, start_dim=1)))


    class Mixed(nn.Module):
        """An image and token ids (int64): verification batches must keep each dtype."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.emb = nn.Embedding(10, 4)

        def forward(self, x, ids):
            return self.bn(self.conv(x)).mean((2, 3)) + self.emb(ids).sum(1)


    class Masked(nn.Module):
        """A -inf attention mask in a buffer: only parameters and BN statistics must be finite."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 1)
            self.bn = nn.BatchNorm1d(4)
            self.register_buffer("mask", torch.triu(torch.full((4, 4), float("-inf")), 1))

        def forward(self, x):
            y = self.bn(self.conv(x))
            return torch.softmax(y @ y.transpose(1, 2) + self.mask, -1)


    class FilterBank(nn.Module):
        """A fixed filter bank: the conv weight is a buffer."""

        def __init__(self):
            super().__init__()
            self.register_buffer("filters", torch.randn(4, 3, 3, 3))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(F.conv2d(x, self.filters))


    def buffer_weight():
        """A Conv2d module whose weight is a buffer (a fixed filter bank)."""
        model = ConvBN()
        weight = model.conv.weight.detach().clone()
        del model.conv.weight
        model.conv.register_buffer("weight", weight)
        return model


    class BatchOfTwo(nn.Module):
        """Runs only at batch size 2: the batch is flattened into the features."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(2 * 4 * 6 * 6, 3)

        def forward(self, x):
            return self.fc(self.bn(self.conv(x)).reshape(1, -1))


    class Autocast(nn.Module):
        """Cannot run in float64: its code fixes a dtype (as an autocast region does)."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = self.bn(self.conv(x)).mean((2, 3))
            return F.linear(y.to(torch.float32), self.fc.weight)


    class PoolNeck(nn.Module):
        """BN -> AdaptiveAvgPool2d((2, 2)) -> flatten -> Linear: an exact forward fold."""

        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.pool = nn.AdaptiveAvgPool2d((2, 2))
            self.fc = nn.Linear(12, 5)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.bn(x)), 1))


    class MeanNeck(nn.Module):
        """BN -> mean over the spatial axes -> Linear: an exact forward fold."""

        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.fc = nn.Linear(3, 5)

        def forward(self, x):
            return self.fc(self.bn(x).mean((2, 3)))


    class LogSigmoid(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return F.logsigmoid(self.bn(self.conv(x)))


    class RolledLogSigmoid(nn.Module):
        """Rolls its channels by the batch size: the dynamo exporter cannot export that
        with a dynamic batch, and falls back to a static one."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            return F.logsigmoid(torch.roll(self.bn(self.conv(x)), x.shape[0], 1))


    class LogSigmoidOfScalar(nn.Module):
        """A second input with no batch axis, the one large values break."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x, t):
            return self.bn(self.conv(x)) + F.logsigmoid(-t.abs())
''')


@pytest.fixture(scope="module")
def arch_file(tmp_path_factory) -> tuple[Path, dict]:
    return write_arch(tmp_path_factory.mktemp("arch"), MODELS, "hostile")


def build(namespace: dict, name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_all(namespace[name]())


def fuse(arch_file, tmp_path, name: str, *args: str, shapes=("2,3,8,8",), save=True):
    """``bnfold fuse`` on ``name``'s weights through the CLI; (result, report, model, out)."""
    arch, namespace = arch_file
    model = build(namespace, name)
    weights = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / f"{name}.onnx"
    command = ["fuse", str(weights), "--arch", f"{arch}:{name}", "--format", "json"]
    for shape in shapes:
        command += ["--input-shape", shape]
    if save:
        command += ["--out", str(out)]
    result = CliRunner().invoke(app, [*command, *args])
    report = json.loads(result.stdout) if result.exit_code in (0, 1) and result.stdout else None
    return result, report, model, out


def float64_outputs(model: nn.Module, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        out = ref(*(t.double() if t.is_floating_point() else t for t in inputs))
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o.numpy() for o in outs]


def assert_onnx_matches(model, path, make_inputs, sizes=(1, 5), scales=(1.0, 100.0), tol=1e-5):
    """The ONNX file equals a float64 copy of ``model`` on fresh inputs of every batch size
    in ``sizes`` and scaled by each of ``scales`` (independent of bnfold's verification)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for size in sizes:
        for scale in scales:
            inputs = make_inputs(size, scale)
            got = session.run(None, dict(zip(names, (t.numpy() for t in inputs), strict=True)))
            for g, r in zip(got, float64_outputs(model, inputs), strict=True):
                err = float(np.abs(g - r).max()) if r.size else 0.0
                assert err <= tol * float(np.abs(r).max()) + 1e-6, (size, scale, err)


def assert_folded_matches(folded, model, make_inputs, cases, tol=2e-5):
    """The folded module equals a float64 copy of ``model`` on each (batch size, scale)."""
    for size, scale in cases:
        x = make_inputs(size, scale)
        with torch.no_grad():
            got = folded(*x).double().numpy()
        ref = float64_outputs(model, x)[0]
        assert np.abs(got - ref).max() <= tol * np.abs(ref).max() + 1e-6, (size, scale)


def image(channels: int = 3, side: int = 8):
    def make(size: int, scale: float) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(size)
        return [torch.randn(size, channels, side, side, generator=gen) * scale]

    return make


def reasons(report: dict) -> dict[str, str]:
    return {s["bn"]: s["reason"] for s in report["skipped"]}


# --------------------------------------------------------------------------- hooks


@pytest.mark.parametrize("name", ["root_hook", "root_pre_hook"])
def test_root_hooks_go_into_the_export(arch_file, tmp_path, name):
    """Issue 13: hooks on the model itself were dropped from the ONNX and --save-torch; now
    torch.export captures them, the BN still folds, and both outputs equal the original."""
    pt2 = tmp_path / "folded.pt2"
    result, report, model, out = fuse(arch_file, tmp_path, name, "--save-torch", str(pt2))
    assert result.exit_code == 0, result.output
    assert report["capture"] == "export" and "hooks" in report["capture_detail"]
    assert [f["bn"] for f in report["folded"]] and report["torch_verification"]["passed"]
    assert_onnx_matches(model, out, image())
    saved = torch.export.load(pt2).module()
    x = image()(3, 100.0)
    with torch.no_grad():
        got = saved(*x).numpy()
    ref = float64_outputs(model, x)[0]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize(
    "name, make, reason",
    [
        ("Between", image(), Reason.NO_NEIGHBOUR),
        ("BeforeLinear", image(), Reason.NO_NEIGHBOUR),
    ],
)
def test_hooked_module_between_bn_and_layer_is_opaque(arch_file, tmp_path, name, make, reason):
    """Issue 13: a hook on an Identity between the layer and the BN (or the BN and a
    Linear) was ignored and the BN folded through it; it is opaque now."""
    result, report, model, out = fuse(arch_file, tmp_path, name)
    assert result.exit_code == 0, result.output
    assert reasons(report) == {"bn": reason.value}
    assert_onnx_matches(model, out, make)


def test_global_module_hooks_are_captured(arch_file, tmp_path):
    """Issue 13: global forward hooks (registered for every module) run in the export."""
    from torch.nn.modules.module import register_module_forward_hook

    def halve_convs(module, args, out):
        return out * 0.5 if isinstance(module, nn.Conv2d) else None

    handle = register_module_forward_hook(halve_convs)
    try:
        result, report, model, out = fuse(arch_file, tmp_path, "ConvBN")
        assert result.exit_code == 0, result.output
        assert report["capture"] == "export"
        assert_onnx_matches(model, out, image())
    finally:
        handle.remove()


HOOKS = {
    "clamp": lambda m, a, out: out.clamp(min=-0.1) if isinstance(out, torch.Tensor) else None,
    "scale": lambda m, a, out: out * 1.5 + 0.25 if isinstance(out, torch.Tensor) else None,
    "pre_abs": lambda m, args: (args[0].abs(), *args[1:]),
}


class Stack(nn.Module):
    """conv -> [id] -> BN -> relu -> BN -> [id] -> conv -> BN -> pool -> flatten -> BN -> fc."""

    def __init__(self):
        super().__init__()
        self.conv1, self.id1, self.bn1 = nn.Conv2d(3, 4, 3), nn.Identity(), nn.BatchNorm2d(4)
        self.bn2, self.id2, self.conv2 = nn.BatchNorm2d(4), nn.Identity(), nn.Conv2d(4, 4, 1)
        self.bn3, self.pool, self.flat = nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.bn4, self.fc = nn.BatchNorm1d(4), nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.id1(self.conv1(x))))
        x = self.bn3(self.conv2(self.id2(self.bn2(x))))
        return self.fc(self.bn4(self.flat(self.pool(x))))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hooks=st.lists(
        st.tuples(
            st.sampled_from(
                ["", "conv1", "id1", "bn1", "bn2", "id2", "conv2", "bn3", "pool", "flat", "fc"]
            ),
            st.sampled_from(sorted(HOOKS)),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_hooks_anywhere_never_give_a_wrong_fold(hooks):
    """Issue 13: forward hooks and pre-hooks at random places (the root included): the folded
    model equals a float64 run of the hooked original at two batch sizes and scaled."""
    torch.manual_seed(0)
    model = randomize_all(Stack())
    for where, kind in hooks:
        target = model.get_submodule(where)
        if kind.startswith("pre"):
            target.register_forward_pre_hook(HOOKS[kind])
        else:
            target.register_forward_hook(HOOKS[kind])
    make = image()
    captured = capture_model(model, make(2, 1.0), make(3, 1.0))
    outcome = fold_graph(captured.module, model, shapes_known=True)
    assert_folded_matches(outcome.module, model, make, [(2, 1.0), (5, 100.0)])


# --------------------------------------------------------------------------- subclasses


@pytest.mark.parametrize("name", ["gem_neck", "flatten_neck"])
def test_pooling_and_flatten_subclasses_are_not_transparent(arch_file, tmp_path, name):
    """Issue 13: GeM pooling and a Flatten subclass with their own forward were treated as
    plain layout and the BN folded through them into the Linear."""
    result, report, model, out = fuse(arch_file, tmp_path, name)
    assert result.exit_code == 0, result.output
    assert "bn" in reasons(report)
    assert_onnx_matches(model, out, image())


@pytest.mark.parametrize("name", ["standardised", "clamped"])
def test_conv_overriding_conv_forward_keeps_its_bn(arch_file, tmp_path, name):
    """Issue 13: a Conv2d subclass overriding _conv_forward (weight standardisation, input
    clamping) was folded as a plain conv; it keeps its BN (custom_layer_forward)."""
    result, report, model, out = fuse(arch_file, tmp_path, name)
    assert result.exit_code == 0, result.output
    assert reasons(report) == {"bn": Reason.CUSTOM_LAYER.value}
    assert "_conv_forward" in report["skipped"][0]["detail"]
    assert_onnx_matches(model, out, image())


def _perturbing(base: type[nn.Module], how: str) -> type[nn.Module]:
    """A subclass of ``base`` whose forward (or a method its forward calls) perturbs."""
    if how == "forward":
        return type(
            f"My{base.__name__}",
            (base,),
            {"forward": lambda self, x: base.forward(self, x) * 1.25 + 0.5},
        )
    if how == "property" and hasattr(base, "weight"):
        return type(f"My{base.__name__}", (base,), {"extra": property(lambda self: 1)})
    return type(
        f"My{base.__name__}",
        (base,),
        {"__call__": lambda self, x: base.__call__(self, x).clamp(-1, 1)},
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    where=st.sampled_from(
        ["conv1", "id1", "bn1", "id2", "conv2", "bn3", "pool", "flat", "fc", "bn4"]
    ),
    how=st.sampled_from(["forward", "call", "property"]),
)
def test_subclasses_with_their_own_behaviour_never_give_a_wrong_fold(where, how):
    """Issue 13: any layer replaced by a subclass with a perturbing forward (or __call__,
    or an extra property): the folded model equals the float64 original."""
    torch.manual_seed(0)
    model = Stack()
    old = model.get_submodule(where)
    new = copy.deepcopy(old)
    new.__class__ = _perturbing(type(old), how)
    setattr(model, where, new)
    model = randomize_all(model)
    make = image()
    captured = capture_model(model, make(2, 1.0), make(3, 1.0))
    outcome = fold_graph(captured.module, model, shapes_known=True)
    assert_folded_matches(outcome.module, model, make, [(2, 1.0), (4, 100.0)])


# --------------------------------------------------------------------------- batch axis


def test_alignment_proven_at_batch_1_only_is_no_proof(arch_file, tmp_path):
    """Issue 13: ``conv(x).transpose(0, 1).reshape(shape)`` is the identity at batch 1,
    where the proof used to be made, and mixes the batch into the channels above it."""
    result, report, model, out = fuse(arch_file, tmp_path, "MixesBatch", shapes=("1,3,8,8",))
    assert result.exit_code == 0, result.output
    assert reasons(report) == {"bn": Reason.CHANNEL_MISMATCH.value}
    assert report["dynamic_batch"] is True
    assert_onnx_matches(model, out, image(), sizes=(1, 2, 5))


class Reshaper(nn.Module):
    def __init__(self, perm: tuple[int, ...], merge: bool):
        super().__init__()
        self.conv, self.bn, self.perm, self.merge = (
            nn.Conv2d(3, 4, 1),
            nn.BatchNorm2d(4),
            perm,
            merge,
        )

    def forward(self, x):
        y = self.conv(x)
        z = y.permute(*self.perm)
        if self.merge:
            z = z.reshape(-1)
        return self.bn(z.reshape(y.shape))


@settings(max_examples=40, deadline=None)
@given(
    perm=st.permutations([0, 1, 2, 3]).map(tuple),
    merge=st.booleans(),
    example=st.sampled_from([1, 2]),
)
def test_reshape_chains_fold_only_when_exact_at_every_batch_size(perm, merge, example):
    """Issue 13: random permute/reshape chains between a conv and its BN; proven at the
    example's batch size (1 or 2) and another, the fold is right at batch sizes 1 to 5."""
    torch.manual_seed(0)
    model = randomize_all(Reshaper(perm, merge))
    make = image(side=4)
    base = max(2, example)
    captured = capture_model(model, make(base, 1.0), make(base + 1, 1.0))
    outcome = fold_graph(captured.module, model, shapes_known=True)
    assert_folded_matches(outcome.module, model, make, [(size, 1.0) for size in range(1, 6)])


def test_model_that_runs_at_one_batch_size_exports_static(arch_file, tmp_path):
    """Issue 13: a model that flattens its batch exports with a static batch instead of
    failing, and says so."""
    result, report, model, out = fuse(arch_file, tmp_path, "BatchOfTwo")
    assert result.exit_code == 0, result.output
    assert report["dynamic_batch"] is False
    assert any("batch" in n for n in report["notes"])
    assert_onnx_matches(model, out, image(), sizes=(2,))


# --------------------------------------------------------------------------- save-torch


def test_save_torch_alone_is_verified(arch_file, tmp_path):
    """Issue 13: --save-torch without --out wrote an unverified model; it is verified now."""
    pt2 = tmp_path / "folded.pt2"
    result, report, _model, _ = fuse(
        arch_file, tmp_path, "ConvBN", "--save-torch", str(pt2), save=False
    )
    assert result.exit_code == 0, result.output
    v = report["torch_verification"]
    assert v["passed"] and v["target"] == "torch" and v["inputs"] >= 3


def test_dropout_active_at_inference_is_not_the_identity(arch_file, tmp_path):
    """Issue 13: a dropout kept in training mode (MC dropout) was folded through as the
    identity; the BN stays, and verification of the random model says it fails (exit 1)."""
    pt2 = tmp_path / "folded.pt2"
    result, report, _, _ = fuse(
        arch_file, tmp_path, "MCDropout", "--save-torch", str(pt2), shapes=("4,6",), save=False
    )
    assert reasons(report) == {"bn": Reason.NO_NEIGHBOUR.value}
    assert result.exit_code == 1 and not report["torch_verification"]["passed"]


# --------------------------------------------------------------------------- BN kinds


def test_frozen_batchnorm_lookalike_is_not_trusted(arch_file, tmp_path):
    """Issue 13: any class named FrozenBatchNorm2d was trusted (and one without eps crashed);
    another library's, with its own arithmetic, stays."""
    result, report, model, out = fuse(arch_file, tmp_path, "frozen_lookalike")
    assert result.exit_code == 0, result.output
    assert reasons(report) == {"bn": Reason.CUSTOM_FORWARD.value}
    assert_onnx_matches(model, out, image())
    inspected = CliRunner().invoke(
        app,
        ["inspect", str(tmp_path / "frozen_lookalike.pt"), "--arch",
         f"{arch_file[0]}:frozen_lookalike", "--format", "json"],
    )  # fmt: skip
    assert inspected.exit_code == 0, inspected.output


def test_unbatched_conv1d_with_coincident_length_keeps_its_bns(arch_file, tmp_path):
    """Issue 13: Conv1d on unbatched (C, L) input with L == C, then BatchNorm1d (which
    normalises axis 1, the length): neither the backward nor the forward fold is exact."""
    result, report, model, out = fuse(arch_file, tmp_path, "Unbatched", shapes=("8,8",), save=True)
    assert result.exit_code == 0, result.output
    assert reasons(report) == {"bn": Reason.CHANNEL_MISMATCH.value}

    def make(size, scale):
        return [torch.randn(8, 8, generator=torch.Generator().manual_seed(size)) * scale]

    assert_onnx_matches(model, out, make, sizes=(1,))


def test_training_mode_is_refused_unless_eval(arch_file, tmp_path):
    """Issue 13: a BN in training mode, which an exporter turns into eval anyway, is refused
    before exporting (exit 2); --eval switches the model and says so."""
    torch.manual_seed(0)
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    pickled = tmp_path / "train.pt"
    torch.save(model, pickled)
    base = ["fuse", str(pickled), "--trust-pickle", "--input-shape", "2,3,8,8",
            "--out", str(tmp_path / "t.onnx")]  # fmt: skip
    refused = CliRunner().invoke(app, base)
    assert refused.exit_code == 2 and "training mode" in refused.stderr
    assert not (tmp_path / "t.onnx").exists()
    done = CliRunner().invoke(app, [*base, "--eval", "--format", "json"])
    assert done.exit_code == 0, done.output
    assert any("--eval" in n for n in json.loads(done.stdout)["notes"])


# --------------------------------------------------------------------------- crashes


def test_keyword_calls_fold(arch_file, tmp_path):
    """Issue 13: bn(input=x), linear(input=x), torch.flatten(x, start_dim=1) and
    F.conv2d(x, weight=w, bias=None) crashed the fold pass (exit 3)."""
    result, report, model, out = fuse(arch_file, tmp_path, "Keywords")
    assert result.exit_code == 0, result.output
    assert {f["bn"] for f in report["folded"]} == {"bn", "bn2", "bn3"}
    assert_onnx_matches(model, out, image())


def test_float_and_integer_inputs_from_npz(arch_file, tmp_path):
    """Issue 13: a float input and an int64 input given by --inputs crashed: the random
    verification batches now follow each input's dtype (and the ids' values)."""
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32),
             ids=np.random.default_rng(1).integers(0, 10, (3, 5)))  # fmt: skip
    result, report, model, out = fuse(arch_file, tmp_path, "Mixed", "--inputs", str(npz), shapes=())
    assert result.exit_code == 0, result.output
    assert report["verification"]["passed"] and report["folded"]

    def make(size, scale):
        gen = torch.Generator().manual_seed(size)
        return [
            torch.randn(size, 3, 8, 8, generator=gen) * scale,
            torch.randint(0, 10, (size, 5), generator=gen),
        ]

    assert_onnx_matches(model, out, make)


def test_infinite_mask_buffer_is_not_refused(arch_file, tmp_path):
    """Issue 13: a -inf attention-mask buffer blocked fuse (only parameters and BN statistics
    must be finite)."""
    result, report, _model, _out = fuse(arch_file, tmp_path, "Masked", shapes=("2,4,6",))
    assert result.exit_code == 0, result.output
    assert report["folded"]


@pytest.mark.parametrize("name", ["FilterBank", "buffer_weight"])
def test_filter_bank_buffer_folds(arch_file, tmp_path, name):
    """Issue 13: a conv whose weight is a buffer (a fixed filter bank), functional or a
    Conv2d module, folds (the folded module failed to export), and verifies."""
    result, report, model, out = fuse(arch_file, tmp_path, name)
    assert result.exit_code == 0, result.output
    assert report["folded"]
    assert_onnx_matches(model, out, image())


def test_float64_reference_that_cannot_run_falls_back(arch_file, tmp_path):
    """Issue 13: a model whose float64 copy does not compute the same (a dtype fixed in its
    code) crashed; the float32 original is the reference, and the report says so."""
    result, report, _, _ = fuse(arch_file, tmp_path, "Autocast")
    assert result.exit_code == 0, result.output
    assert report["verification"]["reference"].startswith("the float32 model")
    assert any("does not run in float64" in n for n in report["notes"])


@pytest.mark.parametrize("opset", ["99", "0", "-1"])
def test_bad_opset_is_one_line(arch_file, tmp_path, opset):
    """Issue 13: --opset 99, 0 or -1 was a traceback or a file at another opset."""
    result, _, _, out = fuse(arch_file, tmp_path, "ConvBN", "--opset", opset)
    assert result.exit_code == 2
    assert "opset" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("name", ["PoolNeck", "MeanNeck"])
def test_bn_before_pooling_and_linear_folds(arch_file, tmp_path, name):
    """Issue 13: BN -> AdaptiveAvgPool2d((2, 2)) -> flatten -> Linear and BN -> mean over the
    spatial axes -> Linear are exact forward folds (averaging keeps the channels)."""
    result, report, model, out = fuse(arch_file, tmp_path, name)
    assert result.exit_code == 0, result.output
    assert [f["into"] for f in report["folded"]] == ["fc"]
    assert_onnx_matches(model, out, image())


def test_exporter_that_overflows_on_large_inputs_is_caught(arch_file, tmp_path):
    """Issue 13: conv -> BN -> F.logsigmoid exports to a graph that may return -inf for
    large inputs; verification feeds a scaled batch, so exit 1 exactly when the file is
    wrong there (checked independently)."""
    result, report, model, out = fuse(arch_file, tmp_path, "LogSigmoid")
    assert result.exit_code in (0, 1), result.output
    assert any("scaled by 100" in f for f in report["verification"]["fed"])
    try:
        assert_onnx_matches(model, out, image(), sizes=(2,), scales=(100.0,))
        wrong = False
    except AssertionError:
        wrong = True
    assert (result.exit_code == 1) is wrong


def _wrong_on_large_inputs(model, out, make_inputs, size: int) -> bool:
    try:
        assert_onnx_matches(model, out, make_inputs, sizes=(size,), scales=(100.0,))
    except AssertionError:
        return True
    return False


@pytest.mark.parametrize("given", [1, 2])
def test_large_inputs_are_fed_when_the_export_falls_back_to_a_static_batch(
    arch_file, tmp_path, given
):
    """Review of issue 14: when the capture has a dynamic batch but the export falls back
    to a static one, verification keeps only the batches the file takes; the batch
    scaled by 100 must be among them, and the file takes the batch size given (a batch of
    1 was exported static at 2, with only the batch of another size left to verify).
    Exit 1 exactly when the file is wrong on large inputs (checked independently)."""
    result, report, model, out = fuse(
        arch_file, tmp_path, "RolledLogSigmoid", shapes=(f"{given},3,8,8",)
    )
    assert result.exit_code in (0, 1), result.output
    assert report["dynamic_batch"] is False
    assert any("scaled by 100" in f for f in report["verification"]["fed"])
    batch = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_value == given
    wrong = _wrong_on_large_inputs(model, out, image(channels=3), given)
    assert (result.exit_code == 1) is wrong


def test_float_inputs_without_a_batch_axis_are_scaled_too(arch_file, tmp_path):
    """Review of issue 14: a 0-dimensional float input is scaled by 100 in verification
    like the batched ones (the exporter's log(sigmoid(t)) is -inf at t = -100): exit 1
    exactly when the file is wrong there (checked independently)."""
    result, report, model, out = fuse(
        arch_file, tmp_path, "LogSigmoidOfScalar", shapes=("2,3,8,8", "scalar")
    )
    assert result.exit_code in (0, 1), result.output
    assert any("scaled by 100" in f for f in report["verification"]["fed"])

    def inputs(size: int, scale: float) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(size)
        return [torch.randn(size, 3, 8, 8, generator=gen) * scale, torch.tensor(scale)]

    assert (result.exit_code == 1) is _wrong_on_large_inputs(model, out, inputs, 2)


def test_uncapturable_model_is_one_clean_line(tmp_path):
    """Issue 13: a model neither torch.fx nor torch.export can capture exits 2 with one
    line (each capture's failure in a few words), no traceback, no colour codes."""
    source = textwrap.dedent("""
        import torch
        from torch import nn

        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

            def forward(self, x):
                y = self.bn(self.conv(x))
                if y.sum().item() > 0:
                    return y.nonzero().float().sum()
                return y
    """)
    arch, namespace = write_arch(tmp_path, source, "branchy")
    weights = tmp_path / "b.pt"
    torch.save(namespace["Branchy"]().eval().state_dict(), weights)
    proc = subprocess.run(
        [sys.executable, "-m", "bnfold", "fuse", str(weights), "--arch", f"{arch}:Branchy",
         "--input-shape", "2,3,8,8", "--out", str(tmp_path / "b.onnx")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "\x1b[" not in proc.stderr and "Traceback" not in proc.stderr
    assert "torch.fx" in lines[0] and "torch.export" in lines[0]


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_dtypes_onnxruntime_cannot_run_are_refused_before_exporting(tmp_path, dtype):
    """Issue 13: float64 and bfloat16 models exported, then failed verification after the
    long export; they are refused first (exit 2, nothing written), and --save-torch alone
    is verified in PyTorch."""
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).to(
        getattr(torch, dtype)
    )
    weights = tmp_path / "m.pt"
    torch.save(model, weights)
    base = ["fuse", str(weights), "--trust-pickle", "--input-shape", "2,3,8,8"]
    refused = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "m.onnx")])
    assert refused.exit_code == 2 and dtype in refused.stderr, refused.output
    assert not (tmp_path / "m.onnx").exists()
    saved = CliRunner().invoke(app, [*base, "--save-torch", str(tmp_path / "m.pt2"),
                                     "--input-dtype", dtype, "--format", "json"])  # fmt: skip
    assert saved.exit_code == 0, saved.output
    assert json.loads(saved.stdout)["torch_verification"]["passed"]


def test_failing_exporter_is_one_clean_line(tmp_path):
    """Issue 13/14: an operator the ONNX exporter cannot translate (eigvalsh) printed 244
    lines of traceback with colour codes; now one line, exit 2, no colour, nothing written,
    and a hint that names a next step."""
    source = textwrap.dedent("""
        import torch
        from torch import nn

        class Eig(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

            def forward(self, x):
                y = self.bn(self.conv(x))[..., :4, :4]
                return torch.linalg.eigvalsh(y @ y.transpose(-1, -2))
    """)
    arch, namespace = write_arch(tmp_path, source, "eig")
    weights = tmp_path / "e.pt"
    torch.save(randomize_all(namespace["Eig"]()).state_dict(), weights)
    out = tmp_path / "e.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "bnfold", "fuse", str(weights), "--arch", f"{arch}:Eig",
         "--input-shape", "2,3,8,8", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "\x1b[" not in proc.stderr and "Traceback" not in proc.stderr
    assert "aten._linalg_eigh" in lines[0] and "custom_translation_table" in lines[0]
    assert not out.exists() and list(tmp_path.glob(".e.onnx*")) == []

"""Branch merging on PyTorch graphs (bnfold/merge_torch.py, issue 18): parallel convs and
identity branches summed into one conv, and the reason each declined merge gives."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnfold
from tests.helpers import count_torch_exports
from tests.models import float64_reference, randomize_all
from tests.strategies import BranchSet, branch_sets

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONV_CALLS = {
    torch.ops.aten.conv1d.default,
    torch.ops.aten.conv2d.default,
    torch.ops.aten.conv3d.default,
    torch.nn.functional.conv2d,
}


class Branches(nn.Module):
    """A BranchSet as a block: ``sum_i BN_i(conv_i(x)) (+ BN(x))``."""

    def __init__(self, cfg: BranchSet):
        super().__init__()
        conv, bn, c = CONVS[cfg.dims - 1], BNS[cfg.dims - 1], cfg.channels
        groups = c if cfg.depthwise else 1
        self.convs = nn.ModuleList(
            conv(
                c,
                c,
                k,
                stride=cfg.stride,
                padding=cfg.dilation * (k // 2),
                dilation=cfg.dilation,
                groups=groups,
                bias=b,
                padding_mode=cfg.padding_mode,
            )
            for k, b in zip(cfg.kernels, cfg.biases, strict=True)
        )
        self.bns = nn.ModuleList(bn(c) for _ in cfg.kernels)
        self.identity = bn(c) if cfg.identity else None

    def forward(self, x):
        branches = [bn(conv(x)) for conv, bn in zip(self.convs, self.bns, strict=True)]
        if self.identity is not None:
            branches.append(self.identity(x))
        out = branches[0]
        for b in branches[1:]:
            out = out + b
        return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def bn_left(module: nn.Module) -> int:
    """BatchNorm modules and batch_norm calls the folded module still runs."""
    calls = sum("batch_norm" in str(n.target) for n in module.graph.nodes)  # type: ignore[union-attr]
    return calls + sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def convs_run(module: nn.Module) -> int:
    """Conv calls in the folded graph: conv modules called, functional/aten convs."""
    n = 0
    for node in module.graph.nodes:  # type: ignore[union-attr]
        if node.op == "call_module":
            n += isinstance(module.get_submodule(node.target), CONVS)
        elif node.op == "call_function":
            n += node.target in CONV_CALLS
    return n


def inputs(cfg: BranchSet, batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, cfg.channels, *[size] * cfg.dims)


@settings(max_examples=max(10, settings.default.max_examples // 15))
@given(cfg=branch_sets())
def test_branches_merge_into_one_conv(cfg: BranchSet):
    """Random branch sets (kernels 1/3/5, groups 1 or depthwise, bias on/off, two or three
    branches, with or without an identity BN, dilation, every padding mode) fold into one
    conv and no BN, equal to a float64 run of the original at the example, another batch
    size and a larger input."""
    torch.manual_seed(cfg.seed)
    model = randomize_all(Branches(cfg), seed=cfg.seed)
    x = inputs(cfg, 2, 9)  # reflect padding 4 (5x5, dilation 2) needs more than 4
    result = bnfold.fold(model, x)
    assert result.skipped == ()
    assert bn_left(result.module) == 0
    assert convs_run(result.module) == 1
    (merge,) = result.merged
    assert merge.rule == "branch_merge" and len(merge.convs) == len(cfg.kernels)
    assert merge.identity_bns == (("identity",) if cfg.identity else ())
    merged_bns = [f for f in result.folded if f.rule == "branch_merge"]
    assert [f.bn for f in merged_bns] == list(merge.identity_bns)
    assert result.verification.passed
    for sample in (x, inputs(cfg, 3, 9), inputs(cfg, 1, 13)):
        with torch.no_grad():
            assert rel_err(result.module(sample), float64_reference(model, sample)) < 1e-5


class Block(nn.Module):
    """RepVGG's block with the sum written every way PyTorch code writes it: ``+``, ``+=``,
    ``torch.add(..., alpha=)``, a subtraction, and a BN after the sum."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bna = nn.BatchNorm2d(c)
        self.b = nn.Conv2d(c, c, 1)
        self.bnb = nn.BatchNorm2d(c)
        self.c = nn.Conv2d(c, c, 5, padding=2)
        self.bnc = nn.BatchNorm2d(c)
        self.identity = nn.BatchNorm2d(c)
        self.drop = nn.Dropout(0.3)
        self.post = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bna(self.a(x)) + self.drop(self.bnb(self.b(x)))
        y = torch.add(y, self.bnc(self.c(x)), alpha=0.5)
        y -= self.identity(x)
        return torch.relu(self.post(y + x))


def _hooked(model: nn.Module) -> nn.Module:
    """A forward hook on the model itself: torch.fx would drop it, so bnfold captures the
    model with torch.export."""
    model.register_forward_hook(lambda module, args, out: None)
    return model


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_block_merges_under_both_captures(capture):
    """Conv branches, an identity BN, a plain skip, alpha, ``-=`` and a BN after the sum
    become one conv and nothing else, whether torch.fx or torch.export captured the model."""
    model = randomize_all(Block())
    if capture == "export":
        model = _hooked(model)
    x = torch.randn(2, 6, 9, 9)
    result = bnfold.fold(model, x)
    assert result.report.capture == capture
    assert result.skipped == ()
    assert bn_left(result.module) == 0 and convs_run(result.module) == 1
    (merge,) = result.merged
    assert len(merge.convs) == 3 and merge.identity_bns == ("identity",) and merge.skips == 1
    assert {f.bn: f.rule for f in result.folded}["identity"] == "branch_merge"
    assert {f.bn: f.into for f in result.folded}["post"] == merge.into
    assert result.verification.passed
    for sample in (x, torch.randn(3, 6, 9, 9)):  # torch.export holds the spatial size
        with torch.no_grad():
            assert rel_err(result.module(sample), float64_reference(model, sample)) < 1e-5


def test_merged_module_runs_exports_and_saves(tmp_path):
    """The merged conv is a real nn.Conv2d: the folded module's state_dict holds it, a
    fresh graph module loads it, and torch.export exports the folded module."""
    model = randomize_all(Block())
    x = torch.randn(2, 6, 9, 9)
    result = bnfold.fold(model, x)
    merged = result.merged[0].into
    assert isinstance(result.module.get_submodule(merged), nn.Conv2d)
    state = result.module.state_dict()
    assert f"{merged}.weight" in state and not any("running_mean" in k for k in state)
    torch.save(state, tmp_path / "folded.pt")
    copy_ = copy.deepcopy(result.module)
    copy_.load_state_dict(torch.load(tmp_path / "folded.pt", weights_only=True))
    program = torch.export.export(copy_, (x,))
    with torch.no_grad():
        assert torch.equal(program.module()(x), result.module(x))


def test_merge_rounds_once_into_the_model_dtype():
    """A float64 model merges into a float64 conv, equal to the original to float64
    rounding."""
    model = randomize_all(Block()).double()
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    result = bnfold.fold(model, x)
    assert result.module.get_submodule(result.merged[0].into).weight.dtype == torch.float64
    with torch.no_grad():
        assert rel_err(result.module(x), model(x)) < 1e-12


def test_inplace_iadd_and_constant_zero_merge():
    """MobileOne's sum (``out = 0; out += conv(x)``, ``out += 0``) merges too."""

    class MobileOne(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(4, 4, 1, bias=False) for _ in range(3))
            self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(3))

        def forward(self, x):
            out = 0
            for conv, bn in zip(self.convs, self.bns, strict=True):
                out += bn(conv(x))
            out += 0
            return out

    model = randomize_all(MobileOne())
    x = torch.randn(2, 4, 5, 5)
    result = bnfold.fold(model, x)
    assert bn_left(result.module) == 0 and convs_run(result.module) == 1
    with torch.no_grad():
        assert rel_err(result.module(x), float64_reference(model, x)) < 1e-5


def test_layer_scaled_sum_merges_with_its_skip():
    """FastViT's RepMixer, ``x + gamma * (mixer(x) - norm(x))``: the difference merges, the
    per-channel scale folds into the merged conv, and the sum with ``x`` merges too: one
    conv, no BN, no multiplication left."""

    class RepMixer(nn.Module):
        def __init__(self, c: int = 4):
            super().__init__()
            self.kxk, self.bn_kxk = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c)
            self.scale, self.bn_scale = nn.Conv2d(c, c, 1, groups=c), nn.BatchNorm2d(c)
            self.identity, self.norm = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
            self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

        def forward(self, x):
            mixer = self.bn_kxk(self.kxk(x)) + self.bn_scale(self.scale(x)) + self.identity(x)
            return x + self.gamma * (mixer - (0 + self.norm(x)))

    model = randomize_all(RepMixer())
    x = torch.randn(2, 4, 7, 7)
    result = bnfold.fold(model, x)
    assert result.skipped == () and bn_left(result.module) == 0
    ops = [n for n in result.module.graph.nodes if n.op not in ("placeholder", "output")]
    assert len(ops) == 1 and convs_run(result.module) == 1, result.module.code
    assert {f.bn: f.rule for f in result.folded}["norm"] == "branch_merge"
    for sample in (x, torch.randn(1, 4, 12, 12)):
        with torch.no_grad():
            assert rel_err(result.module(sample), float64_reference(model, sample)) < 1e-5


# --------------------------------------------------------------------------- declines


class Pair(nn.Module):
    """``BN_a(a(x)) + [BN_b(b(x))] + [BN(x)]``, then a BN: each decline test sets a, b."""

    def __init__(self, a: nn.Module, b: nn.Module | None, c: int, identity: bool = True):
        super().__init__()
        self.a, self.bna = a, nn.BatchNorm2d(a.out_channels)
        self.b = b
        self.bnb = nn.BatchNorm2d(b.out_channels) if b is not None else None
        self.identity = nn.BatchNorm2d(c) if identity else None
        self.post = nn.BatchNorm2d(a.out_channels)

    def forward(self, x):
        y = self.bna(self.a(x))
        if self.b is not None:
            y = y + self.bnb(self.b(x))
        if self.identity is not None:
            y = y + self.identity(x)
        return self.post(y)


def kept(model: nn.Module, x: torch.Tensor, capture: str = "fx") -> dict[str, str]:
    """Fold ``model`` (eval, random statistics) after capturing it with ``capture``; the
    BNs kept and their reason codes.  The folded module must still compute the original."""
    model = randomize_all(model)
    if capture == "export":
        model = _hooked(model)
    result = bnfold.fold(model, x)
    assert result.report.capture == capture
    assert result.verification.passed
    with torch.no_grad():
        out, ref = result.module(x), float64_reference(model, x)
    for o, r in zip(*((out, ref) if isinstance(out, tuple) else ((out,), (ref,))), strict=True):
        assert rel_err(o, r) < 1e-5
    return {s.bn: s.reason for s in result.skipped}


def test_decline_inputs_differ():
    """An identity BN on another tensor than the convs read: merge_inputs_differ."""

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bna = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.identity = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bna(self.a(torch.relu(x))) + self.identity(x)

    assert kept(Other(), torch.randn(2, 4, 6, 6)) == {"identity": "merge_inputs_differ"}


def test_decline_padding_that_does_not_centre():
    """3x3 unpadded beside 1x1 unpadded, stride 3 on 9x9 (both give 3x3): the windows'
    centres are a pixel apart, merge_padding on the BN after the sum."""
    model = Pair(nn.Conv2d(4, 4, 3, stride=3), nn.Conv2d(4, 4, 1, stride=3), 4, identity=False)
    assert kept(model, torch.randn(2, 4, 9, 9)) == {"post": "merge_padding"}


def test_decline_padding_modes_differ():
    """reflect beside zeros padding: merge_padding_mode on the identity BN."""
    model = Pair(
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 3, padding=1), 4
    )
    assert kept(model, torch.randn(2, 4, 6, 6)) == {
        "identity": "merge_padding_mode",
        "post": "merge_padding_mode",
    }


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_decline_branch_used_elsewhere(capture):
    """A branch's output also returned: merge_branch_shared."""

    class Shared(Pair):
        def forward(self, x):
            y = self.bna(self.a(x))
            return self.post(y + self.identity(x)), y

    model = Shared(nn.Conv2d(4, 4, 3, padding=1), None, 4)
    assert kept(model, torch.randn(2, 4, 6, 6), capture) == {
        "identity": "merge_branch_shared",
        "post": "merge_branch_shared",
    }


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_decline_groups_differ(capture):
    """A dense 3x3 beside a depthwise 1x1: merge_groups."""
    model = Pair(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1, groups=4), 4)
    assert kept(model, torch.randn(2, 4, 6, 6), capture)["identity"] == "merge_groups"


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_decline_strides_differ(capture):
    """A 1x1 of stride 2 beside an unpadded 5x5 of stride 1 (both 4x4 on 8x8):
    merge_geometry on the BN after the sum."""
    model = Pair(nn.Conv2d(4, 4, 1, stride=2), nn.Conv2d(4, 4, 5), 4, identity=False)
    assert kept(model, torch.randn(2, 4, 8, 8), capture) == {"post": "merge_geometry"}


def test_decline_custom_conv_branch():
    """A conv subclass with its own forward on a branch: custom_layer_forward."""

    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = Pair(Doubled(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), 4)
    model.bna = nn.Identity()  # the subclass stays: its BN could not fold into it anyway
    assert kept(model, torch.randn(2, 4, 6, 6)) == {
        "identity": "custom_layer_forward",
        "post": "custom_layer_forward",
    }


def test_decline_sum_that_broadcasts():
    """A one-channel conv plus a four-channel identity BN broadcasts: merge_geometry."""

    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.identity = nn.Conv2d(4, 1, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.a(x) + self.identity(x)

    model = randomize_all(Broadcast())
    result = bnfold.fold(model, torch.randn(2, 4, 6, 6))
    (skip,) = result.skipped
    assert (skip.bn, skip.reason) == ("identity", "merge_geometry")
    assert "broadcasts" in skip.detail


def test_decline_hook_on_a_branch_conv():
    """A forward hook on a conv branch: module_hooks on the identity BN, and the hook still
    runs."""

    class Unnormed(Pair):
        def forward(self, x):
            return self.post(self.bna(self.a(x)) + self.b(x) + self.identity(x))

    seen = []
    model = Unnormed(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), 4)
    model.b.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    assert kept(model, torch.randn(2, 4, 6, 6)) == {
        "identity": "module_hooks",
        "post": "module_hooks",
    }
    assert seen


def test_branch_whose_bn_stays_is_left_as_it_is():
    """A conv branch whose BN cannot fold (a hook on the BN) is no plain conv: the other
    branches merge, that branch is added to the merged conv, and its BN keeps its reason."""
    model = Pair(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), 4)
    randomize_all(model)
    model.bnb.register_forward_hook(lambda m, args, out: None)
    x = torch.randn(2, 4, 6, 6)
    result = bnfold.fold(model, x)
    assert {s.bn: s.reason for s in result.skipped} == {
        "bnb": "module_hooks",
        "post": "no_foldable_neighbour",  # it reads merged + the branch that stays
    }
    (merge,) = result.merged
    assert merge.convs == ("a",) and merge.identity_bns == ("identity",)
    with torch.no_grad():
        assert rel_err(result.module(x), float64_reference(model, x)) < 1e-5


def test_decline_in_place_sum_into_an_aliased_tensor():
    """``h += conv(h)`` writes into ``h``, which a view made before reads: merging would
    hand the view the old values, so the merge declines (merge_branch_shared).  torch.fx
    records ``+=`` on a traced tensor as ``+``, so torch.export captures it here."""

    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.identity = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            h = torch.relu(x)
            alias = h.view(h.shape)
            t = self.identity(h)
            h += self.a(h)
            return h + t, alias

    assert kept(Aliased(), torch.randn(2, 4, 6, 6), "export") == {"identity": "merge_branch_shared"}


def test_shared_conv_merges_and_its_other_call_is_unchanged():
    """A conv branch also called elsewhere: the merge makes a new conv and never writes to
    the old one, which the other call keeps using."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.identity = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.a(x) + self.identity(x), self.a(torch.relu(x))

    model = randomize_all(Shared())
    weight = model.a.weight.detach().clone()
    assert kept(model, torch.randn(2, 4, 6, 6)) == {}
    assert torch.equal(model.a.weight, weight)


def test_add_with_out_is_no_sum():
    """``torch.add(a, b, out=...)`` writes into a tensor something else may read: bnfold
    leaves it, and the identity BN says it has no neighbour."""

    class Out(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.identity = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            buf = torch.empty(x.shape)
            return torch.add(self.a(x), self.identity(x), out=buf)

    assert kept(Out(), torch.randn(2, 4, 6, 6)) == {"identity": "no_foldable_neighbour"}


def test_report_names_the_merge_in_every_format():
    """fuse's JSON, table and markdown name the merge: rule, merged conv, branches."""
    from bnfold.cli.render import to_json, to_markdown
    from bnfold.reports import FuseReport, MergedSite

    report = FuseReport(
        model="m.pt",
        format="module",
        output="m.onnx",
        exporter="dynamo",
        opset=18,
        folded=(),
        skipped=(),
        params_before=1,
        params_after=1,
        onnx_nodes=1,
        onnx_bn_nodes=0,
        verification=None,
        merged=(MergedSite("a_merged", "branch_merge", ("a", "b"), ("identity",), 1),),
    )
    assert '"identity_bns": [\n        "identity"' in to_json(report)
    md = to_markdown(report)
    assert "branch_merge" in md and "`a_merged`" in md and "`identity`" in md
    from rich.console import Console

    console = Console(width=120, record=True, color_system=None)
    from bnfold.cli.render import emit

    emit(report, "table", console)
    text = console.export_text()
    assert "merged → a_merged (branch_merge): a, b, identity, 1 skip" in text


class Scaled(nn.Identity):
    """An Identity subclass with its own arithmetic: not a value-passing node."""

    def forward(self, x):
        return 1.5 * x


class LayerScaled(nn.Module):
    """A RepVGG block with a dropout on one branch and a layer-scaled skip sum after it:
    ``x + gamma * (BN(kxk(x)) + drop(BN(k1(x))) + BN(x))``."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.kxk, self.bn_kxk = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.k1, self.bn_k1 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.identity = nn.BatchNorm2d(c)
        self.drop = nn.Dropout(0.2)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        y = self.bn_kxk(self.kxk(x)) + self.drop(self.bn_k1(self.k1(x))) + self.identity(x)
        return x + self.gamma * y


PLACES = ["kxk", "bn_kxk", "k1", "bn_k1", "identity", "drop"]


@settings(max_examples=max(10, settings.default.max_examples // 15))
@given(
    place=st.sampled_from(PLACES),
    how=st.sampled_from(["none", "hook", "pre_hook", "subclass"]),
    seed=st.integers(0, 2**16),
)
def test_what_bnfold_cannot_see_through_is_never_merged_wrong(place, how, seed):
    """A hook (changing the output or the input) or a subclass with its own forward at a
    random place of a layer-scaled RepVGG block: whatever merges, the folded module computes
    what the original computes, and every BN that stays has a reason."""
    torch.manual_seed(seed)
    model = randomize_all(LayerScaled(), seed=seed)
    target = getattr(model, place)
    if how == "hook":
        target.register_forward_hook(lambda m, args, out: out * 1.25)
    elif how == "pre_hook":
        target.register_forward_pre_hook(lambda m, args: (args[0] * 0.75,))
    elif how == "subclass":
        if place == "drop":
            model.drop = Scaled()
        elif isinstance(target, nn.Conv2d):
            target.__class__ = type("Custom", (nn.Conv2d,), {"forward": Scaled.forward})
        else:
            target.__class__ = type("Custom", (nn.BatchNorm2d,), {"forward": Scaled.forward})
    x = torch.randn(2, 4, 7, 7)
    result = bnfold.fold(model, x)
    assert result.verification.passed
    assert all(s.reason for s in result.skipped)
    for sample in (x, torch.randn(3, 4, 10, 10)):
        with torch.no_grad():
            assert rel_err(result.module(sample), float64_reference(model, sample)) < 1e-5
    if how == "none":
        assert result.skipped == () and convs_run(result.module) == 1


REPVGG_SOURCE = """
import torch
from torch import nn


class Rep(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.kxk, self.bn_kxk = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.k1, self.bn_k1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return torch.relu(self.bn_kxk(self.kxk(x)) + self.bn_k1(self.k1(x)) + self.identity(x))
"""


@pytest.mark.parametrize("fmt", ["json", "markdown", "table"])
def test_cli_fuse_names_the_merge(tmp_path, fmt):
    """``bnfold fuse`` on a RepVGG block from a state_dict: no BatchNormalization left, and
    every output format names the merge (rule, merged conv, branches)."""
    import json

    import onnx
    from typer.testing import CliRunner

    from bnfold.cli import app
    from tests.helpers import write_arch

    arch, namespace = write_arch(tmp_path, REPVGG_SOURCE, stem="rep")
    model = randomize_all(namespace["Rep"]())
    torch.save(model.state_dict(), tmp_path / "rep.pt")
    out = tmp_path / "rep.onnx"
    args = ["fuse", str(tmp_path / "rep.pt"), "--arch", f"{arch}:Rep", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--input-shape", "1,3,8,8", "--format", fmt])
    assert result.exit_code == 0, result.output
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(out)).graph.node)
    if fmt == "json":
        report = json.loads(result.stdout)
        (merge,) = report["merged"]
        assert merge == {
            "into": "kxk_merged",
            "rule": "branch_merge",
            "convs": ["kxk", "k1"],
            "identity_bns": ["identity"],
            "skips": 0,
        }
        merged_bn = {f["bn"]: f for f in report["folded"]}["identity"]
        assert (merged_bn["direction"], merged_bn["into"]) == ("merge", "kxk_merged")
        assert report["skipped"] == [] and report["onnx_bn_nodes"] == 0
    else:
        text = " ".join(result.stdout.split())
        assert "kxk_merged" in text and "branch_merge" in text and "identity" in text


# --------------------------------------------------------------------------- real models


@pytest.fixture
def flush_subnormals():
    """Random weights drive some activations of these deep models into subnormal numbers,
    which the CPU computes 10-20x slower (a float64 MobileOne pass: 19 s instead of 1.3 s);
    flushing them to zero changes values by less than 1e-300."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def measured(model: nn.Module, size: int) -> nn.Module:
    """Random gamma and beta, and running statistics measured on random images (the
    average of two train-mode batches), then eval."""
    torch.manual_seed(0)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average
        model.train()
        for _ in range(2):
            model(torch.randn(4, 3, size, size))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "size"), [("repvgg_a0", 32), ("mobileone_s0", 32), ("fastvit_t8", 32)]
)
@pytest.mark.usefixtures("flush_subnormals")
def test_timm_reparameterizable_models(tmp_path, name, size):
    """timm's RepVGG, MobileOne and FastViT (random weights, realistic statistics): every
    BatchNorm folds or merges, the ONNX holds no BatchNormalization, as many Conv nodes as
    timm's own ``reparameterize_model`` leaves and no more nodes in all, and computes what
    timm's reparameterized model computes."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import timm
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = measured(timm.create_model(name, pretrained=False), size)
    out = tmp_path / f"{name}.onnx"
    report = bnfold.fuse(
        model, out, input_shapes=[(1, 3, size, size)], dynamic_batch=False, verify_batches=1
    )
    assert report.skipped == () and report.onnx_bn_nodes == 0, report.skipped
    assert report.verification is not None and report.verification.passed
    assert report.merged
    timm_model = reparameterize_model(copy.deepcopy(model))
    x = torch.randn(1, 3, size, size)
    timm_out = tmp_path / "timm.onnx"
    torch.onnx.export(timm_model, (x,), str(timm_out), dynamo=True, verbose=False)
    ours_nodes = onnx.load(str(out)).graph.node
    timm_nodes = onnx.load(str(timm_out)).graph.node
    convs = sum(n.op_type == "Conv" for n in ours_nodes)
    assert convs <= sum(n.op_type == "Conv" for n in timm_nodes)
    assert len(ours_nodes) <= len(timm_nodes)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (ours,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        theirs = timm_model(x).numpy()
    # bnfold's verification compared its file with a float64 run of the original (within
    # rtol 1e-5); timm merges in float32, so the two files agree to float32 rounding
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4


def test_merged_export_capture_goes_to_onnx_as_a_program(tmp_path, monkeypatch):
    """Issue 14: the merge adds nodes torch.export never saw (the merged conv, the sum's
    new terms); the folded program still goes to the ONNX exporter without a second
    trace, and the file equals a float64 run of the model at another batch size."""
    import onnx
    import onnxruntime as ort

    model = _hooked(randomize_all(Block()))
    calls = count_torch_exports(monkeypatch)
    out = tmp_path / "m.onnx"
    report = bnfold.fuse(model, out, example_inputs=torch.randn(2, 6, 9, 9))
    assert report.capture == "export" and report.merged and report.verification.passed
    assert calls == ["Block"]
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("Conv") == 1 and "BatchNormalization" not in ops
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    sample = torch.randn(3, 6, 9, 9)
    (got,) = session.run(None, {session.get_inputs()[0].name: sample.numpy()})
    assert rel_err(torch.from_numpy(got), float64_reference(model, sample)) < 1e-5

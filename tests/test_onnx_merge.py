"""Merging parallel branches summed by Add/Sum into one Conv on the ONNX route
(bnfold/merge_onnx.py, issue 18): structure and numbers against a float64 reference, and
every decline with its reason code on the BatchNormalization that stays."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnx_fold import fold_onnx
from bnfold.rules import Reason

# --------------------------------------------------------------------------- builders


@dataclass(frozen=True)
class ConvSpec:
    """One conv branch ``x -> Conv [-> BatchNormalization]``."""

    kernel: tuple[int, ...]
    group: int = 1
    bias: bool = True
    bn: bool = True  # a BN after the conv, which the pairwise pass folds first
    stride: int = 1
    dilation: int = 1
    pads: tuple[int, ...] | None = None  # begin..., end...; None: centred
    auto_pad: str | None = None
    c_out: int | None = None  # None: the model's


@dataclass
class Built:
    """An ONNX model and the float64 numbers to compute what it computes."""

    model: onnx.ModelProto
    convs: list[dict] = field(default_factory=list)
    identity: list[tuple[np.ndarray, np.ndarray] | None] = field(default_factory=list)
    last_sign: int = 1  # -1: the last summand is subtracted (Sub)
    scale: np.ndarray | None = None  # the sum times one value per channel (Mul)

    def reference(self, x: np.ndarray) -> np.ndarray:
        """The sum of the branches in float64 (torch's conv on explicitly padded input)."""
        x64 = torch.from_numpy(x.astype(np.float64))
        dims = x.ndim - 2
        conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        summands = []
        for c in self.convs:
            pads = c["pads"]
            torch_pads = [p for a in reversed(range(dims)) for p in (pads[a], pads[dims + a])]
            y = conv(
                F.pad(x64, torch_pads),
                torch.from_numpy(c["w"]),
                None if c["b"] is None else torch.from_numpy(c["b"]),
                stride=c["stride"],
                dilation=c["dilation"],
                groups=c["group"],
            )
            if c["bn"] is not None:
                y = affine(y, *c["bn"])
            summands.append(y)
        for ident in self.identity:
            summands.append(x64 if ident is None else affine(x64, *ident))
        total = sum(summands[:-1], start=torch.zeros(())) + self.last_sign * summands[-1]
        if self.scale is not None:
            total = affine(total, self.scale, np.zeros_like(self.scale))
        return total.numpy()


def affine(y: torch.Tensor, s: np.ndarray, t: np.ndarray) -> torch.Tensor:
    shape = (1, -1) + (1,) * (y.dim() - 2)
    return y * torch.from_numpy(s).reshape(shape) + torch.from_numpy(t).reshape(shape)


def f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def bn_params(rng: np.random.Generator, c: int, prefix: str, eps: float = 1e-5):
    """A BN's initializers and its float64 (s, t), computed from the float32 values."""
    scale, bias = f32(rng.uniform(0.5, 1.5, c)), f32(rng.normal(0, 0.3, c))
    mean, var = f32(rng.normal(0, 0.3, c)), f32(rng.uniform(0.5, 2.0, c))
    inits = [
        numpy_helper.from_array(a, f"{prefix}.{n}")
        for a, n in zip((scale, bias, mean, var), ("scale", "bias", "mean", "var"), strict=True)
    ]
    s = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    t = bias.astype(np.float64) - mean.astype(np.float64) * s
    return inits, (s, t)


def same_pads(k: int, d: int, upper: bool) -> tuple[int, int]:
    total = d * (k - 1)  # stride 1
    small, big = total // 2, total - total // 2
    return (small, big) if upper else (big, small)


def build(
    convs: list[ConvSpec],
    identity: list[str],
    c_in: int,
    c_out: int,
    spatial: tuple[int, ...],
    sum_op: str = "Add",
    seed: int = 0,
    scale: bool = False,
) -> Built:
    """``x`` -> the conv branches and identity branches (``"bn"``: a BatchNormalization of
    ``x``, ``"skip"``: ``x`` itself), summed by a chain of Adds or one Sum into ``y``;
    ``sum_op="Sub"``: a chain of Adds whose last node subtracts, ``"Tree"``: Adds of random
    pairs; ``scale``: the sum times a
    constant per channel (a Mul), as FastViT's layer scale."""
    rng = np.random.default_rng(seed)
    dims = len(spatial)
    nodes, inits, summed = [], [], []
    built = Built(model=None)  # type: ignore[arg-type]
    for i, spec in enumerate(convs):
        out_ch = spec.c_out or c_out
        k = spec.kernel
        w = f32(rng.normal(0, 0.5, (out_ch, c_in // spec.group, *k)))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        inputs = ["x", f"w{i}"]
        b = None
        if spec.bias:
            b = f32(rng.normal(0, 0.3, out_ch))
            inits.append(numpy_helper.from_array(b, f"b{i}"))
            inputs.append(f"b{i}")
        attrs: dict = {"group": spec.group}
        if spec.stride != 1:
            attrs["strides"] = [spec.stride] * dims
        if spec.dilation != 1:
            attrs["dilations"] = [spec.dilation] * dims
        if spec.auto_pad:
            attrs["auto_pad"] = spec.auto_pad
            upper = spec.auto_pad == "SAME_UPPER"
            pairs = [same_pads(kk, spec.dilation, upper) for kk in k]
            pads = tuple(p for p, _ in pairs) + tuple(q for _, q in pairs)
        else:
            pads = spec.pads or tuple(spec.dilation * (kk - 1) // 2 for kk in k) * 2
            attrs["pads"] = list(pads)
        out = f"c{i}"
        nodes.append(helper.make_node("Conv", inputs, [out], name=f"conv{i}", **attrs))
        bn = None
        if spec.bn:
            bn_inits, bn = bn_params(rng, out_ch, f"bn{i}")
            inits += bn_inits
            nodes.append(
                helper.make_node(
                    "BatchNormalization",
                    [out, *(t.name for t in bn_inits)],
                    [f"n{i}"],
                    name=f"bn{i}",
                )
            )
            out = f"n{i}"
        summed.append(out)
        built.convs.append(
            {
                "w": w.astype(np.float64),
                "b": None if b is None else b.astype(np.float64),
                "bn": bn,
                "pads": pads,
                "stride": spec.stride,
                "dilation": spec.dilation,
                "group": spec.group,
            }
        )
    for j, kind in enumerate(identity):
        if kind == "skip":
            summed.append("x")
            built.identity.append(None)
            continue
        bn_inits, st_ = bn_params(rng, c_in, f"id{j}")
        inits += bn_inits
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                ["x", *(t.name for t in bn_inits)],
                [f"i{j}"],
                name=f"identity{j}",
            )
        )
        summed.append(f"i{j}")
        built.identity.append(st_)
    result = "total" if scale else "y"
    if sum_op == "Sum":
        nodes.append(helper.make_node("Sum", summed, [result], name="sum"))
    elif sum_op == "Tree":  # Adds of random pairs, down to one value
        pool = list(summed)
        for j in range(len(summed) - 1):
            a, b = sorted(rng.choice(len(pool), 2, replace=False))
            out = result if len(pool) == 2 else f"s{j}"
            nodes.append(helper.make_node("Add", [pool[a], pool[b]], [out], name=f"add{j}"))
            pool = [v for k, v in enumerate(pool) if k not in (a, b)] + [out]
    else:
        acc = summed[0]
        for j, value in enumerate(summed[1:]):
            last = j == len(summed) - 2
            op = "Sub" if last and sum_op == "Sub" else "Add"
            out = result if last else f"s{j}"
            nodes.append(helper.make_node(op, [acc, value], [out], name=f"add{j}"))
            acc = out
        built.last_sign = -1 if sum_op == "Sub" else 1
    if scale:
        gamma = f32(rng.uniform(0.5, 1.5, c_out))
        built.scale = gamma.astype(np.float64)
        inits.append(numpy_helper.from_array(gamma.reshape(-1, *[1] * dims), "gamma"))
        nodes.append(helper.make_node("Mul", ["gamma", "total"], ["y"], name="layer_scale"))
    spatial_names = [f"out{a}" for a in range(dims)]
    graph = helper.make_graph(
        nodes,
        "branches",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, *spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "C", *spatial_names])],
        initializer=inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    check(m)
    built.model = m
    return built


def check(m: onnx.ModelProto) -> None:
    """A valid model (the output's shape is left to inference, strict about what it sees)."""
    onnx.checker.check_model(m)
    onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)


def run(m: onnx.ModelProto, x: np.ndarray, name: str = "x") -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {name: x})[0]


def ops(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


def decision(out, bn: str):
    return next(d for d in out.decisions if d.bn == bn)


def assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6


def assert_merged(built: Built, spatial: tuple[int, ...], c_in: int) -> object:
    """One Conv and nothing else is left, every BN merged, the numbers equal the float64
    reference at batch sizes 1 and 3."""
    out = fold_onnx(built.model)
    check(out.model)
    assert ops(out.model) == ["Conv"], ops(out.model)
    assert all(d.folded for d in out.decisions), out.decisions
    assert [o.name for o in out.model.graph.output] == ["y"]
    assert len(out.merges) == 1 and out.merges[0].rule == "branch_merge"
    rng = np.random.default_rng(1)
    for batch in (1, 3):
        x = f32(rng.normal(size=(batch, c_in, *spatial)))
        ref = built.reference(x)
        assert_close(run(built.model, x), ref)  # the builder's reference is the graph's
        assert_close(run(out.model, x), ref)
    return out


# --------------------------------------------------------------------------- merges


@st.composite
def branch_sets(draw: st.DrawFn):
    dims = draw(st.integers(1, 2))
    identity = draw(st.sampled_from([[], ["bn"], ["skip"], ["bn", "skip"]]))
    c = draw(st.integers(1, 4))
    depthwise = draw(st.booleans())
    c_in = c
    c_out = c if identity or depthwise else draw(st.integers(1, 4))
    group = c if depthwise else 1
    n_convs = draw(st.integers(max(1, 2 - len(identity)), 3 - min(len(identity), 1)))
    dilation = draw(st.integers(1, 2))
    stride = 1 if identity else draw(st.integers(1, 2))
    convs = [
        ConvSpec(
            kernel=(draw(st.sampled_from([1, 3, 5])),) * dims,
            group=group,
            bias=draw(st.booleans()),
            bn=draw(st.booleans()),
            stride=stride,
            dilation=dilation,
        )
        for _ in range(n_convs)
    ]
    spatial = (draw(st.integers(5, 8)),) * dims
    sum_op = draw(st.sampled_from(["Add", "Sum", "Sub", "Tree"]))
    order = draw(st.permutations(range(n_convs)))
    scale = draw(st.booleans())
    return [convs[i] for i in order], identity, c_in, c_out, spatial, sum_op, scale


@given(branch_sets(), st.integers(0, 2**16))
def test_random_branch_sets_merge_into_one_conv(case, seed):
    """Conv branches (kernels 1/3/5, group 1 or depthwise, bias on/off, a BN or not) and
    identity branches (a BN of x, x itself) summed by a chain or a random tree of Adds, a
    Sum, or Adds ending in a Sub, times a per-channel scale or not: after the ONNX route one
    Conv is left, no BatchNormalization, and it computes the float64 sum at batch sizes 1
    and 3."""
    convs, identity, c_in, c_out, spatial, sum_op, scale = case
    built = build(convs, identity, c_in, c_out, spatial, sum_op, seed, scale)
    assert_merged(built, spatial, c_in)


@st.composite
def mixed_branch_sets(draw: st.DrawFn):
    """Branch sets that may or may not merge: per conv a kernel of 1 to 4, dilation 1 or 2,
    group 1 or depthwise and a begin pad anywhere from 0 to ``d * (k - 1)`` (the end pad
    the rest, so every branch keeps the input's size: the model is valid, the centres may
    differ); one stride."""
    dims = draw(st.integers(1, 2))
    c = draw(st.integers(1, 3))
    identity = draw(st.sampled_from([[], ["bn"], ["skip"]]))
    stride = 1 if identity else draw(st.integers(1, 2))
    convs = []
    for _ in range(draw(st.integers(1 if identity else 2, 3))):
        k, d = draw(st.integers(1, 4)), draw(st.integers(1, 2))
        total = d * (k - 1)
        begin = draw(st.integers(0, total))
        convs.append(
            ConvSpec(
                kernel=(k,) * dims,
                group=draw(st.sampled_from([1, c])),
                bias=draw(st.booleans()),
                bn=draw(st.booleans()),
                stride=stride,
                dilation=d,
                pads=(begin,) * dims + (total - begin,) * dims,
            )
        )
    spatial = (draw(st.integers(4, 7)),) * dims
    sum_op = draw(st.sampled_from(["Add", "Sum", "Sub", "Tree"]))
    return convs, identity, c, spatial, sum_op


def merges_exactly(convs: list[ConvSpec], identity: list[str]) -> bool:
    """The oracle: one group, one dilation where kernels are wider than 1, the same doubled
    offset ``2 * begin - d * (k - 1)`` everywhere (0 with an identity), and every kernel
    centred in the largest (an identity is a 1-kernel)."""
    kernels = [s.kernel[0] for s in convs] + [1] * len(identity)
    offsets = {2 * s.pads[0] - s.dilation * (s.kernel[0] - 1) for s in convs}  # type: ignore[index]
    offsets |= {0} if identity else set()
    size = max(kernels)
    return (
        len({s.group for s in convs}) == 1
        and len({s.dilation for s in convs if s.kernel[0] > 1}) <= 1
        and len(offsets) == 1
        and all((size - k) % 2 == 0 for k in kernels)
    )


@given(mixed_branch_sets(), st.integers(0, 2**16))
def test_random_branch_sets_merge_only_when_exact(case, seed):
    """Whatever the geometry, the route's output computes the float64 sum at batch sizes 1
    and 3; everything merges into one Conv exactly when the oracle says the centres, groups
    and dilations line up, and an identity BN that stays has a merge_* reason."""
    convs, identity, c, spatial, sum_op = case
    built = build(convs, identity, c, c, spatial, sum_op, seed)
    out = fold_onnx(built.model)
    check(out.model)
    rng = np.random.default_rng(seed)
    for batch in (1, 3):
        x = f32(rng.normal(size=(batch, c, *spatial)))
        assert_close(run(out.model, x), built.reference(x))
    merged = ops(out.model) == ["Conv"]
    event("merged into one Conv" if merged else "not merged into one Conv")
    assert merged == merges_exactly(convs, identity), ops(out.model)
    for d in out.decisions:
        assert d.folded or d.reason.value.startswith("merge_"), d  # type: ignore[union-attr]


def test_repvgg_block_merges_into_the_3x3_conv():
    """The RepVGG block: 3x3 conv + BN, 1x1 conv + BN, BN of x; the 3x3 conv stays, named
    in the merge with both branches and the identity BN."""
    built = build(
        [ConvSpec((3, 3), bias=False), ConvSpec((1, 1), bias=False)], ["bn"], 4, 4, (6, 6)
    )
    out = assert_merged(built, (6, 6), 4)
    (merge,) = out.merges  # type: ignore[attr-defined]
    assert (merge.into, merge.convs, merge.identity_bns, merge.skips) == (
        "conv0",
        ("conv0", "conv1"),
        ("identity0",),
        0,
    )
    assert decision(out, "identity0").rule == "branch_merge"
    assert decision(out, "identity0").into == "conv0"
    assert decision(out, "bn1").into == "conv0"  # folded into conv1, which merged into conv0


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
def test_auto_pad_same_with_stride_1_merges_even_kernels(mode):
    """auto_pad SAME_* with stride 1 pads d * (k - 1) in all, whatever the input size: a
    2-kernel and a 4-kernel share their centre and merge."""
    built = build(
        [ConvSpec((2, 2), auto_pad=mode), ConvSpec((4, 4), auto_pad=mode)], [], 3, 5, (7, 7)
    )
    out = assert_merged(built, (7, 7), 3)
    conv = out.model.graph.node[0]  # type: ignore[attr-defined]
    assert "auto_pad" not in [a.name for a in conv.attribute]


@pytest.mark.parametrize("dims", [1, 2])
def test_asymmetric_pads_with_aligned_centres_merge(dims):
    """Pads need not be symmetric, only aligned: a 3-kernel padded (2, 1) and a 1-kernel
    padded (1, 0) read around the same centre (doubled offsets 2 * 2 - 2 = 2 * 1 - 0 at the
    start, 2 * 1 - 2 = 2 * 0 - 0 at the end) and merge."""
    built = build(
        [
            ConvSpec((3,) * dims, pads=(2,) * dims + (1,) * dims),
            ConvSpec((1,) * dims, pads=(1,) * dims + (0,) * dims),
        ],
        [],
        2,
        3,
        (6,) * dims,
    )
    assert_merged(built, (6,) * dims, 2)


def test_bn_after_the_sum_folds_into_the_merged_conv():
    """A BN after the sum has no layer to fold into until the branches merge; then it
    folds backward into the merged Conv."""
    built = build([ConvSpec((3, 3)), ConvSpec((1, 1))], ["bn"], 3, 3, (5, 5))
    m = built.model
    rng = np.random.default_rng(3)
    inits, _ = bn_params(rng, 3, "post")
    graph = m.graph
    graph.node[-1].output[0] = "z"
    graph.node.append(
        helper.make_node("BatchNormalization", ["z", *(t.name for t in inits)], ["y"], name="post")
    )
    graph.initializer.extend(inits)
    check(m)
    out = fold_onnx(m)
    assert ops(out.model) == ["Conv"]
    assert decision(out, "post").rule == "conv_bn"
    x = f32(rng.normal(size=(2, 3, 5, 5)))
    assert_close(run(out.model, x), run(m, x).astype(np.float64))


def test_shared_weight_stays_for_its_other_reader():
    """A branch weight read by another Conv too: the merge writes new tensors, so the other
    Conv still reads the original weight."""
    built = build([ConvSpec((3, 3), bn=False), ConvSpec((1, 1))], ["bn"], 2, 2, (4, 4))
    m = built.model
    m.graph.node.append(
        helper.make_node("Conv", ["x", "w0"], ["other"], name="other", pads=[1] * 4)
    )
    m.graph.output.append(
        helper.make_tensor_value_info("other", TensorProto.FLOAT, ["N", "C", "H", "W"])
    )
    out = fold_onnx(m)
    assert ops(out.model) == ["Conv", "Conv"]
    assert out.merges
    x = f32(np.random.default_rng(4).normal(size=(1, 2, 4, 4)))
    opts = ort.SessionOptions()
    before = ort.InferenceSession(m.SerializeToString(), opts).run(None, {"x": x})
    after = ort.InferenceSession(out.model.SerializeToString(), opts).run(None, {"x": x})
    np.testing.assert_array_equal(after[1], before[1])
    assert_close(after[0], built.reference(x))


# --------------------------------------------------------------------------- declines


def assert_declined(m: onnx.ModelProto, reason: Reason, bn: str = "identity0") -> None:
    """The identity BN stays with ``reason`` (smaller sums without it may merge), the graph
    still computes what it computed."""
    out = fold_onnx(m)
    d = decision(out, bn)
    assert d.reason is reason, d
    assert bn in [n.name for n in out.model.graph.node if n.op_type == "BatchNormalization"]
    x_info = m.graph.input[0]
    shape = [d.dim_value or 1 for d in x_info.type.tensor_type.shape.dim]
    feeds = {i.name: f32(np.random.default_rng(5).normal(size=shape)) for i in m.graph.input}
    opts = ort.SessionOptions()
    want = ort.InferenceSession(m.SerializeToString(), opts).run(None, feeds)[0]
    got = ort.InferenceSession(out.model.SerializeToString(), opts).run(None, feeds)[0]
    assert_close(got.astype(np.float64), want.astype(np.float64))


def test_decline_branches_read_different_tensors():
    """The identity BN reads another tensor than the convs: merge_inputs_differ."""
    built = build([ConvSpec((3, 3)), ConvSpec((1, 1))], ["bn"], 2, 2, (4, 4))
    m = built.model
    bn = next(n for n in m.graph.node if n.name == "identity0")
    bn.input[0] = "x2"
    m.graph.input.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["N", 2, 4, 4]))
    assert_declined(m, Reason.MERGE_INPUTS)


def test_decline_pads_that_do_not_centre():
    """A 3x3 padded (0, 2) beside a 1x1 and an identity: the centres are one apart."""
    built = build([ConvSpec((3, 3), pads=(0, 0, 2, 2)), ConvSpec((1, 1))], ["bn"], 2, 2, (4, 4))
    assert_declined(built.model, Reason.MERGE_PADDING)


def test_decline_even_kernel_with_an_identity():
    """A 2x2 kernel has no centre tap for the identity branch."""
    built = build([ConvSpec((2, 2), auto_pad="SAME_UPPER"), ConvSpec((1, 1))], ["bn"], 2, 2, (4, 4))
    assert_declined(built.model, Reason.MERGE_PADDING)


def test_decline_different_strides():
    """Convs of strides 2 and 1 (equal shapes on a 1x1 input): merge_geometry."""
    built = build([ConvSpec((1, 1)), ConvSpec((1, 1), stride=2)], ["bn"], 2, 2, (1, 1))
    out = fold_onnx(built.model)
    assert "conv1 has strides [2, 2], conv0 [1, 1]" in decision(out, "identity0").detail
    assert_declined(built.model, Reason.MERGE_GEOMETRY)


def test_decline_identity_beside_a_strided_conv():
    """An identity branch and convs of stride 2 compute on different grids."""
    built = build([ConvSpec((1, 1), stride=2), ConvSpec((1, 1), stride=2)], ["bn"], 2, 2, (1, 1))
    out = fold_onnx(built.model)
    assert "strides" in decision(out, "identity0").detail
    assert_declined(built.model, Reason.MERGE_GEOMETRY)


def test_decline_branch_output_used_elsewhere():
    """The 1x1 branch's output (its folded BN's) is also a graph output."""
    built = build([ConvSpec((3, 3)), ConvSpec((1, 1))], ["bn"], 2, 2, (4, 4))
    m = built.model
    m.graph.output.append(
        helper.make_tensor_value_info("n1", TensorProto.FLOAT, ["N", "C", "H", "W"])
    )
    assert_declined(m, Reason.MERGE_BRANCH_SHARED)


def test_decline_branch_output_read_in_a_subgraph():
    """A branch's output read inside an If's branch counts as a use."""
    built = build([ConvSpec((3, 3)), ConvSpec((1, 1), bn=False)], ["bn"], 2, 2, (4, 4))
    m = built.model
    then = helper.make_graph(
        [helper.make_node("Identity", ["c1"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )
    m.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    m.graph.node.append(
        helper.make_node("If", ["cond"], ["picked"], then_branch=then, else_branch=other)
    )
    m.graph.output.append(
        helper.make_tensor_value_info("picked", TensorProto.FLOAT, ["N", "C", "H", "W"])
    )
    assert_declined(m, Reason.MERGE_BRANCH_SHARED)


def test_decline_groups_that_differ():
    """A dense 3x3 beside a depthwise 1x1: merge_groups."""
    built = build([ConvSpec((3, 3)), ConvSpec((1, 1), group=4)], ["bn"], 4, 4, (4, 4))
    assert_declined(built.model, Reason.MERGE_GROUPS)


def test_decline_broadcasting_add():
    """The Add broadcasts 1-channel convs over the 2-channel identity: merge_geometry."""
    built = build([ConvSpec((1, 1), c_out=1), ConvSpec((3, 3), c_out=1)], ["bn"], 2, 1, (4, 4))
    assert_declined(built.model, Reason.MERGE_GEOMETRY)
    out = fold_onnx(built.model)
    assert "broadcasts" in decision(out, "identity0").detail


def test_decline_auto_pad_same_with_a_stride_and_unknown_size():
    """auto_pad SAME_UPPER with stride 2 pads by the input's size; a symbolic size:
    merge_padding_mode."""
    built = build(
        [ConvSpec((3, 3), auto_pad="SAME_UPPER", stride=2), ConvSpec((1, 1), stride=2)],
        ["bn"],
        2,
        2,
        ("H", "W"),  # type: ignore[arg-type]
    )
    assert_declined(built.model, Reason.MERGE_PADDING_MODE)


def test_identity_bn_in_training_mode_keeps_its_own_reason():
    """A BN that is not plain (training_mode=1) keeps train_mode, not a merge code."""
    built = build([ConvSpec((3, 3)), ConvSpec((1, 1))], ["bn"], 2, 2, (4, 4))
    bn = next(n for n in built.model.graph.node if n.name == "identity0")
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    out = fold_onnx(built.model)
    assert decision(out, "identity0").reason is Reason.TRAIN_MODE
    assert [m.convs for m in out.merges] == [("conv0", "conv1")]  # the sum without it


def test_conv_branches_with_different_strides_stay_apart():
    """Without an identity BN nothing is reported, and nothing merges: 3x3 stride 2 and
    2x2 stride 1 give equal shapes on a 3x3 input but not on the same grid."""
    built = build(
        [ConvSpec((3, 3), stride=2, bn=False), ConvSpec((2, 2), pads=(0, 0, 0, 0), bn=False)],
        [],
        2,
        2,
        (3, 3),
    )
    out = fold_onnx(built.model)
    assert out.model is built.model and not out.merges


# --------------------------------------------------------------------------- the CLI


def test_cli_fuse_reports_the_merge(tmp_path):
    """bnfold fuse on an ONNX RepVGG block: the JSON report names the merge, verification
    passes, no BatchNormalization left; the table names it too."""
    from typer.testing import CliRunner

    from bnfold.cli import app

    built = build([ConvSpec((3, 3)), ConvSpec((1, 1))], ["bn"], 3, 3, (6, 6))
    source = tmp_path / "block.onnx"
    onnx.save(built.model, str(source))
    out = tmp_path / "folded.onnx"
    result = CliRunner().invoke(app, ["fuse", str(source), "--out", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["onnx_bn_nodes"] == 0 and report["verification"]["passed"]
    assert report["merged"] == [
        {
            "into": "conv0",
            "rule": "branch_merge",
            "convs": ["conv0", "conv1"],
            "identity_bns": ["identity0"],
            "skips": 0,
        }
    ]
    merged_bn = next(f for f in report["folded"] if f["bn"] == "identity0")
    assert (merged_bn["rule"], merged_bn["direction"]) == ("branch_merge", "merge")
    page = tmp_path / "report.html"
    table = CliRunner().invoke(
        app, ["fuse", str(source), "--out", str(out), "--force", "--html", str(page)]
    )
    assert table.exit_code == 0, table.output
    merged = "merged → conv0 (branch_merge): conv0, conv1, identity0"
    assert merged in table.stdout
    assert merged in page.read_text()
    markdown = CliRunner().invoke(
        app, ["fuse", str(source), "--out", str(out), "--force", "--format", "markdown"]
    )
    assert markdown.exit_code == 0, markdown.output
    assert "| `conv0` | branch_merge | `conv0`, `conv1` | `identity0` | 0 |" in markdown.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "bns", "merges", "convs", "adds"),
    [
        ("repvgg_a0", 17, 22, 22, 0),
        ("mobileone_s0", 35, 43, 43, 0),
        ("fastvit_t8", 24, 20, 52, 10),  # the adds left are the MLPs' residuals
    ],
)
def test_timm_reparameterizable_legacy_export_folds_every_bn(
    tmp_path, name, bns, merges, convs, adds
):
    """timm repvgg_a0, mobileone_s0 and fastvit_t8 (random weights, realistic BN
    statistics) exported by the legacy exporter keep 17, 35 and 24 BNs on summed branches;
    bnfold fuse merges every block (those without an identity too): 0 left, verified."""
    import timm  # the [test] extra installs it: missing is a failure, not a skip
    from typer.testing import CliRunner

    from bnfold.cli import app

    model = timm.create_model(name, pretrained=False).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    source = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(source), dynamo=False)
    assert ops(onnx.load(str(source))).count("BatchNormalization") == bns
    out = tmp_path / "folded.onnx"
    result = CliRunner().invoke(app, ["fuse", str(source), "--out", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["onnx_bn_nodes"] == 0 and report["skipped"] == []
    assert report["verification"]["passed"], report["verification"]
    assert len(report["merged"]) == merges
    folded = ops(onnx.load(str(out)))
    assert folded.count("Add") == adds and folded.count("Conv") == convs
    assert folded.count("Sub") == 0


def test_inspect_names_the_conv_an_identity_bn_merges_into():
    """bnfold.inspect on ONNX input: the identity BN folds into the conv that stays, with
    direction ``merge``; the pairwise BNs fold as before."""
    import bnfold

    built = build([ConvSpec((3, 3)), ConvSpec((1, 1))], ["bn"], 3, 3, (6, 6))
    report = bnfold.inspect(built.model)
    layers = {layer.name: layer for layer in report.layers}
    assert (layers["identity0"].fold_into, layers["identity0"].fold_direction) == (
        "conv0",
        "merge",
    )
    assert (layers["bn1"].fold_into, layers["bn1"].fold_direction) == ("conv0", "backward")
    assert report.summary.foldable == 3


def with_constant_leaf(built: Built, const: np.ndarray, as_node: bool) -> onnx.ModelProto:
    """``built``'s sum plus a constant (an initializer, or a Constant node as the legacy
    exporter writes MobileOne's ``0 + conv(x)``), added first."""
    m = built.model
    first_add = next(n for n in m.graph.node if n.op_type == "Add")
    tensor = numpy_helper.from_array(f32(const), "k")
    if as_node:
        node = helper.make_node("Constant", [], ["k"], name="const", value=tensor)
        m.graph.node.insert(0, node)
    else:
        m.graph.initializer.append(tensor)
    extra = helper.make_node("Add", [first_add.input[0], "k"], ["plus_k"], name="add_k")
    first_add.input[0] = "plus_k"
    index = list(m.graph.node).index(first_add)
    m.graph.node.insert(index, extra)
    check(m)
    return m


@pytest.mark.parametrize("as_node", [False, True])
@pytest.mark.parametrize("shape", [(), (1,), (1, 3, 1, 1)])
def test_constants_summed_in_go_into_the_bias(as_node, shape):
    """MobileOne's legacy export sums ``Constant(0) + conv(x)``: a constant of one value per
    channel (or one value) summed with the branches goes into the merged bias."""
    built = build([ConvSpec((3, 3)), ConvSpec((1, 1))], ["bn"], 3, 3, (5, 5))
    const = np.random.default_rng(6).normal(size=shape)
    m = with_constant_leaf(built, const, as_node)
    out = fold_onnx(m)
    assert ops(out.model) == ["Conv"] and len(out.model.graph.initializer) == 2
    x = f32(np.random.default_rng(7).normal(size=(2, 3, 5, 5)))
    ref = built.reference(x) + const.astype(np.float64)
    assert_close(run(out.model, x), ref)


def test_decline_constant_that_is_not_one_value_per_channel():
    """A constant that varies over the spatial axes is not a bias: merge_geometry."""
    built = build([ConvSpec((3, 3)), ConvSpec((1, 1))], ["bn"], 3, 3, (5, 5))
    m = with_constant_leaf(built, np.random.default_rng(8).normal(size=(1, 1, 5, 5)), False)
    assert_declined(m, Reason.MERGE_GEOMETRY)


def repmixer(gamma_shape: tuple[int, ...] = (3, 1, 1), seed: int = 9):
    """FastViT's RepMixer as the legacy exporter writes it:
    ``x + gamma * ((conv_3x3(x) + conv_1x1(x) + BN_id(x)) - BN_norm(x))``, depthwise; and
    the float64 reference."""
    c = 3
    built = build(
        [ConvSpec((3, 3), group=c, bn=False), ConvSpec((1, 1), group=c, bn=False)],
        ["bn"],
        c,
        c,
        (5, 5),
        seed=seed,
    )
    m = built.model
    rng = np.random.default_rng(seed)
    m.graph.node[-1].output[0] = "mixed"
    inits, (s, t) = bn_params(rng, c, "norm")
    gamma = f32(rng.uniform(0.5, 1.5, gamma_shape))
    m.graph.initializer.extend([*inits, numpy_helper.from_array(gamma, "gamma")])
    m.graph.node.extend(
        [
            helper.make_node(
                "BatchNormalization", ["x", *(i.name for i in inits)], ["normed"], name="norm"
            ),
            helper.make_node("Sub", ["mixed", "normed"], ["diff"], name="sub"),
            helper.make_node("Mul", ["diff", "gamma"], ["scaled"], name="layer_scale"),
            helper.make_node("Add", ["x", "scaled"], ["y"], name="residual"),
        ]
    )
    check(m)

    def reference(x: np.ndarray) -> np.ndarray:
        x64 = torch.from_numpy(x.astype(np.float64))
        diff = torch.from_numpy(built.reference(x)) - affine(x64, s, t)
        return (x64 + torch.from_numpy(gamma.astype(np.float64)) * diff).numpy()

    return m, reference


def test_fastvit_repmixer_with_sub_and_layer_scale_merges():
    """``x + gamma * (mixer(x) - norm(x))``: Sub gives the norm branch a negative
    coefficient and Mul by a per-channel constant scales the difference; one depthwise
    Conv is left, both BNs merged."""
    m, reference = repmixer()
    out = fold_onnx(m)
    assert ops(out.model) == ["Conv"], ops(out.model)
    assert all(d.folded for d in out.decisions)
    (merge,) = out.merges
    assert (sorted(merge.identity_bns), merge.skips) == (["identity0", "norm"], 1)
    rng = np.random.default_rng(10)
    for batch in (1, 3):
        x = f32(rng.normal(size=(batch, 3, 5, 5)))
        assert_close(run(m, x), reference(x))
        assert_close(run(out.model, x), reference(x))


def test_decline_scale_that_is_not_one_value_per_channel():
    """``mixer(x) - gamma * norm(x)`` with a gamma that varies over space: not a coefficient
    per channel, merge_geometry on the norm BN; the mixer's own sum merges."""
    m, _ = repmixer()
    gamma = next(i for i in m.graph.initializer if i.name == "gamma")
    gamma.CopyFrom(numpy_helper.from_array(f32(np.full((1, 5, 5), 0.5)), "gamma"))
    for node in m.graph.node:  # diff = mixed - gamma * normed; scaled = diff
        if node.name == "sub":
            node.input[1] = "normed_scaled"
        if node.name == "layer_scale":
            node.input[:] = ["normed", "gamma"]
            node.output[0] = "normed_scaled"
        if node.name == "residual":
            node.input[1] = "diff"
    nodes = sorted(m.graph.node, key=lambda n: n.name == "sub" or n.name == "residual")
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    check(m)
    assert_declined(m, Reason.MERGE_GEOMETRY, bn="norm")
    out = fold_onnx(m)
    assert "scales a branch by gamma" in decision(out, "norm").detail
    assert decision(out, "identity0").rule == "branch_merge"


def test_product_of_two_tensors_is_not_a_sum():
    """Mul of two computed tensors is not linear: it stays a summand of its own, and the
    branches beside it merge (conv0 + bn(x); conv1 feeds the Mul and stays)."""
    built = build([ConvSpec((3, 3)), ConvSpec((1, 1), bn=False)], ["bn"], 2, 2, (4, 4))
    m = built.model
    mul = helper.make_node("Mul", ["c1", "c1"], ["sq"], name="square")
    m.graph.node.insert(len(m.graph.node) - 2, mul)
    add0 = next(n for n in m.graph.node if n.name == "add0")
    add0.input[1] = "sq"
    check(m)
    out = fold_onnx(m)
    assert sorted(ops(out.model)) == ["Add", "Conv", "Conv", "Mul"]
    assert [(g.convs, g.identity_bns) for g in out.merges] == [(("conv0",), ("identity0",))]
    x = f32(np.random.default_rng(12).normal(size=(2, 2, 4, 4)))
    assert_close(run(out.model, x), run(m, x).astype(np.float64))


def residual_model(before: bool, op: str = "Add") -> tuple[onnx.ModelProto, Built]:
    """A RepVGG block and another input ``r``: ``r + (branches)`` summed first in the chain
    (``before``) or ``(branches) op r`` after the block's own sum."""
    built = build([ConvSpec((3, 3)), ConvSpec((1, 1))], ["bn"], 2, 2, (4, 4))
    m = built.model
    if before:
        add0 = next(n for n in m.graph.node if n.name == "add0")
        add0.input[0] = "first"
        m.graph.node.insert(0, helper.make_node(op, ["r", "n0"], ["first"], name="residual"))
        nodes = list(m.graph.node)
        residual = nodes.pop(0)
        nodes.insert(nodes.index(add0), residual)
        del m.graph.node[:]
        m.graph.node.extend(nodes)
    else:
        m.graph.node[-1].output[0] = "block"
        m.graph.node.append(helper.make_node(op, ["block", "r"], ["y"], name="residual"))
    m.graph.input.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 2, 4, 4]))
    check(m)
    return m, built


def run_with_r(m: onnx.ModelProto, x: np.ndarray, r: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(m.SerializeToString()).run(None, {"x": x, "r": r})[0]


@pytest.mark.parametrize("before", [False, True])
def test_branches_merge_beside_another_summand(before):
    """``(conv_3x3(x) + conv_1x1(x) + bn(x)) + r`` and ``((r + conv_3x3(x)) + conv_1x1(x))
    + bn(x)``: the branches of x merge, ``r`` is added to the merged conv's output."""
    m, built = residual_model(before)
    out = fold_onnx(m)
    assert ops(out.model) == ["Conv", "Add"]
    assert decision(out, "identity0").rule == "branch_merge"
    (merge,) = out.merges
    assert merge.convs == ("conv0", "conv1")
    assert [o.name for o in out.model.graph.output] == ["y"]
    rng = np.random.default_rng(11)
    x, r = (f32(rng.normal(size=(2, 2, 4, 4))) for _ in range(2))
    assert_close(run_with_r(out.model, x, r), built.reference(x) + r)


def test_inner_sum_merges_when_the_outer_sum_subtracts_another_tensor():
    """``(conv_3x3(x) + conv_1x1(x) + bn(x)) - r``: ``r`` is not a plain summand, so the
    whole sum does not merge; the block's own sum does, the Sub stays."""
    m, built = residual_model(before=False, op="Sub")
    out = fold_onnx(m)
    assert ops(out.model) == ["Conv", "Sub"]
    assert len(out.merges) == 1
    assert [n.output[0] for n in out.model.graph.node if n.op_type == "Conv"] == ["block"]
    rng = np.random.default_rng(13)
    x, r = (f32(rng.normal(size=(2, 2, 4, 4))) for _ in range(2))
    assert_close(run_with_r(out.model, x, r), built.reference(x) - r)

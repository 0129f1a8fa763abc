"""Folding BatchNormalization inside ONNX graphs (bnfold/onnx_fold.py): every producer
and consumer kind, checked on structure and against onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnx_fold import fold_onnx
from bnfold.rules import Reason

RNG = np.random.default_rng(0)


def init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def bn_node(x: str, y: str, c: int, prefix: str = "bn", eps: float = 1e-5):
    inits = [
        init(f"{prefix}.scale", RNG.uniform(-1.5, 1.5, c)),
        init(f"{prefix}.bias", RNG.normal(size=c)),
        init(f"{prefix}.mean", RNG.normal(size=c)),
        init(f"{prefix}.var", RNG.uniform(0.2, 3.0, c)),
    ]
    node = helper.make_node(
        "BatchNormalization", [x, *(i.name for i in inits)], [y], name=prefix, epsilon=eps
    )
    return node, inits


def model(nodes, inits, x_shape, y_shape, name="m") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        initializer=inits,
    )
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="bnfold-tests",
        ir_version=8,
    )
    m.metadata_props.append(onnx.StringStringEntryProto(key="owner", value="tests"))
    onnx.checker.check_model(m, full_check=True)
    return m


def run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def check_folded(m: onnx.ModelProto, x: np.ndarray, rule: str, into: str, extra_nodes: int = 0):
    """The BN is gone, everything else kept, numbers equal to float32 precision."""
    out = fold_onnx(m)
    (d,) = out.decisions
    assert (d.rule, d.into) == (rule, into), d
    folded = out.model
    onnx.checker.check_model(folded, full_check=True)
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    assert len(folded.graph.node) == len(m.graph.node) - 1 + extra_nodes
    names = {n.name for n in m.graph.node} - {"bn"}
    assert names <= {n.name for n in folded.graph.node}
    assert [i.name for i in folded.graph.input] == ["x"]
    assert [o.name for o in folded.graph.output] == ["y"]
    assert folded.opset_import == m.opset_import
    assert folded.metadata_props == m.metadata_props
    ref, got = run(m, x), run(folded, x)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    assert [n.op_type for n in m.graph.node].count("BatchNormalization") == 1  # input untouched
    return out


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_producer(group, bias):
    """Conv (grouped, with or without bias) + BN folds into the Conv."""
    inits = [init("w", RNG.normal(size=(6, 4 // group, 3, 3)))]
    inputs = ["x", "w"]
    if bias:
        inits.append(init("b", RNG.normal(size=6)))
        inputs.append("b")
    conv = helper.make_node("Conv", inputs, ["h"], name="conv", group=group, pads=[1, 1, 1, 1])
    bn, bn_inits = bn_node("h", "y", 6)
    m = model([conv, bn], inits + bn_inits, [2, 4, 5, 5], [2, 6, 5, 5])
    check_folded(m, RNG.normal(size=(2, 4, 5, 5)).astype(np.float32), "conv_bn", "conv")


@pytest.mark.parametrize("group", [1, 2, 3])
def test_conv_transpose_producer_with_groups(group):
    """ConvTranspose with group > 1 folds with the grouped output-channel layout."""
    w = init("w", RNG.normal(size=(6, 2, 2, 2)))  # C_in=6, C_out = 2 * group
    convt = helper.make_node(
        "ConvTranspose", ["x", "w"], ["h"], name="convt", group=group, strides=[2, 2]
    )
    bn, bn_inits = bn_node("h", "y", 2 * group)
    m = model([convt, bn], [w, *bn_inits], [1, 6, 3, 3], [1, 2 * group, 6, 6])
    check_folded(m, RNG.normal(size=(1, 6, 3, 3)).astype(np.float32), "convtranspose_bn", "convt")


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [True, False])
def test_gemm_producer(trans_b, with_c):
    """Gemm (transB either way, with or without C) + BN folds into the Gemm."""
    w = RNG.normal(size=(7, 5) if trans_b else (5, 7))
    inits = [init("w", w)]
    inputs = ["x", "w"]
    if with_c:
        inits.append(init("c", RNG.normal(size=7)))
        inputs.append("c")
    gemm = helper.make_node("Gemm", inputs, ["h"], name="gemm", transB=trans_b, alpha=0.5, beta=2.0)
    bn, bn_inits = bn_node("h", "y", 7)
    m = model([gemm, bn], inits + bn_inits, [3, 5], [3, 7])
    check_folded(m, RNG.normal(size=(3, 5)).astype(np.float32), "linear_bn", "gemm")


@pytest.mark.parametrize("with_add", [True, False])
def test_matmul_producer(with_add):
    """MatMul (+ Add of a constant bias) + BN folds; without an Add one is created."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="matmul")]
    inits = [init("w", RNG.normal(size=(5, 4)))]
    last = "mm"
    if with_add:
        nodes.append(helper.make_node("Add", ["mm", "b"], ["h"], name="add"))
        inits.append(init("b", RNG.normal(size=4)))
        last = "h"
    bn, bn_inits = bn_node(last, "y", 4)
    m = model([*nodes, bn], inits + bn_inits, [3, 5], [3, 4])
    check_folded(
        m,
        RNG.normal(size=(3, 5)).astype(np.float32),
        "linear_bn",
        "matmul",
        extra_nodes=0 if with_add else 1,
    )


def test_levit_tokens_through_reshape():
    """MatMul on (B, N, C) -> Reshape (B*N, C) -> BN -> Reshape back folds (LeViT)."""
    inits = [
        init("w", RNG.normal(size=(8, 6))),
        init("b", RNG.normal(size=6)),
        numpy_helper.from_array(np.array([-1, 6], np.int64), "flat"),
        numpy_helper.from_array(np.array([2, 5, 6], np.int64), "back"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "b"], ["h"], name="add"),
        helper.make_node("Reshape", ["h", "flat"], ["f"], name="flatten"),
    ]
    bn, bn_inits = bn_node("f", "n", 6)
    tail = helper.make_node("Reshape", ["n", "back"], ["y"], name="unflatten")
    m = model([*nodes, bn, tail], inits + bn_inits, [2, 5, 8], [2, 5, 6])
    check_folded(m, RNG.normal(size=(2, 5, 8)).astype(np.float32), "linear_bn", "matmul")


def test_bn_before_unpadded_conv_folds_forward():
    """BN -> Conv without padding folds into the Conv's input side."""
    bn, bn_inits = bn_node("x", "n", 4)
    conv = helper.make_node("Conv", ["n", "w"], ["y"], name="conv", group=2)
    m = model(
        [bn, conv],
        [init("w", RNG.normal(size=(6, 2, 3, 3))), *bn_inits],
        [1, 4, 6, 6],
        [1, 6, 4, 4],
    )
    out = check_folded(m, RNG.normal(size=(1, 4, 6, 6)).astype(np.float32), "bn_conv", "conv")
    assert out.decisions[0].direction.value == "forward"


def test_bn_before_padded_conv_stays():
    """BN -> Conv with zero padding stays with reason zero_padding."""
    bn, bn_inits = bn_node("x", "n", 4)
    conv = helper.make_node("Conv", ["n", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    m = model(
        [bn, conv],
        [init("w", RNG.normal(size=(6, 4, 3, 3))), *bn_inits],
        [1, 4, 6, 6],
        [1, 6, 6, 6],
    )
    (d,) = fold_onnx(m).decisions
    assert d.reason is Reason.ZERO_PADDING


def test_bn_before_gemm_folds_forward():
    """BN over features -> Gemm folds into the Gemm (a BNNeck before a classifier)."""
    bn, bn_inits = bn_node("x", "n", 5)
    gemm = helper.make_node("Gemm", ["n", "w", "c"], ["y"], name="fc", transB=1)
    m = model(
        [bn, gemm],
        [init("w", RNG.normal(size=(3, 5))), init("c", RNG.normal(size=3)), *bn_inits],
        [4, 5],
        [4, 3],
    )
    check_folded(m, RNG.normal(size=(4, 5)).astype(np.float32), "bn_linear", "fc")


def test_shared_weights_stay():
    """A Conv whose weight another Conv also uses keeps its BN (shared_weights)."""
    w = init("w", RNG.normal(size=(4, 4, 1, 1)))
    bn, bn_inits = bn_node("h", "n", 4)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], name="conv_a"),
        bn,
        helper.make_node("Conv", ["n", "w"], ["y"], name="conv_b", pads=[1, 1, 1, 1]),
    ]
    m = model(nodes, [w, *bn_inits], [1, 4, 3, 3], [1, 4, 5, 5])
    (d,) = fold_onnx(m).decisions
    assert d.reason is Reason.SHARED_WEIGHTS


def test_training_mode_and_non_constant_stay():
    """training_mode=1 and statistics that are graph inputs are reported, not folded."""
    bn, bn_inits = bn_node("h", "y", 4)
    conv = helper.make_node("Conv", ["x", "w"], ["h"], name="conv")
    m = model(
        [conv, bn],
        [init("w", RNG.normal(size=(4, 3, 1, 1))), *bn_inits],
        [1, 3, 2, 2],
        [1, 4, 2, 2],
    )
    m.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    assert fold_onnx(m).decisions[0].reason is Reason.TRAIN_MODE
    m.graph.node[1].attribute.pop()
    var = m.graph.initializer.pop()  # the running variance becomes a graph input
    m.graph.input.append(helper.make_tensor_value_info(var.name, TensorProto.FLOAT, [4]))
    assert fold_onnx(m).decisions[0].reason is Reason.NOT_CONSTANT


def test_cli_fuses_an_onnx_file(tmp_path):
    """bnfold fuse on an ONNX file folds in the graph, keeps its interface, verifies it."""
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from bnfold.cli import app

    source = Path(__file__).resolve().parent.parent / "sample_models" / "tokennet.onnx"
    out = tmp_path / "folded.onnx"
    result = CliRunner().invoke(app, ["fuse", str(source), "--out", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "onnx"
    assert len(report["folded"]) == 2 and report["skipped"] == []
    assert report["onnx_bn_nodes"] == 0
    assert report["verification"]["passed"]
    original, folded = onnx.load(str(source)), onnx.load(str(out))
    assert [i.name for i in folded.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in folded.graph.output] == [o.name for o in original.graph.output]
    assert folded.opset_import == original.opset_import


# --------------------------------------------------------------------------- helpers for
# graphs the helpers above do not build: several inputs, subgraphs, Constant weights


def graph_model(nodes, inits, inputs, outputs, opset=17, ir_version=8, functions=()):
    """A checked model from value infos given as (name, shape) pairs (float32)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        initializer=inits,
    )
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=ir_version,
        functions=list(functions),
    )
    onnx.checker.check_model(m, full_check=True)
    return m


def run_all(m: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict) -> None:
    """Both models run in onnxruntime (optimisations off) and agree to float32 rounding."""
    for ref, got in zip(run_all(a, feeds), run_all(b, feeds), strict=True):
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-5 * max(np.abs(ref).max(), 1.0)


def const_node(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(array, name)
    )


def bn_constants(prefix: str, c: int) -> tuple[list[onnx.NodeProto], list[str]]:
    """A BN's four parameters as Constant nodes (paddle2onnx's way)."""
    arrays = [
        RNG.uniform(0.5, 1.5, c),
        RNG.normal(size=c),
        RNG.normal(size=c),
        RNG.uniform(0.2, 3.0, c),
    ]
    names = [f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var")]
    return [const_node(n, a.astype(np.float32)) for n, a in zip(names, arrays, strict=True)], names


def bn_ops(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def decision(m: onnx.ModelProto, bn: str = "bn"):
    return next(d for d in fold_onnx(m).decisions if d.bn == bn)


def if_model(then_nodes, else_nodes, outer_nodes, inits, branch_out="b", c=4):
    """y = If(cond, then, else) on x (1, c, 4, 4); both branches may read outer tensors."""
    shape = [1, c, 4, 4]
    branch = [helper.make_tensor_value_info(branch_out, TensorProto.FLOAT, shape)]
    then_g = helper.make_graph(then_nodes, "then", [], branch)
    else_g = helper.make_graph(
        else_nodes, "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, shape)]
    )
    node = helper.make_node(
        "If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g
    )
    graph = helper.make_graph(
        [*outer_nodes, node],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializer=inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    return m


def both_branches(x: np.ndarray) -> list[dict]:
    return [{"x": x, "cond": np.array(flag)} for flag in (True, False)]


# --------------------------------------------------------------------------- issue 13


def test_weight_also_read_inside_a_subgraph_is_shared_issue_13():
    """Issue 13: a Conv weight an If branch also reads counts as shared: the BN stays
    (shared_weights) and the model computes what it did."""
    bn, bn_inits = bn_node("h", "n", 4)
    outer = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"), bn]
    then = [helper.make_node("Conv", ["n", "w"], ["b"], name="conv_then")]
    other = [helper.make_node("Identity", ["n"], ["e"], name="else_id")]
    w = init("w", RNG.normal(size=(4, 4, 1, 1)))
    m = if_model(then, other, outer, [w, *bn_inits])
    out = fold_onnx(m)
    (d,) = out.decisions
    assert d.reason is Reason.SHARED_WEIGHTS
    assert bn_ops(out.model) == 1
    x = RNG.normal(size=(1, 4, 4, 4)).astype(np.float32)
    for feeds in both_branches(x):
        assert_same_outputs(m, out.model, feeds)


def test_bn_inside_a_subgraph_stays_named_with_its_place_issue_13():
    """Issue 13: a BN inside an If branch is reported (subgraph), named if/then_branch/...,
    and left as it is."""
    bn, bn_inits = bn_node("h", "b", 4, prefix="bn_then")
    then = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv_then"), bn]
    other = [helper.make_node("Identity", ["x"], ["e"], name="else_id")]
    m = if_model(then, other, [], [init("w", RNG.normal(size=(4, 4, 1, 1))), *bn_inits])
    out = fold_onnx(m)
    (d,) = out.decisions
    assert (d.bn, d.reason) == ("if/then_branch/bn_then", Reason.SUBGRAPH)
    then_after = out.model.graph.node[0].attribute
    assert any(n.op_type == "BatchNormalization" for a in then_after if a.g for n in a.g.node)
    x = RNG.normal(size=(1, 4, 4, 4)).astype(np.float32)
    for feeds in both_branches(x):
        assert_same_outputs(m, out.model, feeds)


def test_initializer_read_only_inside_a_subgraph_is_kept_issue_13():
    """Issue 13: folding a main-graph BN keeps an initializer only an If branch reads (it
    was deleted, and onnxruntime refused the result)."""
    bn, bn_inits = bn_node("h", "n", 4)
    outer = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"), bn]
    then = [helper.make_node("Add", ["n", "branch_only"], ["b"], name="add_then")]
    other = [helper.make_node("Identity", ["n"], ["e"], name="else_id")]
    inits = [
        init("w", RNG.normal(size=(4, 4, 1, 1))),
        init("branch_only", RNG.normal(size=4 * 16).reshape(1, 4, 4, 4)),
        *bn_inits,
    ]
    m = if_model(then, other, outer, inits)
    out = fold_onnx(m)
    assert [d.rule for d in out.decisions] == ["conv_bn"]
    assert bn_ops(out.model) == 0
    assert "branch_only" in {t.name for t in out.model.graph.initializer}
    onnx.checker.check_model(out.model, full_check=True)
    x = RNG.normal(size=(1, 4, 4, 4)).astype(np.float32)
    for feeds in both_branches(x):
        assert_same_outputs(m, out.model, feeds)


def silero_like() -> onnx.ModelProto:
    """No BatchNormalization; an If whose branches run Conv and Gemm-free maths on outer
    initializers (silero-vad's layout: one branch per sample rate)."""
    then = [
        helper.make_node("Conv", ["x", "w16"], ["c16"], name="conv16", pads=[0, 0, 0, 0]),
        helper.make_node("Add", ["c16", "bias16"], ["b"], name="add16"),
    ]
    other = [
        helper.make_node("Conv", ["x", "w8"], ["c8"], name="conv8"),
        helper.make_node("Mul", ["c8", "scale8"], ["e"], name="mul8"),
    ]
    inits = [
        init("w16", RNG.normal(size=(4, 4, 1, 1))),
        init("bias16", RNG.normal(size=(1, 4, 1, 1))),
        init("w8", RNG.normal(size=(4, 4, 1, 1))),
        init("scale8", RNG.normal(size=(1, 4, 1, 1))),
    ]
    return if_model(then, other, [], inits)


def test_subgraphs_without_batchnorm_come_out_equivalent_issue_13():
    """Issue 13: a silero-vad-like model (If branches reading outer initializers, no BN)
    comes out untouched, and computes the same on both branches."""
    m = silero_like()
    out = fold_onnx(m)
    assert out.decisions == []
    assert out.model.SerializeToString() == m.SerializeToString()  # untouched
    onnx.checker.check_model(out.model, full_check=True)
    x = RNG.normal(size=(1, 4, 4, 4)).astype(np.float32)
    for feeds in both_branches(x):
        assert_same_outputs(m, out.model, feeds)


def test_initializers_listed_as_graph_inputs_are_not_constants_issue_13():
    """Issue 13: an initializer that is also a graph input can be overridden at run time:
    a weight or a BN statistic that is one keeps the BN (not_constant), and the output
    still lists it as an input that overrides the same way."""
    for listed in ("w", "bn.var"):
        bn, bn_inits = bn_node("h", "y", 4)
        conv = helper.make_node("Conv", ["x", "w"], ["h"], name="conv")
        inits = [init("w", RNG.normal(size=(4, 3, 1, 1))), *bn_inits]
        shape = [4, 3, 1, 1] if listed == "w" else [4]
        m = graph_model(
            [conv, bn],
            inits,
            [("x", [1, 3, 2, 2]), (listed, shape)],
            [("y", [1, 4, 2, 2])],
            ir_version=8,
        )
        out = fold_onnx(m)
        (d,) = out.decisions
        assert d.reason is Reason.NOT_CONSTANT, d
        assert [i.name for i in out.model.graph.input] == ["x", listed]
        assert listed in {t.name for t in out.model.graph.initializer}
        x = RNG.normal(size=(1, 3, 2, 2)).astype(np.float32)
        override = (RNG.normal(size=shape) if listed == "w" else RNG.uniform(1, 2, 4)).astype(
            np.float32
        )
        assert_same_outputs(m, out.model, {"x": x, listed: override})


@pytest.mark.parametrize(
    "case",
    ["spatial0_per_activation", "scalar_scale", "three_inputs", "mismatched_sizes", "int_stats"],
)
def test_odd_batchnorm_nodes_stay_with_a_reason_issue_13(case):
    """Issue 13: spatial=0 over spatial axes (opset 8), a scalar scale, three inputs,
    mismatched parameter sizes, integer statistics: kept with their reason, never a crash
    (fold_onnx and inspect's records both)."""
    from bnfold.stats import records_from_onnx

    c, opset, ir_version = 3, 17, 8
    sizes = {"scale": (c,), "bias": (c,), "mean": (c,), "var": (c,)}
    attrs: dict = {}
    if case == "spatial0_per_activation":
        opset, ir_version = 8, 4
        sizes = dict.fromkeys(sizes, (c, 4, 4))
        attrs = {"spatial": 0}
    elif case == "scalar_scale":
        sizes["scale"] = ()
    elif case == "mismatched_sizes":
        sizes["bias"] = (c + 1,)
    inits = [init("w", RNG.normal(size=(c, 2, 1, 1)))]
    for k, shape in sizes.items():
        array = RNG.uniform(0.5, 1.5, shape).astype(np.float32)
        if case == "int_stats" and k in ("mean", "var"):
            array = np.ones(shape, np.int64)
        inits.append(numpy_helper.from_array(array, k))
    names = ["scale", "bias"] if case == "three_inputs" else list(sizes)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], name="conv"),
        helper.make_node("BatchNormalization", ["h", *names], ["y"], name="bn", **attrs),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 4, 4])],
        [i for i in inits if i.name in ("w", *names)],
    )
    m = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )
    want = {
        "spatial0_per_activation": Reason.BN_PARAMETERS,
        "scalar_scale": Reason.BN_PARAMETERS,
        "three_inputs": Reason.NO_RUNNING_STATS,
        "mismatched_sizes": Reason.BN_PARAMETERS,
        "int_stats": Reason.BN_PARAMETERS,
    }[case]
    out = fold_onnx(m)
    (d,) = out.decisions
    assert d.reason is want, d
    assert bn_ops(out.model) == 1
    (rec,) = records_from_onnx(m)
    assert rec.reason == want.value
    if case == "spatial0_per_activation":  # a valid model onnxruntime runs: same numbers
        assert_same_outputs(m, out.model, {"x": RNG.normal(size=(1, 2, 4, 4)).astype(np.float32)})


def test_spatial0_on_features_folds_issue_13():
    """Issue 13: spatial=0 on a (N, C) input is a per-channel BN: it folds into the Gemm."""
    bn, bn_inits = bn_node("h", "y", 5)
    bn.attribute.append(helper.make_attribute("spatial", 0))
    gemm = helper.make_node("Gemm", ["x", "w", "c"], ["h"], name="gemm", transB=1)
    inits = [init("w", RNG.normal(size=(5, 3))), init("c", RNG.normal(size=5)), *bn_inits]
    m = graph_model([gemm, bn], inits, [("x", [4, 3])], [("y", [4, 5])], opset=8, ir_version=4)
    out = fold_onnx(m)
    (d,) = out.decisions
    assert d.rule == "linear_bn", d
    assert bn_ops(out.model) == 0
    x = RNG.normal(size=(4, 3)).astype(np.float32)
    assert_same_outputs(m, out.model, {"x": x})


@pytest.mark.parametrize("layer", ["matmul_add", "gemm"])
def test_bias_of_shape_c_by_1_is_not_per_feature_issue_13(layer):
    """Issue 13: a bias of shape (C, 1) adds one value per row, not per feature: the BN
    stays (channel_mismatch) and the numbers are the original's."""
    c = 4
    if layer == "gemm":
        nodes = [helper.make_node("Gemm", ["x", "w", "bias"], ["h"], name="gemm")]
    else:
        nodes = [
            helper.make_node("MatMul", ["x", "w"], ["mm"], name="matmul"),
            helper.make_node("Add", ["mm", "bias"], ["h"], name="add"),
        ]
    bn, bn_inits = bn_node("h", "y", c)
    inits = [init("w", RNG.normal(size=(3, c))), init("bias", RNG.normal(size=(c, 1))), *bn_inits]
    m = model([*nodes, bn], inits, [c, 3], [c, c])
    out = fold_onnx(m)
    (d,) = out.decisions
    assert d.reason is Reason.CHANNEL_MISMATCH, d
    assert bn_ops(out.model) == 1
    assert_same_outputs(m, out.model, {"x": RNG.normal(size=(c, 3)).astype(np.float32)})


def _bias_shapes():
    from hypothesis import strategies as st

    return st.sampled_from(
        [
            (),
            (1,),
            (3,),
            (1, 3),
            (3, 1),
            (1, 1),
            (3, 1, 1),
            (1, 3, 1, 1),
            (1, 3, 1),
            (1, 1, 3),
            (1, 1, 1, 1),
        ]
    )


def _per_channel(shape: tuple[int, ...], rank: int, axis: int) -> bool:
    padded = (1,) * (rank - len(shape)) + shape
    return len(shape) <= rank and all(d == 1 for i, d in enumerate(padded) if i != axis)


@pytest.mark.parametrize("layer", ["Conv", "ConvTranspose", "MatMul"])
def test_layer_then_add_of_a_constant_folds_only_when_per_channel(layer):
    """A layer -> Add(constant) -> BN folds into the layer exactly when the constant adds one
    value per output channel (hypothesis over the constant's shape); the numbers always
    match onnxruntime's run of the original (issue 14's pattern, issue 13's (C, 1))."""
    from hypothesis import given

    @given(shape=_bias_shapes())
    def check(shape):
        c = 3  # every size 3: all the shapes broadcast, only some per channel
        if layer == "MatMul":
            x_shape, rank, axis = [3, 4], 2, 1
            weight = RNG.normal(size=(4, c))
            node = helper.make_node("MatMul", ["x", "w"], ["l"], name="layer")
        else:
            x_shape, rank, axis = [1, 2, 3, 3], 4, 1
            if layer == "Conv":
                weight = RNG.normal(size=(c, 2, 1, 1))
                node = helper.make_node("Conv", ["x", "w"], ["l"], name="layer")
            else:
                weight = RNG.normal(size=(2, c, 1, 1))
                node = helper.make_node("ConvTranspose", ["x", "w"], ["l"], name="layer")
        if len(shape) > rank:
            return
        out_shape = list(
            np.broadcast_shapes((*x_shape[:-1], c) if layer == "MatMul" else (1, c, 3, 3), shape)
        )
        bn, bn_inits = bn_node("h", "y", c)
        nodes = [node, helper.make_node("Add", ["l", "k"], ["h"], name="add"), bn]
        inits = [init("w", weight), init("k", RNG.normal(size=shape)), *bn_inits]
        m = model(nodes, inits, x_shape, out_shape)
        out = fold_onnx(m)
        (d,) = out.decisions
        if _per_channel(shape, rank, axis):
            assert d.into == "layer", d
            assert bn_ops(out.model) == 0
            assert len(out.model.graph.node) == 2
        else:
            assert d.reason is Reason.CHANNEL_MISMATCH, d
        x = RNG.normal(size=x_shape).astype(np.float32)
        assert_same_outputs(m, out.model, {"x": x})

    check()


# --------------------------------------------------------------------------- issue 14


def paddle_like() -> onnx.ModelProto:
    """paddle2onnx's way: every weight and BN parameter in a Constant node. Conv -> BN ->
    Relu, ConvTranspose -> Add(bias (C,1,1)) -> BN, Conv with its weight through Cast and
    Reshape -> BN, global pool -> Flatten -> MatMul -> Add(bias) -> BN."""
    nodes: list = []

    def bn(x, y, c, prefix):
        consts, names = bn_constants(prefix, c)
        nodes.extend(consts)
        nodes.append(helper.make_node("BatchNormalization", [x, *names], [y], name=prefix))

    nodes.append(const_node("w1", RNG.normal(size=(8, 3, 3, 3)).astype(np.float32)))
    nodes.append(helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]))
    bn("c1", "b1", 8, "bn1")
    nodes.append(helper.make_node("Relu", ["b1"], ["r1"], name="relu1"))
    nodes.append(const_node("w2", RNG.normal(size=(8, 4, 2, 2)).astype(np.float32)))
    nodes.append(
        helper.make_node("ConvTranspose", ["r1", "w2"], ["t2"], name="convt2", strides=[2, 2])
    )
    nodes.append(const_node("bias2", RNG.normal(size=(4, 1, 1)).astype(np.float32)))
    nodes.append(helper.make_node("Add", ["t2", "bias2"], ["a2"], name="add2"))
    bn("a2", "b2", 4, "bn2")
    nodes.append(const_node("w3_64", RNG.normal(size=24).astype(np.float64)))
    nodes.append(
        helper.make_node("Cast", ["w3_64"], ["w3_flat"], name="cast3", to=TensorProto.FLOAT)
    )
    nodes.append(const_node("w3_shape", np.array([6, 4, 1, 1], np.int64)))
    nodes.append(helper.make_node("Reshape", ["w3_flat", "w3_shape"], ["w3"], name="reshape3"))
    nodes.append(helper.make_node("Conv", ["b2", "w3"], ["c3"], name="conv3"))
    bn("c3", "b3", 6, "bn3")
    nodes.append(helper.make_node("Relu", ["b3"], ["r3"], name="relu3"))
    nodes.append(helper.make_node("GlobalAveragePool", ["r3"], ["p"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["p"], ["f"], name="flatten"))
    nodes.append(const_node("w4", RNG.normal(size=(6, 5)).astype(np.float32)))
    nodes.append(helper.make_node("MatMul", ["f", "w4"], ["m4"], name="matmul4"))
    nodes.append(const_node("bias4", RNG.normal(size=5).astype(np.float32)))
    nodes.append(helper.make_node("Add", ["m4", "bias4"], ["a4"], name="add4"))
    bn("a4", "y", 5, "bn4")
    return graph_model(nodes, [], [("x", [1, 3, 8, 8])], [("y", [1, 5])])


def test_paddle_style_constant_weights_fold_issue_14():
    """Issue 14: with weights and BN parameters in Constant nodes (through Cast/Reshape too)
    every BN folds (fuse folded 0), the other nodes stay as they were, the numbers match."""
    m = paddle_like()
    out = fold_onnx(m)
    assert [(d.bn, d.into, d.rule) for d in out.decisions] == [
        ("bn1", "conv1", "conv_bn"),
        ("bn2", "convt2", "convtranspose_bn"),
        ("bn3", "conv3", "conv_bn"),
        ("bn4", "matmul4", "linear_bn"),
    ]
    folded = out.model
    onnx.checker.check_model(folded, full_check=True)
    assert bn_ops(folded) == 0
    layers = [n.name for n in m.graph.node if n.op_type not in ("Constant", "BatchNormalization")]
    layers = [n for n in layers if n not in ("cast3", "reshape3")]  # the weight's own chain
    assert [n.name for n in folded.graph.node if n.op_type != "Constant"] == layers
    assert not [n for n in folded.graph.node if n.op_type == "Constant"]  # all were folded
    assert [o.name for o in folded.graph.output] == ["y"]
    x = RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)
    assert_same_outputs(m, folded, {"x": x})


def test_paddle_style_inspect_reads_channels_and_statistics_issue_14():
    """Issue 14: inspect reads Constant-node BN parameters: real channel counts and
    statistics, a fold target, no no_running_stats."""
    from bnfold.loading import LoadedModel, ModelFormat
    from bnfold.stats import inspect_model

    report = inspect_model(
        LoadedModel(Path("paddle.onnx"), ModelFormat.ONNX, onnx_model=paddle_like())
    )
    assert [(r.name, r.channels, r.fold_into) for r in report.layers] == [
        ("bn1", 8, "conv1"),
        ("bn2", 4, "convt2"),
        ("bn3", 6, "conv3"),
        ("bn4", 5, "matmul4"),
    ]
    for layer in report.layers:
        assert layer.running_var is not None and layer.running_var.min >= 0.2
        assert "no_running_stats" not in layer.warnings
    assert report.summary.foldable == 4


def test_shared_constant_weight_stays_issue_14():
    """Issue 14: a Constant weight two Convs read is shared like an initializer."""
    bn, bn_inits = bn_node("h", "n", 4)
    nodes = [
        const_node("w", RNG.normal(size=(4, 4, 1, 1)).astype(np.float32)),
        helper.make_node("Conv", ["x", "w"], ["h"], name="conv_a"),
        bn,
        helper.make_node("Conv", ["n", "w"], ["y"], name="conv_b", pads=[1, 1, 1, 1]),
    ]
    m = model(nodes, bn_inits, [1, 4, 3, 3], [1, 4, 5, 5])
    assert decision(m).reason is Reason.SHARED_WEIGHTS


def test_conv_with_bias_and_an_add_folds_both_biases():
    """Conv (with bias) -> Add(per-channel constant) -> BN: both biases end up in the Add's
    constant, the Conv loses its bias input, numbers match."""
    bn, bn_inits = bn_node("h", "y", 4)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
        helper.make_node("Add", ["k", "c"], ["h"], name="add"),
        bn,
    ]
    inits = [
        init("w", RNG.normal(size=(4, 2, 3, 3))),
        init("b", RNG.normal(size=4)),
        init("k", RNG.normal(size=(1, 4, 1, 1))),
        *bn_inits,
    ]
    m = model(nodes, inits, [1, 2, 5, 5], [1, 4, 3, 3])
    out = check_folded(m, RNG.normal(size=(1, 2, 5, 5)).astype(np.float32), "conv_bn", "conv")
    conv = next(n for n in out.model.graph.node if n.op_type == "Conv")
    assert list(conv.input) == ["x", "w"]


# --------------------------------------------------------------------------- issue 18


def legacy_export_with_reshape_as() -> onnx.ModelProto:
    """torch's legacy exporter on Linear -> flatten -> BatchNorm1d -> reshape_as(y): the
    Linear's output also feeds a Shape node."""
    import io
    import warnings

    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 6)
            self.bn = nn.BatchNorm1d(6)

        def forward(self, x):
            y = self.fc(x)
            return self.bn(y.flatten(0, 1)).reshape_as(y)

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.normal_()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.randn(2, 5, 8),),
            f,
            dynamo=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
        )
    return onnx.load_from_string(f.getvalue())


def test_shape_reader_is_not_a_second_user_issue_18():
    """Issue 18: MatMul -> Shape beside MatMul -> Flatten -> BN (legacy export of
    reshape_as): Shape reads only the shape, the BN folds, the numbers match."""
    m = legacy_export_with_reshape_as()
    assert "Shape" in [n.op_type for n in m.graph.node]
    out = fold_onnx(m)
    (d,) = out.decisions
    assert (d.rule, d.direction.value) == ("linear_bn", "backward"), d
    assert bn_ops(out.model) == 0
    assert len(out.model.graph.node) == len(m.graph.node) - 1
    onnx.checker.check_model(out.model, full_check=True)
    x = RNG.normal(size=(3, 5, 8)).astype(np.float32)
    assert_same_outputs(m, out.model, {"x": x})


def test_shape_reader_of_the_bn_output_in_a_forward_fold_issue_18():
    """Issue 18: a Shape node reading the BN's output does not stop a forward fold; it reads
    the BN's input afterwards (same shape)."""
    bn, bn_inits = bn_node("x", "n", 4)
    nodes = [
        bn,
        helper.make_node("Conv", ["n", "w"], ["c"], name="conv"),
        helper.make_node("Shape", ["n"], ["s"], name="shape"),
        helper.make_node("Reshape", ["c", "s"], ["y"], name="reshape"),
    ]
    m = model(
        nodes, [init("w", RNG.normal(size=(4, 4, 1, 1))), *bn_inits], [1, 4, 3, 3], [1, 4, 3, 3]
    )
    out = fold_onnx(m)
    (d,) = out.decisions
    assert d.rule == "bn_conv", d
    assert bn_ops(out.model) == 0
    assert_same_outputs(m, out.model, {"x": RNG.normal(size=(1, 4, 3, 3)).astype(np.float32)})


def test_cli_fuse_verifies_the_legacy_reshape_as_export_issue_18(tmp_path):
    """Issue 18: bnfold fuse on that export folds the BN and passes verification."""
    import json

    from typer.testing import CliRunner

    from bnfold.cli import app

    source = tmp_path / "legacy.onnx"
    onnx.save(legacy_export_with_reshape_as(), str(source))
    out = tmp_path / "folded.onnx"
    result = CliRunner().invoke(
        app, ["fuse", str(source), "--out", str(out), "--input-shape", "2,5,8", "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["folded"]) == 1 and report["skipped"] == []
    assert report["onnx_bn_nodes"] == 0 and report["verification"]["passed"]


# --------------------------------------------------------------------------- more shapes


def test_input_model_is_not_modified():
    """fold_onnx works on its own copy: the ModelProto it is given keeps its bytes."""
    m = paddle_like()
    before = m.SerializeToString()
    fold_onnx(m)
    assert m.SerializeToString() == before


@pytest.mark.parametrize("with_add", [True, False])
def test_bn_before_matmul_folds_forward(with_add):
    """BN over features -> MatMul (+ Add of a per-feature bias) folds into the MatMul's
    weight and the bias (an Add is created when there is none)."""
    bn, bn_inits = bn_node("x", "n", 5)
    nodes = [bn, helper.make_node("MatMul", ["n", "w"], ["mm" if with_add else "y"], name="matmul")]
    inits = [init("w", RNG.normal(size=(5, 3))), *bn_inits]
    if with_add:
        nodes.append(helper.make_node("Add", ["mm", "b"], ["y"], name="add"))
        inits.append(init("b", RNG.normal(size=3)))
    m = model(nodes, inits, [4, 5], [4, 3])
    out = check_folded(
        m,
        RNG.normal(size=(4, 5)).astype(np.float32),
        "bn_linear",
        "matmul",
        extra_nodes=0 if with_add else 1,
    )
    assert out.decisions[0].direction.value == "forward"


def test_bn_before_gemm_with_alpha_beta_folds_forward():
    """BN -> Gemm(alpha, beta, transB=0): the shift goes into C scaled by alpha/beta."""
    bn, bn_inits = bn_node("x", "n", 5)
    gemm = helper.make_node("Gemm", ["n", "w", "c"], ["y"], name="fc", alpha=0.5, beta=3.0)
    m = model(
        [bn, gemm],
        [init("w", RNG.normal(size=(5, 3))), init("c", RNG.normal(size=(1, 3))), *bn_inits],
        [4, 5],
        [4, 3],
    )
    check_folded(m, RNG.normal(size=(4, 5)).astype(np.float32), "bn_linear", "fc")


def test_bn_before_gemm_with_trans_a_stays():
    """Gemm with transA=1 reads features along axis 0, not the BN's channel axis:
    channel_mismatch (sizes chosen equal so only the axis tells)."""
    bn, bn_inits = bn_node("x", "n", 4)
    gemm = helper.make_node("Gemm", ["n", "w"], ["y"], name="fc", transA=1)
    m = model([bn, gemm], [init("w", RNG.normal(size=(4, 3))), *bn_inits], [4, 4], [4, 3])
    out = fold_onnx(m)
    assert out.decisions[0].reason is Reason.CHANNEL_MISMATCH
    assert_same_outputs(m, out.model, {"x": RNG.normal(size=(4, 4)).astype(np.float32)})


def test_matmul_on_tokens_straight_into_bn_stays():
    """MatMul on (B, N, C) -> BN normalises axis 1 (tokens), not the features, even with
    N == C: channel_mismatch."""
    bn, bn_inits = bn_node("h", "y", 4)
    mm = helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul")
    m = model([mm, bn], [init("w", RNG.normal(size=(3, 4))), *bn_inits], [2, 4, 3], [2, 4, 4])
    out = fold_onnx(m)
    assert out.decisions[0].reason is Reason.CHANNEL_MISMATCH
    assert_same_outputs(m, out.model, {"x": RNG.normal(size=(2, 4, 3)).astype(np.float32)})


def test_transpose_that_moves_the_wrong_axis_stays():
    """Conv (1, C, H, W) -> Transpose(0, 2, 1, 3) -> BN over H with H == C: the channels do
    not land on the BN's axis: channel_mismatch."""
    bn, bn_inits = bn_node("t", "y", 4)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Transpose", ["c"], ["t"], name="transpose", perm=[0, 2, 1, 3]),
        bn,
    ]
    m = model(
        nodes, [init("w", RNG.normal(size=(4, 2, 1, 1))), *bn_inits], [1, 2, 4, 5], [1, 4, 4, 5]
    )
    out = fold_onnx(m)
    assert out.decisions[0].reason is Reason.CHANNEL_MISMATCH
    assert_same_outputs(m, out.model, {"x": RNG.normal(size=(1, 2, 4, 5)).astype(np.float32)})


def test_reshape_of_unknown_sizes_needs_shapes():
    """MatMul -> Reshape to a shape computed at run time -> BN: the alignment cannot be
    proven: needs_shapes."""
    bn, bn_inits = bn_node("r", "y", 6)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
        helper.make_node("Reshape", ["h", "shape"], ["r"], name="reshape"),
        bn,
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n", 8]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [init("w", RNG.normal(size=(8, 6))), *bn_inits],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert fold_onnx(m).decisions[0].reason is Reason.NEEDS_SHAPES


def test_float16_model_folds_in_float16():
    """A float16 Conv + BN folds; the folded weights stay float16 (rounded once)."""
    bn, bn_inits = bn_node("h", "y", 4)
    for t in bn_inits:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    w = numpy_helper.from_array(RNG.normal(size=(4, 3, 1, 1)).astype(np.float16), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"), bn],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4, 2, 2])],
        [w, *bn_inits],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    out = fold_onnx(m)
    assert out.decisions[0].rule == "conv_bn"
    inits = {t.name: t for t in out.model.graph.initializer}
    assert inits["w"].data_type == TensorProto.FLOAT16
    x = RNG.normal(size=(1, 3, 2, 2)).astype(np.float16)
    ref, got = run_all(m, {"x": x})[0], run_all(out.model, {"x": x})[0]
    assert np.abs(got.astype(np.float64) - ref).max() <= 1e-2 * np.abs(ref).max()


def test_fold_that_overflows_stays():
    """A float16 weight scaled past 65504 keeps the BN (overflow), nothing is written."""
    bn, bn_inits = bn_node("h", "y", 2)
    bn_inits[3].CopyFrom(numpy_helper.from_array(np.full(2, 1e-12, np.float16), "bn.var"))
    w = numpy_helper.from_array(np.full((2, 2, 1, 1), 60000, np.float16), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"), bn],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 2, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 2, 2, 2])],
        [w, *bn_inits],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    out = fold_onnx(m)
    assert out.decisions[0].reason is Reason.OVERFLOW
    assert out.model.graph.initializer[0] == m.graph.initializer[0]


def test_convtranspose_whose_channels_do_not_split_into_groups_stays():
    """ConvTranspose with in_channels not divisible by group (onnxscript declines it too):
    unsupported_layer, not a crash."""
    bn, bn_inits = bn_node("h", "y", 6)
    convt = helper.make_node("ConvTranspose", ["x", "w"], ["h"], name="convt", group=2)
    graph = helper.make_graph(
        [convt, bn],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [init("w", RNG.normal(size=(5, 3, 1, 1))), *bn_inits],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert fold_onnx(m).decisions[0].reason is Reason.UNSUPPORTED_LAYER


def test_unnamed_bn_gets_its_decision_in_inspect():
    """A BatchNormalization without a name is reported under its output's name, with its
    fold target (inspect and fuse name it alike)."""
    from bnfold.stats import records_from_onnx

    bn, bn_inits = bn_node("h", "y", 4)
    bn.name = ""
    conv = helper.make_node("Conv", ["x", "w"], ["h"], name="conv")
    m = model(
        [conv, bn],
        [init("w", RNG.normal(size=(4, 3, 1, 1))), *bn_inits],
        [1, 3, 2, 2],
        [1, 4, 2, 2],
    )
    (d,) = fold_onnx(m).decisions
    (rec,) = records_from_onnx(m)
    assert (d.bn, d.into) == ("y", "conv")
    assert (rec.name, rec.fold_into, rec.channels) == ("y", "conv", 4)


def test_bn_in_a_function_stays():
    """A BN inside a model-local function is reported (subgraph) and named function:..."""
    bn, bn_inits = bn_node("fx", "fy", 3)
    params = [i.name for i in bn_inits]
    fn = helper.make_function(
        "custom", "Norm", ["fx", *params], ["fy"], [bn], [helper.make_opsetid("", 17)]
    )
    call = helper.make_node("Norm", ["x", *params], ["y"], name="call", domain="custom")
    graph = helper.make_graph(
        [call],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2, 2])],
        bn_inits,
    )
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)],
        ir_version=8,
        functions=[fn],
    )
    out = fold_onnx(m)
    (d,) = out.decisions
    assert (d.bn, d.reason) == ("function:Norm/bn", Reason.SUBGRAPH)
    assert_same_outputs(m, out.model, {"x": RNG.normal(size=(1, 3, 2, 2)).astype(np.float32)})


def test_damaged_graphs_never_crash_the_fold():
    """Inputs emptied or dangling, attributes dropped, initializers removed, odd dtypes
    (hypothesis over damage to a paddle-style graph): fold_onnx and inspect's records
    return a decision per BN, never raise."""
    from hypothesis import given
    from hypothesis import strategies as st

    from bnfold.stats import records_from_onnx

    base = paddle_like()
    n_nodes = len(base.graph.node)

    damage = st.lists(
        st.tuples(
            st.sampled_from(
                ["empty_input", "dangling_input", "drop_attrs", "drop_output", "int_const"]
            ),
            st.integers(0, n_nodes - 1),
            st.integers(0, 5),
        ),
        min_size=1,
        max_size=4,
    )

    @given(damage)
    def check(steps):
        m = onnx.ModelProto()
        m.CopyFrom(base)
        for kind, i, j in steps:
            node = m.graph.node[i]
            if kind in ("empty_input", "dangling_input") and node.input:
                node.input[j % len(node.input)] = "" if kind == "empty_input" else "nowhere"
            elif kind == "drop_attrs":
                del node.attribute[:]
            elif kind == "drop_output" and node.output:
                node.output[0] = ""
            elif kind == "int_const" and node.op_type == "Constant" and node.attribute:
                node.attribute[0].t.CopyFrom(
                    numpy_helper.from_array(np.arange(j + 1, dtype=np.int64), node.output[0])
                )
        bns = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
        assert len(fold_onnx(m).decisions) == bns
        assert len(records_from_onnx(m)) == bns

    check()

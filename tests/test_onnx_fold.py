"""Folding BatchNormalization inside ONNX graphs (bnfold/onnx_fold.py): every producer
and consumer kind, checked on structure and against onnxruntime."""

from __future__ import annotations

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

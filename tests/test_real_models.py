"""Real torchvision and timm architectures end to end (random weights, statistics from a few
train-mode passes): bnfold folds at least as many BNs as torch.fx's fuse and the dynamo ONNX
exporter, and the result is exact."""

from __future__ import annotations

import copy
import json
import warnings

import onnx
import pytest
import torch
from torch import nn

from bnfold.fold_torch import fold_graph
from bnfold.graph import bn_site, capture, is_bn_module, propagate_shapes

pytestmark = pytest.mark.slow

import timm  # noqa: E402 - the [test] extra installs both: missing is a failure, not a skip
import torchvision  # noqa: E402


def build(name: str) -> nn.Module:
    source, arch = name.split(":")
    torch.manual_seed(0)
    if source == "torchvision":
        model = torchvision.models.get_model(arch, weights=None)
    else:
        model = timm.create_model(arch, pretrained=False)
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if is_bn_module(m) and getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        for _ in range(2):
            model(torch.randn(2, 3, 224, 224))
    return model.eval()


def bn_left_in_graph(gm: torch.fx.GraphModule) -> int:
    return sum(bn_site(gm, node) is not None for node in gm.graph.nodes)


def fx_fuse_left(model: nn.Module, x: torch.Tensor) -> int | None:
    """BNs torch.fx's fuse leaves (None if it fails or changes the outputs)."""
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(copy.deepcopy(model))
        with torch.no_grad():
            ok = torch.allclose(fused(x), model(x), rtol=1e-3, atol=1e-4)
    except Exception:  # noqa: BLE001 - fx cannot trace some models
        return None
    return bn_left_in_graph(fused) if ok else None


def dynamo_left(model: nn.Module, x: torch.Tensor, path) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True)
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize(
    "name",
    [
        "torchvision:resnet18",
        "torchvision:mobilenet_v3_small",
        "torchvision:densenet121",
        "timm:levit_128s",
        "timm:efficientnet_b0",
    ],
)
def test_bnfold_folds_at_least_as_much_as_its_peers(name, tmp_path):
    """BN left by bnfold <= the best of torch.fx fuse and the dynamo exporter; output exact."""
    model = build(name)
    x = torch.randn(2, 3, 224, 224)
    gm = capture(model)
    propagate_shapes(gm, [x])
    outcome = fold_graph(gm, model, shapes_known=True)
    ours = bn_left_in_graph(outcome.module)
    assert ours == sum(not d.folded for d in outcome.decisions)
    peers = [
        n
        for n in (fx_fuse_left(model, x), dynamo_left(model, x, tmp_path / "p.onnx"))
        if n is not None
    ]
    assert peers, "no peer could process the model"
    assert ours <= min(peers), (ours, peers)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        got = outcome.module(x).double()
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
    if name == "timm:levit_128s":
        assert ours == 0  # Linear+BN over tokens: every one folds


def test_resnet18_state_dict_end_to_end(tmp_path):
    """bnfold fuse on a torchvision state_dict: no BN left in ONNX, verification passes."""
    from typer.testing import CliRunner

    from bnfold.cli import app

    weights = tmp_path / "resnet18.pth"
    torch.save(build("torchvision:resnet18").state_dict(), weights)
    out = tmp_path / "r18.onnx"
    result = CliRunner().invoke(
        app,
        [
            "fuse",
            str(weights),
            "--arch",
            "torchvision:resnet18",
            "--input-shape",
            "1,3,224,224",
            "--out",
            str(out),
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["folded"]) == 20
    assert report["onnx_bn_nodes"] == 0
    assert report["verification"]["passed"]

"""The peer for ``bnfold fuse``: a bare torch.onnx.export(dynamo=True) of the same model.

Loads the same state_dict into torchvision's ResNet-50 and exports it with the same
dynamic batch axis bnfold uses; no folding analysis, no verification.
"""

from __future__ import annotations

import sys

import torch
import torchvision


def main(weights: str, out: str, exporter: str = "dynamo") -> None:
    model = torchvision.models.resnet50(weights=None)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    x = torch.randn(2, 3, 224, 224)
    if exporter == "dynamo":
        torch.onnx.export(
            model, (x,), out, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},)
        )
    else:
        torch.onnx.export(
            model,
            (x,),
            out,
            dynamo=False,
            input_names=["input"],
            dynamic_axes={"input": {0: "batch"}},
        )


if __name__ == "__main__":
    main(*sys.argv[1:])

"""The peer for ``bnfold fuse``: a bare torch.onnx.export(dynamo=True) of the same model.

    python bench/peer_export.py MODEL WEIGHTS OUT [dynamo|legacy]

MODEL is ``resnet50`` (torchvision), ``yolov8n`` or ``unet`` (tests/shipped.py's builders,
as ``bnfold fuse --arch`` builds them); the same state_dict is loaded and the model is
exported with the same dynamic batch axis bnfold uses, at batch 2 (torch.export takes a
batch of 1 for a constant); no folding analysis, no verification.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def build(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    if name == "resnet50":
        import torchvision

        return torchvision.models.resnet50(weights=None), (2, 3, 224, 224)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.shipped import smp_model, yolo

    if name == "yolov8n":
        return yolo(), (2, 3, 320, 320)
    return smp_model(), (2, 3, 256, 256)


def main(name: str, weights: str, out: str, exporter: str = "dynamo") -> None:
    model, shape = build(name)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    x = torch.randn(*shape)
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

"""Write the benchmark inputs (random-weight ResNet-50 with real BN statistics) to bench/data."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data"


def resnet50() -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model(torch.randn(4, 3, 224, 224))
    return model.eval()


def tiny() -> torch.nn.Module:
    """A ~1 MB torchvision model: a fuse run on it measures the fixed memory of a run
    (libraries, exporter, onnxruntime), which the memory benchmark subtracts."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None, width_mult=0.1).train()
    with torch.no_grad():
        model(torch.randn(4, 3, 224, 224))
    return model.eval()


# the models the fuse benchmark times against a bare export: name -> (arch spec for
# ``bnfold fuse --arch``, input shape); built by tests/shipped.py, random weights, statistics
# from two train-mode passes
SHIPPED = {
    "yolov8n": ("tests/shipped.py:yolo", (1, 3, 320, 320)),
    "unet": ("tests/shipped.py:smp_model", (1, 3, 256, 256)),
}


def shipped(name: str) -> torch.nn.Module:
    sys.path.insert(0, str(DATA.parents[1]))
    from tests.shipped import populate, smp_model, yolo

    model = yolo() if name == "yolov8n" else smp_model()
    return populate(model, SHIPPED[name][1])


def main() -> None:
    DATA.mkdir(exist_ok=True)
    for name in SHIPPED:
        if not (DATA / f"{name}.pth").exists():
            torch.save(shipped(name).state_dict(), DATA / f"{name}.pth")
    if not (DATA / "tiny.pth").exists():
        torch.save(tiny().state_dict(), DATA / "tiny.pth")
    target = DATA / "resnet50.pth"
    if not target.exists():
        torch.save(resnet50().state_dict(), target)
    onnx_target = DATA / "resnet50.onnx"
    if not onnx_target.exists():
        import torchvision

        model = torchvision.models.resnet50(weights=None)
        model.load_state_dict(torch.load(target, weights_only=True))
        torch.onnx.export(
            model.eval(),
            (torch.randn(1, 3, 224, 224),),
            str(onnx_target),
            dynamo=False,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            input_names=["input"],
        )
    print(target, onnx_target, file=sys.stderr)


if __name__ == "__main__":
    main()

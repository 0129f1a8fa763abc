"""The architectures people ship, built as a user builds them, never downloading anything.

ultralytics YOLO from the yaml inside its package, torchvision segmentation and detection
models with no weights of any kind, segmentation_models_pytorch with no encoder weights,
Hugging Face vision models from their default configs. Weights are random; ``populate``
gives every BatchNorm realistic statistics (a few train-mode passes on random batches).

Used by tests/test_shipped_models.py and bench/shipped_models_probe.py; each builder is
also an ``--arch tests/shipped.py:callable`` for bnfold (arguments through --arch-kwargs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

HERE = __file__


# --------------------------------------------------------------------------- builders


def yolo(cfg: str = "yolov8n.yaml") -> nn.Module:
    """An ultralytics model from a yaml shipped in the package: detection, ``-cls`` or ``-seg``."""
    from ultralytics.nn.tasks import ClassificationModel, DetectionModel, SegmentationModel

    if "-cls" in cfg:
        return ClassificationModel(cfg, verbose=False)
    if "-seg" in cfg:
        return SegmentationModel(cfg, verbose=False)
    return DetectionModel(cfg, verbose=False)


def torchvision_model(name: str, **kwargs: Any) -> nn.Module:
    """A torchvision model with no weights and no backbone weights (either would download)."""
    import torchvision

    return torchvision.models.get_model(name, weights=None, weights_backbone=None, **kwargs)


def freeze_bn(model: nn.Module) -> nn.Module:
    """Every BatchNorm2d replaced by torchvision's FrozenBatchNorm2d with the same statistics,
    as torchvision builds its detection backbones when given pretrained weights."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                with torch.no_grad():
                    for key in ("weight", "bias", "running_mean", "running_var"):
                        getattr(frozen, key).copy_(getattr(child, key))
                setattr(parent, name, frozen)
    return model


def fasterrcnn_frozen() -> nn.Module:
    """fasterrcnn_mobilenet_v3_large_320_fpn with FrozenBatchNorm2d, as the pretrained one."""
    return freeze_bn(torchvision_model("fasterrcnn_mobilenet_v3_large_320_fpn"))


def smp_model(arch: str = "Unet", encoder: str = "resnet34") -> nn.Module:
    """A segmentation_models_pytorch model; ``encoder_weights=None`` (the default downloads)."""
    import segmentation_models_pytorch as smp

    return getattr(smp, arch)(encoder_name=encoder, encoder_weights=None)


def hf_model(cls: str = "ResNetForImageClassification") -> nn.Module:
    """A Hugging Face transformers model from its default config (no hub access)."""
    import transformers

    model_cls = getattr(transformers, cls)
    return model_cls(model_cls.config_class())


# --------------------------------------------------------------------------- statistics


def populate(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Random gamma/beta and running statistics from two train-mode passes, then eval.

    A torchvision detector needs targets in train mode, so its backbone alone is run.
    """
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        runner = getattr(model, "backbone", None) if _is_torchvision_detector(model) else model
        assert runner is not None
        runner.train()
        batch = (2, *shape[1:])  # BN after global pooling needs a batch > 1 in train mode
        for _ in range(2):
            runner(torch.randn(batch))
    return model.eval()


def _is_torchvision_detector(model: nn.Module) -> bool:
    return type(model).__module__.startswith("torchvision.models.detection")


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Shipped:
    """One shipped architecture: how to build it with realistic statistics, and with which
    ``--arch`` bnfold can build it for a state_dict (None: no importable builder)."""

    name: str
    build: Callable[[], nn.Module]  # the architecture, random weights
    shape: tuple[int, ...]  # the input bnfold is given, batch 1 as users give it
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    after: Callable[[nn.Module], nn.Module] | None = None  # applied after populate
    exportable: bool = True  # False: torch.onnx.export(dynamo=True) cannot export it
    package: str = "torch"  # the import the case needs (skipped without it)

    def make(self) -> nn.Module:
        """The architecture with realistic statistics, in eval mode."""
        return self.finish(self.build())

    def finish(self, model: nn.Module) -> nn.Module:
        model = populate(model, self.shape)
        return self.after(model).eval() if self.after else model


def _yolo_case(cfg: str) -> Shipped:
    task = {"-cls": "ClassificationModel", "-seg": "SegmentationModel"}.get(
        cfg.removesuffix(".yaml")[-4:], "DetectionModel"
    )
    return Shipped(
        name=cfg.removesuffix(".yaml"),
        build=lambda: yolo(cfg),
        shape=(1, 3, 320, 320),
        arch=f"ultralytics.nn.tasks:{task}",
        arch_kwargs={"cfg": cfg, "verbose": False},
        package="ultralytics",
    )


def _tv_case(name: str) -> Shipped:
    return Shipped(
        name=name,
        build=lambda: torchvision_model(name),
        shape=(1, 3, 224, 224),
        arch=f"torchvision:{name}",  # no kwargs: bnfold must not download backbone weights
        package="torchvision",
    )


def _hf_case(cls: str, size: int = 224) -> Shipped:
    return Shipped(
        name=f"hf {cls.removesuffix('ForImageClassification')}",
        build=lambda: hf_model(cls),
        shape=(1, 3, size, size),
        arch=f"{HERE}:hf_model",
        arch_kwargs={"cls": cls},
        package="transformers",
    )


CASES = [
    *(_yolo_case(c) for c in ("yolov8n.yaml", "yolov8n-cls.yaml", "yolov8n-seg.yaml")),
    *(_yolo_case(c) for c in ("yolo11n.yaml", "yolo11n-cls.yaml", "yolo11n-seg.yaml")),
    _tv_case("deeplabv3_mobilenet_v3_large"),
    _tv_case("lraspp_mobilenet_v3_large"),
    Shipped(
        name="fasterrcnn_mobilenet_v3_large_320_fpn (FrozenBN)",
        build=lambda: torchvision_model("fasterrcnn_mobilenet_v3_large_320_fpn"),
        shape=(1, 3, 320, 320),
        arch=f"{HERE}:fasterrcnn_frozen",
        after=freeze_bn,
        exportable=False,
        package="torchvision",
    ),
    Shipped(
        name="smp Unet resnet34",
        build=lambda: smp_model("Unet", "resnet34"),
        shape=(1, 3, 224, 224),
        arch="segmentation_models_pytorch:Unet",
        arch_kwargs={"encoder_name": "resnet34", "encoder_weights": None},
        package="segmentation_models_pytorch",
    ),
    Shipped(
        name="smp DeepLabV3Plus mobilenet_v2",
        build=lambda: smp_model("DeepLabV3Plus", "mobilenet_v2"),
        shape=(1, 3, 224, 224),
        arch="segmentation_models_pytorch:DeepLabV3Plus",
        arch_kwargs={"encoder_name": "mobilenet_v2", "encoder_weights": None},
        package="segmentation_models_pytorch",
    ),
    _hf_case("ResNetForImageClassification"),
    _hf_case("RegNetForImageClassification"),
    _hf_case("MobileViTForImageClassification", 256),
    _hf_case("ConvNextForImageClassification"),  # no BatchNorm: the control
]
BY_NAME = {c.name: c for c in CASES}

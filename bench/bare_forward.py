"""The peer of ``bnfold inspect --data``: the same forward passes in a bare PyTorch loop.

    python bench/bare_forward.py WEIGHTS IMAGE_FOLDER [BATCH_SIZE]

ResNet-50 with the weights, eval mode, inference mode; the images decoded exactly as
bnfold decodes them (Pillow, RGB, a contiguous (C, H, W) array scaled to [0, 1], normalised
with the ImageNet mean and std), in path order, batches of 32.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image


def main() -> None:
    weights, folder = Path(sys.argv[1]), Path(sys.argv[2])
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    model = torchvision.models.resnet50(weights=None)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        for start in range(0, len(files), size):
            pixels = []
            for path in files[start : start + size]:
                with Image.open(path) as img:
                    pixels.append(np.asarray(img.convert("RGB"), dtype=np.float32))
            # contiguous (N, C, H, W), as torchvision's to_tensor gives and bnfold feeds
            x = torch.from_numpy(
                np.ascontiguousarray(np.stack(pixels).transpose(0, 3, 1, 2)) / 255.0
            )
            model((x - mean) / std)


if __name__ == "__main__":
    main()

"""The ``--data`` options, shared by the commands that run a model on real inputs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from bnfold.errors import BnfoldError

if TYPE_CHECKING:
    from bnfold.data import DataOptions

DATA_HELP = (
    "Real inputs: a .npz (one array per model input, the first axis the sample), a .npy, "
    "a folder of images (needs: pip install 'bnfold[data]'), or module:callable / "
    "path/file.py:callable returning an iterable of batches (a tensor, or a tuple of "
    "tensors for several inputs)."
)
BATCH_SIZE = typer.Option(
    32, "--batch-size", min=1, help="Samples per forward pass (batches of near-equal sizes)."
)
LIMIT = typer.Option(
    None,
    "--limit",
    min=1,
    metavar="N",
    help="Use only the first N samples (images in path order; a callable's batches are "
    "cut at N samples).",
)
IMAGE_SIZE = typer.Option(
    None,
    "--image-size",
    metavar="SIZE|H,W",
    help="Images: resize (bilinear) to cover this size, then centre-crop to it. Default: "
    "the images' own size (they must then all agree).",
)
MEAN = typer.Option(
    None,
    "--mean",
    metavar="M1,M2,...",
    help="Normalise the data per channel, (x - mean) / std, after images are scaled to "
    "[0, 1]. Never assumed: ImageNet models use 0.485,0.456,0.406.",
)
STD = typer.Option(
    None,
    "--std",
    metavar="S1,S2,...",
    help="Standard deviations for --mean (ImageNet models: 0.229,0.224,0.225).",
)


def data_options(
    spec: str | Path | None,
    batch_size: int,
    limit: int | None,
    image_size: str | None,
    mean: str | None,
    std: str | None,
    option: str = "--data",
) -> DataOptions | None:
    """The parsed options; None without ``option`` (``--data``, or ``fuse``'s
    ``--recalibrate-data``), and then no other data option may be given."""
    from bnfold.data import DataOptions, parse_floats, parse_size

    if spec is None:
        given = [
            name
            for name, value in (
                ("--limit", limit),
                ("--image-size", image_size),
                ("--mean", mean),
                ("--std", std),
            )
            if value is not None
        ]
        if given:
            raise BnfoldError(f"{', '.join(given)} only applies with {option}")
        return None
    return DataOptions(
        spec=spec,
        batch_size=batch_size,
        limit=limit,
        image_size=parse_size(image_size) if image_size is not None else None,
        mean=parse_floats(mean, "--mean") if mean is not None else None,
        std=parse_floats(std, "--std") if std is not None else None,
    )

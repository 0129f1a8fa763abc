"""Example inputs: parse ``--input-shape``, infer a shape when the first layer decides it,
make seeded random batches and read ``--inputs data.npz``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bnfold.errors import BnfoldError, LoadError

if TYPE_CHECKING:
    import torch
    from torch import fx

__all__ = [
    "batch_size",
    "infer_example_inputs",
    "parse_shape",
    "random_batches",
    "read_npz",
    "verification_batches",
    "with_batch",
]

_DTYPES = (
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
)
_SPATIAL = {1: 256, 2: 64, 3: 16}  # a size any conv stack with global pooling accepts


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> (1, 3, 224, 224); ``scalar`` (or ``()``)
    -> () for a 0-dimensional input."""
    if text.strip().lower() in ("scalar", "()", "[]"):
        return ()
    parts = text.replace("x", ",").replace(" ", "").split(",")
    try:
        shape = tuple(int(p) for p in parts if p)
    except ValueError as e:
        raise BnfoldError(f"--input-shape {text!r} is not a comma-separated list of sizes") from e
    if not shape or any(d <= 0 for d in shape):
        raise BnfoldError(f"--input-shape {text!r} must list positive sizes")
    return shape


def check_dtype(name: str) -> str:
    if name not in _DTYPES:
        raise BnfoldError(f"--input-dtype {name!r} is not one of {', '.join(_DTYPES)}")
    return name


def infer_example_inputs(gm: fx.GraphModule, batch: int = 2) -> list[torch.Tensor] | None:
    """One random input when the model has one input and its first layer fixes the shape."""
    import torch
    from torch import nn

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    frontier = list(placeholders[0].users)
    seen = set()
    while frontier:  # look through shape-free ops (e.g. a leading dropout) for the first layer
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            m = gm.get_submodule(str(node.target))
            if isinstance(m, nn.modules.conv._ConvNd):
                dims = len(m.kernel_size)
                shape = (batch, m.in_channels, *([_SPATIAL[dims]] * dims))
                return [torch.randn(shape, generator=torch.Generator().manual_seed(0))]
            if isinstance(m, nn.Linear):
                return [
                    torch.randn(batch, m.in_features, generator=torch.Generator().manual_seed(0))
                ]
            return None
        if node.op == "call_method" and node.target in ("contiguous", "float"):
            frontier.extend(node.users)
            continue
        return None
    return None


def random_batches(
    shapes: Sequence[tuple[int, ...]],
    dtype: str | Sequence[str],
    count: int,
    seed: int = 0,
    values: Sequence[np.ndarray | None] | None = None,
) -> list[list[torch.Tensor]]:
    """``count`` batches of seeded inputs, one per shape: standard normal for floating
    dtypes; for integer and bool inputs, values drawn from ``values[i]`` when given (the
    values that input takes in the user's data: a sample rate that must be 8000 or 16000
    stays one of them), else 0..9.  ``dtype`` is one dtype name for every input or one per
    input."""
    import torch

    dtypes = [dtype] * len(shapes) if isinstance(dtype, str) else list(dtype)
    if len(dtypes) != len(shapes):
        raise BnfoldError(
            f"{len(dtypes)} input dtypes for {len(shapes)} inputs: give one --input-dtype, "
            "or one per --input-shape"
        )
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        batch = []
        for i, (shape, name) in enumerate(zip(shapes, dtypes, strict=True)):
            torch_dtype = getattr(torch, name)
            seen = values[i] if values is not None else None
            if torch_dtype.is_floating_point:
                batch.append(torch.randn(shape, generator=gen).to(torch_dtype))
            elif seen is not None and seen.size:
                pick = torch.randint(0, seen.size, shape, generator=gen)
                batch.append(torch.from_numpy(np.ascontiguousarray(seen))[pick].to(torch_dtype))
            elif torch_dtype is torch.bool:
                batch.append(torch.randint(0, 2, shape, generator=gen).bool())
            else:
                batch.append(torch.randint(0, 10, shape, generator=gen, dtype=torch_dtype))
        out.append(batch)
    return out


def accepted_shape(model: torch.nn.Module) -> str | None:
    """The input shape the model's first conv or linear layer takes, as text:
    ``(batch, 3, size, size)`` or ``(..., 128)``; None when neither comes first."""
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            dims = len(m.kernel_size)
            return f"(batch, {m.in_channels}" + ", size" * dims + ")"
        if isinstance(m, nn.Linear):
            return f"(..., {m.in_features})"
    return None


def input_names(model: torch.nn.Module, count: int) -> list[str]:
    """Names of the model's first ``count`` inputs: its forward's parameters (a graph's
    placeholders), ``input i`` where unknown."""
    import inspect

    import torch

    names: list[str] = []
    if isinstance(model, torch.fx.GraphModule):
        names = [n.name for n in model.graph.nodes if n.op == "placeholder"]
    else:
        try:
            params = inspect.signature(model.forward).parameters.values()
            names = [
                p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        except (TypeError, ValueError):
            names = []
    return [f"input {i} ({names[i]})" if i < len(names) else f"input {i}" for i in range(count)]


def dtype_name(t: torch.Tensor) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(t.dtype).removeprefix("torch.")


def batch_size(batch: Sequence[torch.Tensor]) -> int | None:
    """The batch size: the first axis the inputs with at least one axis share, or None."""
    sizes = {int(t.shape[0]) for t in batch if t.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def with_batch(batch: Sequence[torch.Tensor], size: int, reference: int) -> list[torch.Tensor]:
    """``batch`` with every input whose first axis is ``reference`` long resized to ``size``
    along it (rows repeated in turn, or the first ``size`` taken)."""
    out = []
    for t in batch:
        if t.dim() > 0 and t.shape[0] == reference:
            index = [i % reference for i in range(size)]
            t = t[index].contiguous()
        out.append(t)
    return out


SCALE = 100.0  # verification also feeds inputs this much larger (exporters' overflows show)


def verification_batches(
    example: Sequence[torch.Tensor],
    count: int,
    *,
    seed: int,
    real: list[list[torch.Tensor]] | None = None,
    real_name: str = "--inputs",
    other_batch: int | None = None,
) -> tuple[list[list[torch.Tensor]], tuple[str, ...]]:
    """The inputs verification feeds, and a line describing each group.

    ``count`` seeded random batches shaped and typed like ``example`` (integer inputs take
    the values they have in ``real``, the user's data, when it is given); the user's data;
    one batch with the floating-point inputs scaled by ``SCALE`` (an exporter that
    overflows, ``log(sigmoid(x))`` for ``logsigmoid``, shows only on large inputs); and,
    for a dynamic batch axis, one batch at ``other_batch``.
    """
    shapes = [tuple(t.shape) for t in example]
    dtypes = [dtype_name(t) for t in example]
    values = None
    if real is not None:
        values = [None if t.is_floating_point() else np.unique(t.detach().numpy()) for t in real[0]]
    batches: list[list[torch.Tensor]] = []
    fed: list[str] = []
    size = batch_size(example)
    other = other_batch if other_batch is not None and size not in (None, other_batch) else None
    # with a dynamic batch axis, the last random batch is of the other batch size
    same = count - 1 if other is not None and count >= 2 else count
    if same:
        batches += random_batches(shapes, dtypes, same, seed=seed, values=values)
        fed.append(f"{same} seeded random batch(es) of shape {_shapes(shapes)}")
    if real is not None:
        batches += real
        fed.append(f"{real_name} ({_shapes([tuple(t.shape) for t in real[0]])})")
    base = batches[0] if batches else list(example)
    if any(t.is_floating_point() for t in base):
        batches.append([t * SCALE if t.is_floating_point() else t for t in base])
        fed.append(f"1 batch scaled by {SCALE:g}")
    if other is not None:
        assert size is not None
        if same < count:
            moved = [tuple(t.shape) for t in with_batch(example, other, size)]
            batches += random_batches(moved, dtypes, 1, seed=seed + 1, values=values)
        else:
            batches.append(with_batch(base, other, batch_size(base) or size))
        fed.append(f"1 batch of batch size {other} (the batch axis is dynamic)")
    return batches, tuple(fed)


def _shapes(shapes: Sequence[tuple[int, ...]]) -> str:
    return ", ".join(str(list(s)) for s in shapes)


def read_npz(path: Path, as_numpy: bool = False) -> list[list[Any]]:
    """Batches from an .npz: one array per model input, in the file's key order; each
    array's first axis is the batch. Torch tensors unless ``as_numpy``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = [data[k] for k in data.files]
    except (OSError, ValueError) as e:
        raise LoadError(f"cannot read inputs: {e}", path=path) from e
    if not arrays:
        raise LoadError("the .npz holds no arrays", path=path)
    arrays = [np.ascontiguousarray(a) for a in arrays]
    if as_numpy:
        return [arrays]
    import torch

    return [[torch.from_numpy(a) for a in arrays]]


def onnx_batches(
    model: object,
    shapes: Sequence[tuple[int, ...]],
    count: int,
    seed: int = 0,
    values: Sequence[np.ndarray | None] | None = None,
    batch: int = 1,
) -> list[list[np.ndarray]]:
    """Seeded random batches for an ONNX model's graph inputs (initializers excluded).

    Dimensions come from ``shapes`` (one per input, in order) or from the graph; a
    symbolic first dimension is taken as a batch of ``batch`` (1), any other symbolic
    dimension needs ``--input-shape``. Integer inputs take values from ``values[i]`` when
    given (those of the user's data), else 0..9. Arrays are numpy: checking an ONNX file
    never needs torch. An input that is not a numeric tensor (a sequence, a map, strings)
    needs ``--inputs``.
    """
    import onnx

    graph = model.graph  # type: ignore[attr-defined]
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if shapes and len(shapes) != len(inputs):
        raise BnfoldError(f"the model has {len(inputs)} inputs, --input-shape gave {len(shapes)}")
    specs: list[tuple[list[int], np.dtype]] = []
    for k, value in enumerate(inputs):
        t = value.type.tensor_type
        try:
            if not value.type.HasField("tensor_type"):
                raise KeyError(value.type.WhichOneof("value"))
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
            if dtype.kind not in "fiub" and dtype.name != "bfloat16":
                raise KeyError(dtype.name)
        except (KeyError, TypeError, ValueError) as e:
            raise BnfoldError(
                f"input {value.name!r} is not a numeric tensor ({e}): bnfold cannot make "
                "random values for it",
                hint="pass real inputs with --inputs data.npz",
            ) from None
        dims: list[int | None]
        if shapes:
            dims = list(shapes[k])
        else:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            if dims and dims[0] is None:
                dims[0] = batch
            if any(d is None for d in dims):
                raise BnfoldError(
                    f"input {value.name!r} has symbolic dimensions besides the batch",
                    hint="pass --input-shape for each input",
                )
        specs.append(([int(d) for d in dims if d is not None], dtype))
    gen = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        arrays = []
        for i, (size, dtype) in enumerate(specs):
            seen = values[i] if values is not None and i < len(values) else None
            if dtype.kind == "f" or dtype.name == "bfloat16":
                array = gen.standard_normal(size).astype(dtype)
            elif seen is not None and seen.size:
                array = gen.choice(seen.reshape(-1), size).astype(dtype)
            elif dtype == np.bool_:
                array = gen.integers(0, 2, size).astype(bool)
            else:
                array = gen.integers(0, 10, size).astype(dtype)
            arrays.append(array)
        out.append(arrays)
    return out


def onnx_verification_batches(
    model: Any,
    shapes: Sequence[tuple[int, ...]],
    count: int,
    *,
    seed: int,
    real: list[list[np.ndarray]] | None = None,
    real_name: str = "--inputs",
) -> tuple[list[list[np.ndarray]], tuple[str, ...]]:
    """What verification of an ONNX route feeds, as for PyTorch models
    (``verification_batches``): ``count`` random batches (integer inputs take the values
    of the user's data), the user's data, one batch with floating inputs scaled by
    ``SCALE``, and one with a batch of 3 when the graph's batch axis is symbolic."""
    values = None
    if real is not None:
        values = [None if a.dtype.kind == "f" else np.unique(a) for a in real[0]]
    batches: list[list[np.ndarray]] = []
    fed: list[str] = []
    if count:
        batches += onnx_batches(model, shapes, count, seed=seed, values=values)
        fed.append(f"{count} seeded random batch(es)")
    if real is not None:
        batches += real
        fed.append(f"{real_name}")
    if not batches:
        raise BnfoldError(
            "--verify-batches 0 needs --inputs: verification must feed something",
            hint="give --inputs data.npz, or at least one random batch",
        )
    base = batches[0]
    if any(a.dtype.kind == "f" for a in base):
        batches.append([a * np.asarray(SCALE, a.dtype) if a.dtype.kind == "f" else a for a in base])
        fed.append(f"1 batch scaled by {SCALE:g}")
    if not shapes and _symbolic_batch(model):
        batches += onnx_batches(model, shapes, 1, seed=seed + 1, values=values, batch=3)
        fed.append("1 batch of batch size 3 (the batch axis is symbolic)")
    return batches, tuple(fed)


def _symbolic_batch(model: Any) -> bool:
    """Whether every graph input with a first axis has a symbolic one."""
    inits = {t.name for t in model.graph.initializer}
    dims = [
        i.type.tensor_type.shape.dim[0]
        for i in model.graph.input
        if i.name not in inits
        and i.type.HasField("tensor_type")
        and len(i.type.tensor_type.shape.dim) > 0
    ]
    return bool(dims) and all(not d.HasField("dim_value") for d in dims)

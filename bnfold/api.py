"""bnfold as a library: ``fold``, ``inspect``, ``fuse`` and ``check``.

Each function parses nothing and prints nothing: it calls the stages (loading, capture,
folding, export, verification) and returns the same report object the command line
renders, whose ``to_dict()`` is the CLI's JSON.  Bad input raises an error from
``bnfold.errors`` (``BnfoldError`` and its subclasses); a verification that runs and
finds a mismatch is a result (``report.verification.passed``), not an exception.
torch and onnx are imported inside the functions, so ``import bnfold`` stays fast.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnfold.errors import BnfoldError
from bnfold.reports import (
    CheckReport,
    FoldedSite,
    FuseReport,
    InspectReport,
    MergedSite,
    SkippedSite,
    Verification,
    to_dict,
)

if TYPE_CHECKING:
    import torch

    from bnfold.data import DataOptions
    from bnfold.loading import LoadedModel

__all__ = ["FoldReport", "FoldResult", "check", "fold", "fuse", "inspect"]

ModelLike = Any  # a path, an nn.Module, a torch.export.ExportedProgram or an onnx.ModelProto
Step = Callable[[str], AbstractContextManager[None]]  # progress: a context per named step


@contextlib.contextmanager
def _no_progress(label: str) -> Iterator[None]:
    yield


@dataclass(frozen=True)
class FoldReport:
    """What ``fold`` did, as plain data: every BN folded or kept (with its reason), how
    the model was captured, and the folded module checked against a float64 run of the
    original."""

    folded: tuple[FoldedSite, ...]
    skipped: tuple[SkippedSite, ...]
    capture: str  # "fx" or "export"
    capture_detail: str | None  # why torch.fx was not used, when it was not
    dynamic_batch: bool  # the folds were proven at a second batch size too
    verification: Verification
    notes: tuple[str, ...] = ()
    schema_version: int = 1
    merged: tuple[MergedSite, ...] = ()  # parallel branches merged into one conv

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


@dataclass
class FoldResult:
    """``fold``'s answer: the folded ``module`` and its ``report``."""

    module: torch.nn.Module
    report: FoldReport
    _: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def folded(self) -> tuple[FoldedSite, ...]:
        return self.report.folded

    @property
    def skipped(self) -> tuple[SkippedSite, ...]:
        return self.report.skipped

    @property
    def merged(self) -> tuple[MergedSite, ...]:
        return self.report.merged

    @property
    def verification(self) -> Verification:
        return self.report.verification

    def to_dict(self) -> dict[str, Any]:
        return self.report.to_dict()


def fold(
    model: torch.nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    dynamic_batch: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
) -> FoldResult:
    """Fold every BatchNorm of ``model`` that folds exactly; ``model`` is not modified.

    ``example_inputs`` are one batch of inputs (a tensor or a sequence of them).  The
    result's ``module`` runs in eager PyTorch, exports with ``torch.export`` and saves as a
    state_dict; ``report`` lists what was folded and what was kept (with a reason code) and
    the folded module's error against a float64 run of the original on the example, at
    another batch size (``dynamic_batch``) and on inputs scaled by 100.

    >>> import torch, bnfold
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
    >>> result = bnfold.fold(model, torch.randn(2, 3, 16, 16))
    >>> [f.into for f in result.folded], result.verification.passed
    (['0'], True)
    """
    import torch

    from bnfold.fold_torch import fold_graph
    from bnfold.graph import capture_model
    from bnfold.inputs import batch_size, verification_batches, with_batch
    from bnfold.pipeline import _in_training_mode, _merged, _sites
    from bnfold.verify import compute_reference, verify_torch

    if not isinstance(model, torch.nn.Module):
        raise BnfoldError(f"fold() takes an nn.Module, not a {type(model).__name__}")
    training = _in_training_mode(model)
    if training:
        raise BnfoldError(
            f"the model is in training mode ({', '.join(training[:3])}): its BatchNorm layers "
            "normalise with batch statistics",
            hint="call model.eval() first",
        )
    example = _as_inputs(example_inputs)
    _check_runs(model, example)
    size = batch_size(example)
    other = None
    if dynamic_batch and size is not None:
        example = with_batch(example, max(2, size), size)
        other = with_batch(example, max(2, size) + 1, max(2, size))
    captured = capture_model(model, example, other)
    batches, fed = verification_batches(
        example,
        1,
        seed=1,
        other_batch=batch_size(other) if captured.dynamic_batch and other else None,
    )
    reference = compute_reference(model, batches, graph=captured.module)
    reference.fed = fed
    outcome = fold_graph(captured.module, model, shapes_known=True)
    folded, skipped = _sites(outcome.decisions)
    verification = verify_torch(reference, outcome.module, atol=atol, rtol=rtol)
    notes = [captured.note] if captured.note else []
    if not reference.how.startswith("float64"):
        notes.append(f"the reference is {reference.how}")
    report = FoldReport(
        folded=folded,
        skipped=skipped,
        capture=captured.how,
        capture_detail=captured.why,
        dynamic_batch=captured.dynamic_batch,
        verification=verification,
        notes=tuple(notes),
        merged=_merged(outcome.merges),
    )
    return FoldResult(outcome.module, report)


def inspect(
    model: ModelLike,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    input_shapes: Sequence[Sequence[int]] = (),
    thresholds: Mapping[str, float] | None = None,
    data: DataOptions | None = None,
    progress: Step | None = None,
) -> InspectReport:
    """Every BatchNorm layer of ``model``: statistics, fold target or reason, diagnostics.

    ``model`` is a path (any format the CLI reads; ``arch`` builds a bare state_dict's
    architecture), an ``nn.Module``, a ``torch.export.ExportedProgram`` or an
    ``onnx.ModelProto``.  ``thresholds`` override the diagnostics' (``dead_gamma``,
    ``tiny_variance``, ``scale_spread``); ``example_inputs`` or ``input_shapes`` (random
    inputs of those shapes) let the fold analysis prove folds that need shapes.  ``data``
    (``bnfold.data.DataOptions``) runs the model on real inputs and reports, per layer,
    what its BatchNorm receives against its running statistics (drift).

    >>> import torch, bnfold
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
    >>> report = bnfold.inspect(model)
    >>> report.layers[0].name, report.layers[0].fold_into, report.summary.warnings_by_code
    ('1', '0', {'stale_stats': 1})
    """
    from bnfold.stats import Thresholds, inspect_model

    try:
        chosen = Thresholds().with_overrides(dict(thresholds or {}))
    except ValueError as e:
        raise BnfoldError(f"thresholds: {e}") from e
    step = progress or _no_progress
    source = None
    if data is not None:  # a wrong --data is refused before the model is loaded
        from bnfold.data import open_data

        source = open_data(data)
    name = Path(model).name if isinstance(model, (str, Path)) else type(model).__name__
    with step(f"Loading {name}"):
        loaded = _load(model, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
    example = _as_inputs(example_inputs) if example_inputs is not None else None
    if example is None and input_shapes:
        from bnfold.inputs import random_batches

        example = random_batches([tuple(int(d) for d in s) for s in input_shapes], "float32", 1)[0]
    measured = None
    if source is not None:
        from bnfold.data import measure

        measured = measure(loaded, source, step=step)
        if example is None and loaded.onnx_model is None:
            example = source.example()  # the real input shape, for the fold analysis
    with step("Analysing BatchNorm layers"):
        return inspect_model(loaded, chosen, example, data=measured)


def fuse(
    model: ModelLike,
    out: str | Path | None,
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    input_shapes: Sequence[Sequence[int]] = (),
    input_dtype: str | Sequence[str] = "float32",
    inputs_npz: str | Path | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    opset: int | None = None,
    exporter: str = "dynamo",
    dynamic_batch: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    verify_batches: int = 2,
    save_torch: str | Path | None = None,
    force: bool = False,
    eval_mode: bool = False,
    progress: Step | None = None,
) -> FuseReport:
    """The whole ``bnfold fuse`` job: fold, export ``out`` (ONNX), verify it in onnxruntime.

    ``model`` is a path or an in-memory model (``nn.Module``, ``ExportedProgram``,
    ``onnx.ModelProto``); the input shape comes from ``example_inputs``, ``input_shapes``
    or ``inputs_npz`` as for the CLI.  A model in training mode is refused unless
    ``eval_mode=True`` switches it.  Returns the report; check ``report.verification.passed``
    (the CLI exits 1 when it is False).

    >>> import tempfile, torch, bnfold
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
    >>> out = tempfile.mkdtemp() + "/model.onnx"
    >>> report = bnfold.fuse(model, out, input_shapes=[(1, 3, 32, 32)])
    >>> report.onnx_bn_nodes, report.verification.passed
    (0, True)
    """
    from bnfold.pipeline import FuseOptions, run_fuse

    loaded = None
    path: Path
    scratch = tempfile.TemporaryDirectory(prefix="bnfold-fuse-")
    if isinstance(model, (str, Path)):
        path = Path(model)
    elif type(model).__name__ == "ModelProto":  # the ONNX route reads the original file
        path = _onnx_paths(model, Path(scratch.name))[0]
    else:
        loaded = _load(model)
        path = loaded.path
    example = _as_inputs(example_inputs) if example_inputs is not None else None
    opts = FuseOptions(
        model=path,
        out=Path(out) if out is not None else None,
        arch=arch,
        arch_kwargs=dict(arch_kwargs or {}),
        trust_pickle=trust_pickle,
        input_shapes=[tuple(int(d) for d in s) for s in input_shapes],
        input_dtype=input_dtype,
        inputs_npz=Path(inputs_npz) if inputs_npz is not None else None,
        opset=opset,
        exporter=exporter,
        dynamic_batch=dynamic_batch,
        atol=atol,
        rtol=rtol,
        verify_batches=verify_batches,
        save_torch=Path(save_torch) if save_torch is not None else None,
        force=force,
        eval_mode=eval_mode,
    )
    with scratch:
        return run_fuse(opts, progress or _no_progress, loaded=loaded, example_inputs=example)


def check(
    models: ModelLike | Iterable[ModelLike],
    *,
    max_bn: int = 0,
    input_shapes: Sequence[Sequence[int]] = (),
    inputs_npz: str | Path | None = None,
    reference: str | Path | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    batches: int = 1,
    progress: Step | None = None,
) -> CheckReport:
    """``bnfold check``: the CI gate over ONNX files (paths, a folder's ``*.onnx``, or
    ``onnx.ModelProto`` objects).  ``report.exit_code`` is what the CLI exits with.

    >>> import tempfile, torch, bnfold
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
    >>> out = tempfile.mkdtemp() + "/model.onnx"
    >>> _ = bnfold.fuse(model, out, input_shapes=[(1, 3, 32, 32)])
    >>> bnfold.check(out).passed
    True
    """
    from bnfold.gate import CheckOptions, run_check

    opts = CheckOptions(
        max_bn=max_bn,
        input_shapes=[tuple(int(d) for d in s) for s in input_shapes],
        inputs_npz=Path(inputs_npz) if inputs_npz is not None else None,
        reference=Path(reference) if reference is not None else None,
        arch=arch,
        arch_kwargs=dict(arch_kwargs or {}),
        trust_pickle=trust_pickle,
        atol=atol,
        rtol=rtol,
        batches=batches,
    )
    step = progress or _no_progress
    with tempfile.TemporaryDirectory(prefix="bnfold-check-") as scratch:
        paths = _onnx_paths(models, Path(scratch))
        with step(f"Checking {len(paths)} file(s)"):
            return run_check(paths, opts)


# --------------------------------------------------------------------------- helpers


def _as_inputs(value: Any) -> list[torch.Tensor]:
    import torch

    items = [value] if isinstance(value, torch.Tensor) else list(value)
    for i, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            raise BnfoldError(
                f"example input {i} is a {type(item).__name__}, not a tensor",
                hint="pass a tensor, or a tuple of tensors for several inputs",
            )
    return items


def _check_runs(model: torch.nn.Module, example: Sequence[torch.Tensor]) -> None:
    """A clear error when the model does not run on the example inputs, naming the input
    and the shape the model's first layer wants."""
    import torch

    try:
        with torch.no_grad():
            model(*example)
    except Exception as e:
        shapes = ", ".join(f"input {i}: {list(t.shape)}" for i, t in enumerate(example))
        wanted = _wanted_shape(model)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise BnfoldError(
            f"the model does not run on the example inputs ({shapes}): {type(e).__name__}: {first}",
            hint=f"the first layer takes {wanted}" if wanted else "check the inputs' shapes",
        ) from e


def _wanted_shape(model: torch.nn.Module) -> str | None:
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            dims = len(m.kernel_size)
            return f"(batch, {m.in_channels}" + ", size" * dims + ")"
        if isinstance(m, nn.Linear):
            return f"(..., {m.in_features})"
    return None


def _load(
    model: ModelLike,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """A path, or an in-memory model, as the loader's ``LoadedModel``."""
    from bnfold.loading import LoadedModel, ModelFormat, load_model

    if isinstance(model, (str, Path)):
        return load_model(
            Path(model), arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle
        )
    import torch

    name = Path(f"<{type(model).__name__}>")
    if isinstance(model, torch.export.ExportedProgram):
        example = model.example_inputs
        inputs = tuple(example[0]) if example and not example[1] else None
        return LoadedModel(
            name,
            ModelFormat.EXPORTED_PROGRAM,
            state_dict=dict(model.state_dict),
            module=model.module(),
            example_inputs=inputs,
        )
    if isinstance(model, torch.nn.Module):
        return LoadedModel(
            name, ModelFormat.MODULE, state_dict=dict(model.state_dict()), module=model
        )
    import onnx

    if isinstance(model, onnx.ModelProto):
        return LoadedModel(name, ModelFormat.ONNX, onnx_model=model)
    raise BnfoldError(
        f"a {type(model).__name__} is not a model bnfold takes",
        hint="pass a path, an nn.Module, a torch.export.ExportedProgram or an onnx.ModelProto",
    )


def _onnx_paths(models: Any, scratch: Path) -> list[Path]:
    """Paths to check: each path (a folder gives its ``*.onnx`` files, sorted), and each
    ``onnx.ModelProto`` written to ``scratch`` first."""
    import onnx

    items = [models] if isinstance(models, (str, Path, onnx.ModelProto)) else list(models)
    paths: list[Path] = []
    for i, item in enumerate(items):
        if isinstance(item, onnx.ModelProto):
            path = scratch / f"model_{i}.onnx"
            onnx.save(item, str(path))
            paths.append(path)
        elif Path(item).is_dir():
            found = sorted(Path(item).glob("*.onnx"))
            if not found:
                raise BnfoldError(f"{item}: the folder holds no .onnx files")
            paths += found
        else:
            paths.append(Path(item))
    return paths

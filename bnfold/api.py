"""bnfold as a library: ``fold``, ``inspect``, ``fuse``, ``check`` and ``recalibrate``.

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
    RecalibrationReport,
    SkippedSite,
    Verification,
    to_dict,
)

if TYPE_CHECKING:
    import torch

    from bnfold.data import DataOptions
    from bnfold.loading import LoadedModel

__all__ = ["FoldReport", "FoldResult", "check", "fold", "fuse", "inspect", "recalibrate"]

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

        measured = measure(loaded, source, step=step, input_shapes=input_shapes)
        if example is None and loaded.onnx_model is None:
            example = source.example()  # the real input shape, for the fold analysis
    with step("Analysing BatchNorm layers"):
        return inspect_model(loaded, chosen, example, data=measured)


def recalibrate(
    model: ModelLike,
    data: DataOptions | str | Path,
    out: str | Path | None = None,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    method: str = "cumulative",
    enable_running_stats: bool = False,
    measure_drift: bool = True,
    force: bool = False,
    progress: Step | None = None,
) -> RecalibrationReport:
    """Re-estimate every BatchNorm's running statistics on ``data`` (``bnfold recalibrate``).

    ``data`` is a ``bnfold.data.DataOptions`` or a ``--data`` spec (a .npz, a .npy, a
    folder of images, ``module:callable``) read with the default options.  ``method``:
    ``cumulative`` (PyTorch's own: what the BN layers alone in training mode with
    ``momentum=None`` give on these batches) or ``sequential`` (layer by layer, the exact
    statistics each BN receives at inference).  ``enable_running_stats`` gives BNs built
    with ``track_running_stats=False`` running statistics first.  ``measure_drift`` also
    runs the data in eval mode before and after (two more forward passes): each layer's
    ``drift_before`` and ``drift_after`` on the data.  ``model`` is a path
    (then ``out`` writes the result in the model's own format) or an in-memory
    ``nn.Module``/``onnx.ModelProto``, changed in place.  A model without BatchNorm is
    not an error: the report has no layers and says so in its notes, and nothing is
    written.  Only the statistics change; the report's ``complete`` is False when some
    BN kept its old ones (the CLI exits 1).

    >>> import torch, bnfold
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
    >>> import numpy as np, tempfile
    >>> path = tempfile.mkdtemp() + "/x.npy"
    >>> np.save(path, np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype("f4"))
    >>> report = bnfold.recalibrate(model, path)
    >>> report.updated, int(model[1].num_batches_tracked)
    (1, 2)
    """
    from bnfold.data import DataOptions, open_data, write_model
    from bnfold.data import recalibrate as reestimate
    from bnfold.errors import OutputError

    opts = data if isinstance(data, DataOptions) else DataOptions(spec=data)
    in_memory = not isinstance(model, (str, Path))
    if out is not None:  # refuse a bad --out and bad data before the model is loaded and run
        out = Path(out)
        if in_memory:
            raise OutputError("out= needs a model file: an in-memory model is changed in place")
        if out.resolve() == Path(model).resolve():
            raise OutputError(
                f"refusing to overwrite the input {model}", hint="choose another --out"
            )
        if out.exists() and not force:
            raise OutputError(f"{out} exists", hint="pass --force to overwrite it")
        if out.is_dir() or not out.resolve().parent.is_dir():
            raise OutputError(f"--out {out}: not a file in an existing folder")
    source = open_data(opts)
    step = progress or _no_progress
    name = Path(model).name if not in_memory else type(model).__name__
    with step(f"Loading {name}"):
        loaded = _load(model, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
    report = reestimate(
        loaded,
        source,
        method=method,
        enable_running_stats=enable_running_stats,
        measure_drift=measure_drift,
        step=step,
    )
    if not report.layers:
        return report
    if not any(layer.reason != "no_running_stats" for layer in report.layers):
        raise BnfoldError(
            "the model has no BatchNorm layer with running statistics to re-estimate",
            hint="--enable-running-stats gives them running statistics",
            path=loaded.path,
        )
    if out is None:
        return report
    with step(f"Writing {out.name}"):
        write_model(loaded, report, out, force=force)
    from dataclasses import replace

    return replace(report, output=str(out))


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
    recalibrate_data: DataOptions | str | Path | None = None,
    recalibrate_method: str = "cumulative",
    enable_running_stats: bool = False,
    progress: Step | None = None,
) -> FuseReport:
    """The whole ``bnfold fuse`` job: fold, export ``out`` (ONNX), verify it in onnxruntime.

    ``model`` is a path or an in-memory model (``nn.Module``, ``ExportedProgram``,
    ``onnx.ModelProto``); the input shape comes from ``example_inputs``, ``input_shapes``
    or ``inputs_npz`` as for the CLI.  A model in training mode is refused unless
    ``eval_mode=True`` switches it.  Returns the report; check ``report.verification.passed``
    (the CLI exits 1 when it is False).  ``recalibrate_data`` (a ``DataOptions`` or a
    ``--data`` spec) first re-estimates the BatchNorm statistics on that data, as
    ``recalibrate`` does with ``recalibrate_method`` and ``enable_running_stats``, and
    folds the result; the report's ``recalibration`` says what changed.  The data's
    first samples also give the input shape when none is given.

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
    step = progress or _no_progress
    scratch = tempfile.TemporaryDirectory(prefix="bnfold-fuse-")
    source = None
    if recalibrate_data is not None:  # bad data is refused before the model is loaded
        from bnfold.data import DataOptions, open_data

        opts_data = (
            recalibrate_data
            if isinstance(recalibrate_data, DataOptions)
            else DataOptions(spec=recalibrate_data)
        )
        source = open_data(opts_data)
    if isinstance(model, (str, Path)):
        path = Path(model)
    elif type(model).__name__ == "ModelProto":  # the ONNX route reads the original file
        path = _onnx_paths(model, Path(scratch.name))[0]
    else:
        loaded = _load(model)
        path = loaded.path
    example = _as_inputs(example_inputs) if example_inputs is not None else None
    recalibration = None
    if source is not None:
        from bnfold.data import recalibrate as reestimate

        if loaded is None:
            with step(f"Loading {path.name}"):
                loaded = _load(path, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
        recalibration = reestimate(
            loaded,
            source,
            method=recalibrate_method,
            enable_running_stats=enable_running_stats,
            measure_drift=False,  # the fuse report carries one line about it
            step=step,
        )
        if loaded.onnx_model is not None:
            # the ONNX route verifies against the file it folds: the re-estimated one
            import onnx

            path = Path(scratch.name) / path.name
            onnx.save(loaded.onnx_model, str(path))
            loaded = None
        elif example is None and not input_shapes and inputs_npz is None:
            example = source.example()  # the data's shape, for capture and verification
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
        report = run_fuse(opts, step, loaded=loaded, example_inputs=example)
    if recalibration is not None:
        from dataclasses import replace

        report = replace(report, recalibration=recalibration)
    return report


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

    from bnfold.inputs import accepted_shape

    try:
        with torch.no_grad():
            model(*example)
    except Exception as e:
        shapes = ", ".join(f"input {i}: {list(t.shape)}" for i, t in enumerate(example))
        wanted = accepted_shape(model)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise BnfoldError(
            f"the model does not run on the example inputs ({shapes}): {type(e).__name__}: {first}",
            hint=f"the first layer takes {wanted}" if wanted else "check the inputs' shapes",
        ) from e


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

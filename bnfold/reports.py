"""Reports: what each command found, as plain frozen data.

No tensors, no rich, no torch here: ``cli/render.py`` turns these objects into a
table, JSON or markdown, and tests read the numbers directly.  Every top-level
report carries ``schema_version``; JSON keys are the field names below and only
ever gain new fields within one schema version.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1


class _Report:
    """What every top-level report offers: ``to_dict()``, the CLI's JSON as plain data."""

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


@dataclass(frozen=True)
class Spread:
    """min / median / max of one per-channel vector."""

    min: float
    median: float
    max: float


@dataclass(frozen=True)
class Diagnostic:
    """One finding about a BN layer: a stable code and a sentence for people."""

    code: str
    message: str


@dataclass(frozen=True)
class BNLayerReport:
    """Statistics, fold decision and diagnostics of one BatchNorm layer."""

    name: str
    kind: str
    channels: int
    eps: float
    eps_known: bool  # False when read from a bare state_dict (eps is not stored there)
    momentum: float | None
    affine: bool | None
    track_running_stats: bool | None
    num_batches_tracked: int | None
    training: bool | None
    running_mean: Spread | None
    running_var: Spread | None
    gamma: Spread | None
    beta: Spread | None
    fold_scale: Spread | None  # gamma / sqrt(running_var + eps)
    fold_into: str | None
    fold_direction: str | None  # "backward" (into the producer) or "forward" (into the consumer)
    reason: str | None  # why it does not fold (a Reason code), None when it folds or unknown
    reason_detail: str | None
    warnings: tuple[str, ...]
    diagnostics: tuple[Diagnostic, ...]
    # with --data: the BN's inputs on the data (eval mode), per channel, and how far the
    # running statistics are from them (bnfold/data.py: drift)
    data_values: int | None = None  # values per channel the data gave (samples x positions)
    data_mean: Spread | None = None
    data_var: Spread | None = None  # unbiased, like running_var
    mean_shift: Spread | None = None  # |data mean - running_mean| / sqrt(running_var + eps)
    var_ratio: Spread | None = None  # (data var + eps) / (running_var + eps)
    mean_shift_channel: int | None = None  # the channel of the largest mean shift
    var_ratio_channel: int | None = None  # the channel whose ratio is furthest from 1 (log)


@dataclass(frozen=True)
class DataSummary:
    """The real inputs a run used (``--data``)."""

    source: str
    kind: str  # "npz", "npy", "images" or "callable"
    samples: int
    batches: int
    batch_size: int  # --batch-size; for a callable the largest batch it yielded
    input_shapes: tuple[tuple[int, ...], ...]  # per sample, one per model input
    preprocessing: str


@dataclass(frozen=True)
class InspectSummary:
    bn_layers: int
    foldable: int | None  # None when the architecture is unknown
    params_removed: int  # BN parameters (gamma, beta) of the foldable layers
    buffers_removed: int  # running_mean, running_var, num_batches_tracked of the foldable layers
    bias_params_added: int  # biases created in layers that had none
    warnings_by_code: dict[str, int]


@dataclass(frozen=True)
class InspectReport(_Report):
    model: str
    format: str
    architecture_known: bool
    order: str  # "data-flow", "registration" or "file"
    layers: tuple[BNLayerReport, ...]
    summary: InspectSummary
    thresholds: dict[str, float]
    notes: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION
    data: DataSummary | None = None  # --data: the inputs the data_* fields come from


@dataclass(frozen=True)
class FoldedSite:
    bn: str
    into: str
    direction: str
    rule: str
    bn_kind: str


@dataclass(frozen=True)
class MergedSite:
    """Parallel branches summed into one conv (rule ``branch_merge``): the conv branches and
    the BNs on identity branches it replaced (each of those BNs is also a folded site)."""

    into: str
    rule: str
    convs: tuple[str, ...]
    identity_bns: tuple[str, ...]
    skips: int  # plain skips (the input itself) merged as identity kernels


@dataclass(frozen=True)
class SkippedSite:
    bn: str
    reason: str
    detail: str


@dataclass(frozen=True)
class OutputCheck:
    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    reference_max_abs: float
    passed: bool


@dataclass(frozen=True)
class Verification:
    passed: bool
    atol: float
    rtol: float
    inputs: int  # how many input batches were compared
    input_source: str  # "random (seeded)" or the .npz path plus random
    max_abs_error: float
    max_rel_error: float
    outputs: tuple[OutputCheck, ...]
    folded_torch_max_abs_error: float | None  # the folded PyTorch model (its dtype) vs reference
    baseline_max_abs_error: float | None  # original model in float32 vs float64: the noise floor
    fed: tuple[str, ...] = ()  # what verification fed, one line per group of batches
    reference: str = ""  # what computed the reference outputs
    target: str = "onnx"  # what was verified: "onnx", "torch" (--save-torch / bnfold.fold)


@dataclass(frozen=True)
class FuseReport(_Report):
    model: str
    format: str
    output: str | None
    exporter: str
    opset: int | None
    folded: tuple[FoldedSite, ...]
    skipped: tuple[SkippedSite, ...]
    params_before: int  # values stored in parameters and floating-point buffers
    params_after: int
    onnx_nodes: int | None
    onnx_bn_nodes: int | None
    verification: Verification | None
    torch_output: str | None = None
    # operations in the model's graph before and after folding (torch.fx nodes that call a
    # module or function; for ONNX inputs, ONNX nodes): what folding removed, before export
    ops_before: int | None = None
    ops_after: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION
    capture: str | None = None  # "fx", "export" (torch.export) or "onnx" (an ONNX input)
    capture_detail: str | None = None  # why torch.fx was not used, when it was not
    dynamic_batch: bool | None = None  # whether the output's batch axis is dynamic
    torch_verification: Verification | None = None  # the --save-torch archive, verified
    # fuse --recalibrate-data: the statistics were re-estimated before folding
    recalibration: RecalibrationReport | None = None
    merged: tuple[MergedSite, ...] = ()  # parallel branches merged into one conv (issue 18)


def to_dict(report: Any) -> dict[str, Any]:
    """A report as JSON-ready plain data, exactly the CLI's ``--format json``: tuples become
    lists, and NaN or infinite numbers ``None`` (JSON has no such numbers)."""
    return _clean(dataclasses.asdict(report))  # type: ignore[no-any-return]


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@dataclass(frozen=True)
class CheckItem:
    """One check on one file: a stable name, the verdict and a sentence."""

    name: str
    passed: bool
    message: str


@dataclass(frozen=True)
class FileCheck:
    path: str
    readable: bool  # False: the file could not be read at all (exit 2)
    passed: bool
    checks: tuple[CheckItem, ...]
    bn_nodes: tuple[str, ...]
    outputs: tuple[OutputCheck, ...]  # the --reference comparison, when asked for


@dataclass(frozen=True)
class CheckReport(_Report):
    files: tuple[FileCheck, ...]
    passed: bool
    exit_code: int  # 0 passed, 1 a check failed, 2 a file could not be read
    max_bn: int
    schema_version: int = SCHEMA_VERSION


@dataclass(frozen=True)
class Drift:
    """How far a BN's running statistics are from what it receives on the data (eval
    mode): the mean shift and variance ratio of ``inspect --data``, worst channels named."""

    mean_shift: Spread  # |data mean - running_mean| / sqrt(running_var + eps)
    var_ratio: Spread  # (data var + eps) / (running_var + eps)
    mean_shift_channel: int | None
    var_ratio_channel: int | None


@dataclass(frozen=True)
class RecalibratedLayer:
    """One BatchNorm after re-estimation: whether its statistics changed, and how much."""

    name: str
    kind: str
    channels: int
    updated: bool
    reason: str | None  # why not: not_called, no_running_stats, frozen, nonfinite, not_constant
    detail: str | None
    calls: int  # calls per forward pass
    values: int  # values per channel the new statistics come from (samples x positions)
    mean_shift: Spread | None  # |new mean - old mean| / sqrt(old var + eps)
    var_ratio: Spread | None  # (new var + eps) / (old var + eps)
    running_var: Spread | None  # the new running_var
    mean_shift_channel: int | None = None  # the channel of the largest mean shift
    var_ratio_channel: int | None = None  # the channel whose ratio is furthest from 1 (log)
    # the drift on the data with the old statistics and with the new ones (None: not
    # measured, --no-drift, or the layer is not reached)
    drift_before: Drift | None = None
    drift_after: Drift | None = None


@dataclass(frozen=True)
class RecalibrationReport(_Report):
    """``bnfold recalibrate``: the new running statistics, per layer."""

    model: str | None  # None when called as a library on a module
    format: str | None
    output: str | None
    method: str  # "cumulative" or "sequential"
    data: DataSummary | None
    layers: tuple[RecalibratedLayer, ...]
    updated: int
    complete: bool  # every BN with running statistics was re-estimated
    batches: int
    passes: int  # passes over the data
    seconds: float
    notes: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION

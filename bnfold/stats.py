"""Per-BatchNorm statistics and diagnostics -> ``InspectReport``.

Fold scale: folding multiplies channel ``c`` of the neighbouring layer's weights by
``s[c] = gamma[c] / sqrt(running_var[c] + eps)``; its spread within a layer is
what per-tensor quantisation of the folded weights has to cover.

Diagnostics (codes are stable; thresholds are ``Thresholds`` fields, overridable
from the CLI with ``--threshold NAME=VALUE``):

==================  ==================================================================
code                fires when
==================  ==================================================================
stale_stats         num_batches_tracked == 0, or running_mean == 0 and running_var == 1
                    in every channel (statistics never updated)
dead_channels       |gamma| < ``dead_gamma`` (default 1e-3) in some channel
tiny_variance       running_var + eps < ``tiny_variance`` (default 1e-4) in some channel:
                    folding multiplies its weights by more than 100·|gamma|
large_scale_spread  max|s| / min|s| over live channels > ``scale_spread`` (default 100)
nonfinite           NaN or Inf in any parameter or statistic
negative_variance   running_var < 0 in some channel
train_mode          the module is in training mode
no_running_stats    track_running_stats=False or no running buffers
stats_drift         (with --data) in some channel the mean shift
                    |data mean - running_mean| / sqrt(running_var + eps) is over
                    ``drift_mean`` (default 0.5 running standard deviations), or the
                    variance ratio (data var + eps) / (running_var + eps) is over
                    ``drift_var`` (default 2) or under 1 / ``drift_var``
==================  ==================================================================

The data statistics are those of each BN's inputs with the model in eval mode, over every
sample and position (``bnfold/data.py``): what the layer receives at inference.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from bnfold.reports import BNLayerReport, Diagnostic, InspectReport, InspectSummary, Spread

if TYPE_CHECKING:
    import onnx
    import torch

    from bnfold.data import Measurement
    from bnfold.fold_torch import Decision
    from bnfold.loading import LoadedModel

__all__ = ["CODES", "DATA_CODES", "BNRecord", "Thresholds", "inspect_model", "layer_report"]

CODES = (
    "stale_stats",
    "dead_channels",
    "tiny_variance",
    "large_scale_spread",
    "nonfinite",
    "negative_variance",
    "train_mode",
    "no_running_stats",
)
DATA_CODES = ("stats_drift",)  # only with --data: the BN's inputs were measured
DRIFT_THRESHOLDS = ("drift_mean", "drift_var")  # reported only when data was measured
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
DEFAULT_EPS = 1e-5


@dataclass(frozen=True)
class Thresholds:
    dead_gamma: float = 1e-3
    tiny_variance: float = 1e-4
    scale_spread: float = 100.0
    drift_mean: float = 0.5  # running standard deviations
    drift_var: float = 2.0  # a factor either way

    def with_overrides(self, overrides: dict[str, float]) -> Thresholds:
        names = {f.name for f in fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(
                f"unknown threshold {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}"
            )
        bad = [k for k, v in overrides.items() if not (math.isfinite(v) and v > 0)]
        if bad:
            raise ValueError(f"threshold {', '.join(sorted(bad))} must be a positive number")
        if overrides.get("drift_var", 2.0) <= 1:
            raise ValueError("threshold drift_var is a factor and must be above 1")
        return Thresholds(**{**asdict(self), **overrides})


@dataclass
class BNRecord:
    """One BN layer's raw numbers (float64 arrays) and facts, before summarising."""

    name: str
    kind: str
    channels: int
    eps: float = DEFAULT_EPS
    eps_known: bool = True
    momentum: float | None = None
    affine: bool | None = None
    track_running_stats: bool | None = None
    num_batches_tracked: int | None = None
    training: bool | None = None
    mean: np.ndarray | None = None
    var: np.ndarray | None = None
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None
    fold_into: str | None = None
    fold_direction: str | None = None
    reason: str | None = None
    reason_detail: str | None = None
    bias_added: int = 0
    data_values: int | None = None  # with --data: the BN's inputs on the data, per channel
    data_mean: np.ndarray | None = None
    data_var: np.ndarray | None = None


def _spread(a: np.ndarray | None) -> Spread | None:
    if a is None or a.size == 0:
        return None
    finite = a[~np.isnan(a)]  # NaN channels are reported by `nonfinite`, not spread here
    if finite.size == 0:
        return Spread(math.nan, math.nan, math.nan)
    return Spread(float(np.min(finite)), float(np.median(finite)), float(np.max(finite)))


def fold_scale(rec: BNRecord) -> np.ndarray | None:
    if rec.var is None:
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        s = 1.0 / np.sqrt(rec.var + rec.eps)
    return s * rec.gamma if rec.gamma is not None else s


def diagnose(rec: BNRecord, th: Thresholds) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    arrays = [a for a in (rec.mean, rec.var, rec.gamma, rec.beta) if a is not None]
    if rec.training:
        out.append(
            Diagnostic("train_mode", "in training mode: it normalises with batch statistics")
        )
    if rec.track_running_stats is False or rec.mean is None or rec.var is None:
        out.append(Diagnostic("no_running_stats", "no running statistics: it cannot be folded"))
    if any(not np.isfinite(a).all() for a in arrays):
        bad = sum(int((~np.isfinite(a)).sum()) for a in arrays)
        out.append(Diagnostic("nonfinite", f"{bad} NaN/Inf values in its parameters/statistics"))
    if rec.mean is not None and rec.var is not None:
        if rec.num_batches_tracked == 0:
            out.append(
                Diagnostic("stale_stats", "num_batches_tracked is 0: statistics never updated")
            )
        elif np.all(rec.mean == 0) and np.all(rec.var == 1):
            out.append(
                Diagnostic(
                    "stale_stats",
                    "running_mean is all 0 and running_var all 1: statistics look never updated",
                )
            )
        neg = int((rec.var < 0).sum())
        if neg:
            out.append(Diagnostic("negative_variance", f"{neg} channels have running_var < 0"))
        with np.errstate(invalid="ignore"):
            tiny = int(((rec.var >= 0) & ((rec.var + rec.eps) < th.tiny_variance)).sum())
        if tiny:
            out.append(
                Diagnostic(
                    "tiny_variance",
                    f"{tiny} channels have running_var+eps < {th.tiny_variance:g}: folding scales "
                    f"their weights by over {1 / math.sqrt(th.tiny_variance):.0f}x|gamma|",
                )
            )
    if rec.gamma is not None:
        with np.errstate(invalid="ignore"):
            dead = int((np.abs(rec.gamma) < th.dead_gamma).sum())
        if dead:
            out.append(
                Diagnostic(
                    "dead_channels",
                    f"{dead} of {rec.channels} channels have |gamma| < {th.dead_gamma:g}",
                )
            )
    s = fold_scale(rec)
    if s is not None:
        live = np.abs(s[np.isfinite(s)])
        if rec.gamma is not None:
            with np.errstate(invalid="ignore"):
                live = np.abs(s[np.isfinite(s) & (np.abs(rec.gamma) >= th.dead_gamma)])
        live = live[live > 0]
        if live.size >= 2:
            ratio = float(live.max() / live.min())
            if ratio > th.scale_spread:
                out.append(
                    Diagnostic(
                        "large_scale_spread",
                        f"fold scales span {ratio:.3g}x (> {th.scale_spread:g}): per-tensor "
                        "quantisation of the folded weights will lose the small channels",
                    )
                )
    out += _drift_diagnostics(rec, th)
    return out


def _drift(rec: BNRecord) -> tuple[np.ndarray, np.ndarray] | None:
    """Per channel: the mean shift and variance ratio of the data against the running
    statistics (``bnfold.data.drift``), when both are known."""
    if rec.data_mean is None or rec.data_var is None or rec.mean is None or rec.var is None:
        return None
    from bnfold.data import drift

    return drift(rec.data_mean, rec.data_var, rec.mean, rec.var, rec.eps)


def _drift_diagnostics(rec: BNRecord, th: Thresholds) -> list[Diagnostic]:
    """``stats_drift``: one diagnostic for both measures, naming the worst channels."""
    both = _drift(rec)
    if both is None:
        return []
    from bnfold.data import worst_channels

    shift, ratio = both
    with np.errstate(invalid="ignore"):
        far = int((shift > th.drift_mean).sum())
        off = int(((ratio > th.drift_var) | (ratio < 1 / th.drift_var)).sum())
    if not (far or off):
        return []
    worst_shift, worst_ratio = worst_channels(shift, ratio)
    parts = []
    if far:
        parts.append(
            f"mean shift up to {float(np.nanmax(shift)):.3g} running standard deviations "
            f"(channel {worst_shift}), over {th.drift_mean:g} in {far} of {rec.channels} "
            "channels"
        )
    if off:
        parts.append(
            f"variance ratio {float(np.nanmin(ratio)):.3g} to {float(np.nanmax(ratio)):.3g} "
            f"(worst: channel {worst_ratio}), outside 1/{th.drift_var:g}..{th.drift_var:g} "
            f"in {off} of {rec.channels} channels"
        )
    return [Diagnostic("stats_drift", "on the data: " + "; ".join(parts))]


def layer_report(rec: BNRecord, th: Thresholds) -> BNLayerReport:
    diags = diagnose(rec, th)
    both = _drift(rec)
    worst: tuple[int | None, int | None] = (None, None)
    if both is not None:
        from bnfold.data import worst_channels

        worst = worst_channels(*both)
    return BNLayerReport(
        name=rec.name,
        kind=rec.kind,
        channels=rec.channels,
        eps=rec.eps,
        eps_known=rec.eps_known,
        momentum=rec.momentum,
        affine=rec.affine,
        track_running_stats=rec.track_running_stats,
        num_batches_tracked=rec.num_batches_tracked,
        training=rec.training,
        running_mean=_spread(rec.mean),
        running_var=_spread(rec.var),
        gamma=_spread(rec.gamma),
        beta=_spread(rec.beta),
        fold_scale=_spread(fold_scale(rec)),
        fold_into=rec.fold_into,
        fold_direction=rec.fold_direction,
        reason=rec.reason,
        reason_detail=rec.reason_detail,
        warnings=tuple(d.code for d in diags),
        diagnostics=tuple(diags),
        data_values=rec.data_values,
        data_mean=_spread(rec.data_mean),
        data_var=_spread(rec.data_var),
        mean_shift=_spread(both[0]) if both is not None else None,
        var_ratio=_spread(both[1]) if both is not None else None,
        mean_shift_channel=worst[0],
        var_ratio_channel=worst[1],
    )


# --------------------------------------------------------------------------- collection


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    if t is None:
        return None
    import torch

    return t.detach().to(torch.float64).cpu().numpy()


def record_from_module(name: str, m: Any) -> BNRecord:
    """A record of a BN module (eager, TorchScript or torchvision's FrozenBatchNorm2d).

    A traced TorchScript module keeps no ``eps``/``momentum`` attributes: they are
    constants of the ``batch_norm`` call in its graph, and so is the training flag its
    forward really uses. When eps is found nowhere it is reported unknown
    (``eps_known=False``, fold scales computed with 1e-5), never guessed silently.
    """
    weight = getattr(m, "weight", None)
    mean = getattr(m, "running_mean", None)
    nbt = getattr(m, "num_batches_tracked", None)
    kind = getattr(m, "original_name", None) or type(m).__name__
    ref = mean if mean is not None else weight
    baked = _graph_batch_norm_constants(m)
    eps = getattr(m, "eps", None)
    if eps is None:
        eps = baked.get("eps")
    momentum = getattr(m, "momentum", None) if hasattr(m, "momentum") else baked.get("momentum")
    training = baked.get("training", getattr(m, "training", None))
    return BNRecord(
        name=name,
        kind=str(kind),
        channels=int(getattr(m, "num_features", ref.shape[0] if ref is not None else 0)),
        eps=float(eps) if isinstance(eps, (int, float)) else DEFAULT_EPS,
        eps_known=isinstance(eps, (int, float)),
        momentum=None if momentum is None else float(momentum),
        affine=bool(getattr(m, "affine", weight is not None)),
        track_running_stats=bool(getattr(m, "track_running_stats", mean is not None)),
        num_batches_tracked=int(nbt) if nbt is not None else None,
        training=None if training is None else bool(training),
        mean=_np(mean),
        var=_np(getattr(m, "running_var", None)),
        gamma=_np(weight),
        beta=_np(getattr(m, "bias", None)),
    )


_TS_BATCH_NORM = ("aten::batch_norm", "aten::_batch_norm_impl_index", "aten::native_batch_norm")


def _graph_batch_norm_constants(m: Any) -> dict[str, Any]:
    """training, momentum and eps of the first batch_norm call in a TorchScript module's
    forward graph, where they are constants (all three ops take them as arguments 5-7)."""
    import torch

    if not isinstance(m, torch.jit.ScriptModule):
        return {}
    try:
        for node in m.graph.nodes():
            if node.kind() not in _TS_BATCH_NORM:
                continue
            inputs = list(node.inputs())
            found = {}
            for index, key in ((5, "training"), (6, "momentum"), (7, "eps")):
                if index < len(inputs) and inputs[index].node().kind() == "prim::Constant":
                    found[key] = inputs[index].toIValue()
            return found
    except (AttributeError, RuntimeError):  # a module without a forward graph
        return {}
    return {}


def records_from_state_dict(sd: dict[str, torch.Tensor]) -> list[BNRecord]:
    """Group keys into BN layers by their running_mean/running_var buffers (file order)."""
    records = []
    for key in sd:
        if not key.endswith(".running_mean") and key != "running_mean":
            continue
        prefix = key[: -len("running_mean")]
        if prefix + "running_var" not in sd:
            continue
        nbt = sd.get(prefix + "num_batches_tracked")
        weight = sd.get(prefix + "weight")
        records.append(
            BNRecord(
                name=prefix.rstrip(".") or "<root>",
                kind="BatchNorm" if nbt is not None else "BatchNorm (no num_batches_tracked)",
                channels=int(sd[key].shape[0]),
                eps_known=False,
                affine=weight is not None,
                num_batches_tracked=int(nbt) if nbt is not None else None,
                mean=_np(sd[key]),
                var=_np(sd[prefix + "running_var"]),
                gamma=_np(weight),
                beta=_np(sd.get(prefix + "bias")),
                reason="architecture_unknown",
                reason_detail="only weights were loaded; pass --arch to see which layer each BN "
                "folds into",
            )
        )
    return records


def records_from_onnx(model: onnx.ModelProto) -> list[BNRecord]:
    """Every BatchNormalization node (subgraphs' too, named with their place), in graph
    order, with its constants (Constant nodes included) and fold decision."""
    from bnfold.onnx_fold import describe

    records = []
    for bn in describe(model):
        arrays = [bn.scale, bn.bias, bn.mean, bn.var]
        sizes = {a.size for a in arrays if a is not None} - {1}
        gamma = bn.scale
        if len(sizes) > 1 and gamma is not None and bn.var is not None:
            # mismatched sizes (the decision says bn_parameters): no fold scale to show
            gamma = None
        d = bn.decision
        records.append(
            BNRecord(
                name=bn.name,
                kind=d.kind,
                channels=bn.channels,
                eps=bn.epsilon,
                momentum=bn.momentum,
                affine=True,
                track_running_stats=bn.mean is not None and bn.var is not None,
                training=bn.training,
                mean=bn.mean,
                var=bn.var,
                gamma=gamma,
                beta=bn.bias,
                fold_into=d.into,
                # a BN on an identity branch merged into a parallel conv: "merge"
                fold_direction=(
                    d.direction.value if d.direction is not None else "merge" if d.into else None
                ),
                reason=d.reason.value if d.reason is not None else None,
                reason_detail=d.detail or None,
            )
        )
    return records


def _record_from_site(d: Decision) -> BNRecord:
    """A record for a functional batch_norm (traced BN subclasses, torch.export graphs)."""
    site = d.site
    assert site is not None
    return BNRecord(
        name=d.bn,
        kind=d.kind,
        channels=site.channels,
        eps=site.eps,
        affine=site.weight is not None,
        track_running_stats=site.running_mean is not None,
        training=site.training,
        mean=_np(site.running_mean),
        var=_np(site.running_var),
        gamma=_np(site.weight),
        beta=_np(site.bias),
    )


def _apply_decisions(
    records: list[BNRecord], decisions: Sequence[Decision], module: torch.nn.Module
) -> list[BNRecord]:
    """Order records as the graph calls them and attach each fold decision."""
    by_name = {r.name: r for r in records}
    ordered: list[BNRecord] = []
    seen: Counter[str] = Counter()
    for d in decisions:
        base = by_name.get(d.bn)
        if base is None or (d.site is not None and d.site.module is None):
            base = _record_from_site(d) if d.site is not None else BNRecord(d.bn, d.kind, 0)
        seen[d.bn] += 1
        rec = base if seen[d.bn] == 1 else BNRecord(**{**base.__dict__})
        if seen[d.bn] > 1:
            rec.name = f"{d.bn}#{seen[d.bn]}"
        rec.fold_into = d.into
        rec.fold_direction = d.direction.value if d.direction is not None else None
        if d.rule == "branch_merge":  # an identity branch merged with its conv branches
            rec.fold_direction = "merge"
        rec.reason = d.reason.value if d.reason is not None else None
        rec.reason_detail = d.detail or (d.reason.explanation if d.reason is not None else None)
        if d.into is not None:
            try:
                layer = module.get_submodule(d.into)
                if getattr(layer, "bias", 0) is None:
                    rec.bias_added = int(
                        getattr(layer, "out_channels", getattr(layer, "out_features", 0))
                    )
            except AttributeError:
                pass
        ordered.append(rec)
    for rec in records:  # BN modules the graph never calls
        if seen[rec.name] == 0:
            rec.reason, rec.reason_detail = "not_called", "the forward pass never calls this BN"
            ordered.append(rec)
    return ordered


def inspect_model(
    loaded: LoadedModel,
    thresholds: Thresholds | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    data: Measurement | None = None,
) -> InspectReport:
    """Statistics, fold decisions and diagnostics of every BN in ``loaded``; with
    ``data`` (``bnfold.data.measure``) also the statistics of real inputs and the drift."""
    th = thresholds or Thresholds()
    notes = list(loaded.notes)
    order = "file"
    if loaded.onnx_model is not None:
        records = records_from_onnx(loaded.onnx_model)
        order = "data-flow"
    elif loaded.module is not None:
        from bnfold.graph import is_bn_module

        module = loaded.module
        records = [
            record_from_module(name, m)
            for name, m in module.named_modules()
            if is_bn_module(m) or getattr(m, "original_name", "") in _TS_BN_NAMES
        ]
        order = "registration"
        try:
            outcome = plan_folds(module, example_inputs or loaded.example_inputs)
        except Exception as e:  # noqa: BLE001 - inspect still reports statistics
            from bnfold.errors import BnfoldError

            why = e.one_line() if isinstance(e, BnfoldError) else f"{type(e).__name__}: {e}"
            notes.append(f"fold analysis unavailable: {why}")
            for rec in records:
                rec.reason, rec.reason_detail = "capture_failed", why
        else:
            decisions, shape_note = outcome
            if shape_note:
                notes.append(shape_note)
            records = _apply_decisions(records, decisions, module)
            order = "data-flow"
    else:
        assert loaded.state_dict is not None
        records = records_from_state_dict(loaded.state_dict)
        notes.append(
            "eps and momentum are not stored in a state_dict: fold scales assume eps=1e-5; "
            "pass --arch for exact values and fold targets"
        )
    reported = asdict(th)
    if data is None:
        reported = {k: v for k, v in reported.items() if k not in DRIFT_THRESHOLDS}
    else:
        _attach_data(records, data)
        notes += data.notes
    layers = tuple(layer_report(r, th) for r in records)
    return InspectReport(
        model=str(loaded.path),
        format=loaded.format.value,
        architecture_known=loaded.architecture_known,
        order=order,
        layers=layers,
        summary=_summary(records, layers, loaded.architecture_known),
        thresholds=reported,
        notes=tuple(notes),
        data=data.data if data is not None else None,
    )


def _attach_data(records: list[BNRecord], data: Measurement) -> None:
    """Give each record the statistics its BN's inputs have on the data (by name)."""
    for rec in records:
        m = data.moments.get(rec.name)
        if m is not None and m.count:
            rec.data_values, rec.data_mean, rec.data_var = m.count, m.mean, m.var


_TS_BN_NAMES = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "FrozenBatchNorm2d"}


def plan_folds(
    module: torch.nn.Module, example_inputs: Sequence[torch.Tensor] | None
) -> tuple[list[Decision], str | None]:
    """Run the fold pass on a throwaway capture: what would fold, and why not."""
    from bnfold.fold_torch import fold_graph
    from bnfold.graph import capture, propagate_shapes
    from bnfold.inputs import infer_example_inputs

    gm = capture(module)
    note = None
    shapes = False
    inputs = list(example_inputs) if example_inputs is not None else None
    if inputs is None:
        inputs = infer_example_inputs(gm)
        if inputs is None:
            note = "input shape not inferred; pass --input-shape for folds that need shapes"
    if inputs is not None:
        try:
            propagate_shapes(gm, inputs)
            shapes = True
        except Exception as e:  # noqa: BLE001 - a wrong guess of the input shape
            note = f"shapes unknown ({type(e).__name__}); pass --input-shape"
    outcome = fold_graph(gm, module, shapes_known=shapes)
    return outcome.decisions, note


def _summary(
    records: list[BNRecord], layers: Sequence[BNLayerReport], known: bool
) -> InspectSummary:
    folding = [r for r in records if r.fold_into is not None]
    params = sum(
        (r.gamma.size if r.gamma is not None else 0) + (r.beta.size if r.beta is not None else 0)
        for r in folding
    )
    buffers = sum(
        (r.mean.size if r.mean is not None else 0)
        + (r.var.size if r.var is not None else 0)
        + (1 if r.num_batches_tracked is not None else 0)
        for r in folding
    )
    counts: Counter[str] = Counter(code for layer in layers for code in layer.warnings)
    return InspectSummary(
        bn_layers=len(layers),
        foldable=len(folding) if known else None,
        params_removed=int(params),
        buffers_removed=int(buffers),
        bias_params_added=sum(r.bias_added for r in folding),
        warnings_by_code={code: counts[code] for code in CODES + DATA_CODES if counts[code]},
    )

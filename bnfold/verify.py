"""Verification: the exported ONNX graph against the original model.

The original model runs in PyTorch eager (eval) and, as the reference, again in
float64; the ONNX file runs in onnxruntime on the CPU provider with every graph
optimisation off, so that onnxruntime's own fusions cannot hide a mistake.  Both
see the same seeded random batches (and ``--inputs`` when given).

Per output and batch: ``max_abs_error = max |onnx - ref|`` and
``max_rel_error = max_abs_error / max |ref|`` (relative to the output's scale in that
batch, so outputs near zero do not blow it up).  An output passes when on every batch
``max_abs_error <= atol + rtol * max |ref|``: each batch against its own scale, so the
batch scaled by 100 does not widen the tolerance of the others.  Defaults for float32 models:
atol 1e-6, rtol 1e-5.  float32 rounding noise through a deep network is about
1e-7 to 7e-7 of the output's scale (ResNet-50: 6e-7), so the default leaves a
15-100x margin, while one output channel of one conv scaled by 1% already moves
the output by ~4e-4 of its scale and fails (tests/test_verify.py pins both).
float16 models get atol 1e-3, rtol 1e-2; bfloat16 1e-2 and 5e-2.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx

from bnfold.errors import VerifyError
from bnfold.reports import OutputCheck, Verification

__all__ = [
    "DEFAULT_TOLERANCES",
    "Reference",
    "compute_reference",
    "flatten_outputs",
    "onnx_output_names",
    "verify_onnx",
    "verify_onnx_pair",
    "verify_torch",
]

DEFAULT_TOLERANCES = {
    torch.float32: (1e-6, 1e-5),
    torch.float64: (1e-8, 1e-7),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-2, 5e-2),
}
_FP64_REFERENCE_LIMIT = (
    2**30
)  # bytes of float64 weights; beyond it the float32 run is the reference


def flatten_outputs(out: Any) -> list[tuple[str, torch.Tensor]]:
    """A model's outputs (tensor, tuple, list, dict, nested) in export order, named."""
    from torch.utils._pytree import keystr, tree_flatten_with_path

    leaves, _ = tree_flatten_with_path(out)
    named = []
    for path, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            named.append((keystr(path) or "output", leaf))
    return named


def onnx_output_names(paths: Sequence[str]) -> list[str]:
    """ONNX names for ``flatten_outputs``'s outputs, given their paths in the same (pytree)
    order: the path with every run of other characters made one ``_`` (``['boxes']`` ->
    ``boxes``, ``[1][0]`` -> ``output_1_0``, ``.logits`` -> ``logits``); a lone tensor is
    ``output``."""
    import re

    names: list[str] = []
    for path in paths:
        name = re.sub(r"[^0-9A-Za-z]+", "_", path).strip("_") or "output"
        if name[0].isdigit():
            name = f"output_{name}"
        while name in names:
            name += "_"
        names.append(name)
    return names


def _session(path: Path, what: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_cpu_mem_arena = False  # give memory back when the session goes
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise VerifyError(f"onnxruntime cannot load the {what}: {e}") from e


class _Worst:
    """Per output and batch: the largest error and the largest reference magnitude.

    Each batch is judged against its own scale: a batch scaled by 100 must not widen the
    tolerance of the batches beside it (an error that does not grow with the input, a
    wrong bias, would hide behind it).
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        self.batches: list[list[tuple[float, float]]] = []  # per output: (error, scale)

    @property
    def errors(self) -> list[float]:
        return [max(e for e, _ in per) for per in self.batches]

    def add(self, names: list[str], got: list[Any], ref: list[torch.Tensor]) -> None:
        if len(got) != len(ref):
            raise VerifyError(f"the ONNX model has {len(got)} outputs, the reference {len(ref)}")
        if not self.batches:
            self.batches = [[] for _ in ref]
        self.names = names
        self.shapes = [tuple(r.shape) for r in ref]
        for i, (o, r) in enumerate(zip(got, ref, strict=True)):
            got_t = (
                o.double()
                if isinstance(o, torch.Tensor)
                else torch.from_numpy(np.asarray(o)).double()
            )
            if tuple(got_t.shape) != tuple(r.shape):
                raise VerifyError(
                    f"output {names[i]} has shape {tuple(got_t.shape)} in ONNX, "
                    f"{tuple(r.shape)} in the reference"
                )
            finite = r[torch.isfinite(r)] if r.numel() else r
            scale = float(finite.abs().max()) if finite.numel() else 0.0
            self.batches[i].append((_max_abs(got_t, r), scale))

    def outputs(self, atol: float, rtol: float) -> tuple[OutputCheck, ...]:
        return tuple(
            OutputCheck(
                name=name,
                shape=shape,
                max_abs_error=max(e for e, _ in per),
                max_rel_error=max(e / s if s > 0 else e for e, s in per),
                reference_max_abs=max(s for _, s in per),
                passed=all(e <= atol + rtol * s for e, s in per),
            )
            for name, shape, per in zip(self.names, self.shapes, self.batches, strict=True)
        )


def _run(session: Any, batch: Sequence[torch.Tensor | np.ndarray], what: str) -> list[Any]:
    names = [i.name for i in session.get_inputs()]
    if len(batch) != len(names):
        raise VerifyError(f"the {what} takes {len(names)} inputs, got {len(batch)}")
    try:
        return list(session.run(None, {n: _to_numpy(t) for n, t in zip(names, batch, strict=True)}))
    except Exception as e:
        raise VerifyError(f"onnxruntime failed to run the {what}: {e}") from e


def _verification(
    worst: _Worst,
    atol: float,
    rtol: float,
    batches: int,
    source: str,
    fold_err: float | None,
    base_err: float | None,
    reference: Reference | None = None,
    target: str = "onnx",
) -> Verification:
    outputs = worst.outputs(atol, rtol)
    return Verification(
        passed=all(o.passed for o in outputs),
        atol=atol,
        rtol=rtol,
        inputs=batches,
        input_source=source,
        max_abs_error=max((o.max_abs_error for o in outputs), default=0.0),
        max_rel_error=max((o.max_rel_error for o in outputs), default=0.0),
        outputs=outputs,
        folded_torch_max_abs_error=fold_err,
        baseline_max_abs_error=base_err,
        fed=reference.fed if reference is not None else (),
        reference=reference.how if reference is not None else "",
        target=target,
    )


@dataclass
class Reference:
    """What the exported graph must reproduce: the inputs and, per batch, the original
    model's outputs in float64 (the reference)."""

    batches: list[list[torch.Tensor]]
    names: list[str]
    expected: list[list[torch.Tensor]]  # float64 reference, per batch and output
    dtype: torch.dtype
    baseline_max_abs_error: float | None  # eager vs float64; None: no float64 reference
    how: str  # what computed ``expected``
    fed: tuple[str, ...] = ()  # what the batches are, for the report


def compute_reference(
    original: torch.nn.Module,
    batches: Sequence[Sequence[torch.Tensor]],
    graph: fx.GraphModule | None = None,
) -> Reference:
    """Run ``original`` eagerly and in float64 on every batch.

    With ``graph`` (the captured, still unfolded graph of ``original``) the float64 run
    widens one layer's weights at a time, so it needs almost no memory beyond the model;
    it is trusted only when the eager float32 outputs agree with it within the default
    tolerances, otherwise the whole model is widened (as without ``graph``).  Models over
    1 GiB of float64 weights, without ``graph``, use the float32 run as the reference.
    """
    dtype = next((p.dtype for p in original.parameters() if p.is_floating_point()), torch.float32)
    inputs = [list(b) for b in batches]
    with torch.no_grad():
        eager_named = [flatten_outputs(original(*b)) for b in inputs]
    names = [n for n, _ in eager_named[0]] if eager_named else []
    eager = [[t for _, t in outs] for outs in eager_named]
    del eager_named
    expected, noise, how = None, None, ""
    if graph is not None:
        try:
            expected = _outputs(_Float64Run(graph).run, inputs)
        except Exception:  # noqa: BLE001 - the whole-model route below still works
            expected = None
        how = "float64 run of the captured graph, one layer widened at a time"
        noise = _noise(names, eager, expected, dtype) if expected is not None else None
        if noise is None:
            expected = None  # failed, or disagrees with the eager model: not trusted
    if expected is None:
        if sum(p.numel() * 8 for p in original.parameters()) > _FP64_REFERENCE_LIMIT:
            expected = [[t.double() for t in outs] for outs in eager]
            return Reference(inputs, names, expected, dtype, None, "the float32 model")
        try:
            expected = _outputs(_float64(original), inputs)
        except Exception as e:  # noqa: BLE001 - e.g. an autocast region that fixes a dtype
            expected = [[t.double() for t in outs] for outs in eager]
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            how = (
                f"the {str(dtype).removeprefix('torch.')} model: it does not run in float64 "
                f"({type(e).__name__}: {first})"
            )
            return Reference(inputs, names, expected, dtype, None, how)
        gc.collect()
        how = "float64 copy of the model"
        noise = _noise(names, eager, expected, dtype, strict=False)
    return Reference(inputs, names, expected, dtype, noise, how)


def _outputs(run: Any, inputs: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """``run``'s outputs on every batch, widened to float64 first."""
    with torch.no_grad():
        return [[t for _, t in flatten_outputs(run(*_double(b)))] for b in inputs]


def _noise(
    names: list[str],
    eager: list[list[torch.Tensor]],
    expected: list[list[torch.Tensor]],
    dtype: torch.dtype,
    strict: bool = True,
) -> float | None:
    """The eager model's largest error against a float64 run; with ``strict``, None when
    that exceeds the default tolerances or the outputs do not even line up."""
    worst = _Worst()
    try:
        for got, ref in zip(eager, expected, strict=True):
            worst.add(names, got, ref)
    except (VerifyError, ValueError):
        return None
    atol, rtol = DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES[torch.float32])
    if strict and not all(o.passed for o in worst.outputs(atol, rtol)):
        return None
    return max(worst.errors, default=0.0)


class _Float64Run(fx.Interpreter):
    """Runs a captured graph in float64: each module's floating-point parameters and
    buffers are widened just for its own call, get_attr tensors when fetched."""

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        state = {
            k: v.double() if v.is_floating_point() else v
            for k, v in (*module.named_parameters(), *module.named_buffers())
        }
        if not state:
            return module(*args, **kwargs)
        return torch.func.functional_call(module, state, tuple(args), kwargs)

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.double()
        return value


def verify_onnx(
    original: torch.nn.Module | Reference,
    onnx_path: Path,
    batches: Sequence[Sequence[torch.Tensor]] | None = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    input_source: str = "random (seeded)",
    folded_outputs: Sequence[torch.Tensor] | None = None,
) -> Verification:
    """Run the ONNX file on the reference's batches and compare with its float64 outputs.

    ``original`` is a ``Reference`` (``compute_reference``), or the original module and
    ``batches``, for which the reference is computed here first.  ``folded_outputs`` (the
    folded PyTorch model's outputs on the first batch) are compared with the same reference.
    """
    if isinstance(original, Reference):
        reference = original
    else:
        if batches is None:
            raise ValueError("verify_onnx needs batches with a module")
        reference = compute_reference(original, batches)
    atol, rtol = _tolerances(reference.dtype, atol, rtol)
    session = _session(onnx_path, "exported model")
    worst = _Worst()
    for batch, expected in zip(reference.batches, reference.expected, strict=True):
        worst.add(reference.names, _run(session, batch, "exported model"), expected)
    del session
    fold_err = None
    if folded_outputs is not None and reference.expected:
        fold_err = max(
            (
                _max_abs(g.double(), r)
                for g, r in zip(folded_outputs, reference.expected[0], strict=True)
            ),
            default=0.0,
        )
    return _verification(
        worst,
        atol,
        rtol,
        len(reference.batches),
        input_source,
        fold_err,
        reference.baseline_max_abs_error,
        reference,
    )


def _tolerances(dtype: torch.dtype, atol: float | None, rtol: float | None) -> tuple[float, float]:
    """The tolerances asked for, else the defaults for ``dtype``'s models."""
    d_atol, d_rtol = DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES[torch.float32])
    return (d_atol if atol is None else atol, d_rtol if rtol is None else rtol)


def verify_torch(
    reference: Reference,
    module: Any,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    input_source: str = "random (seeded)",
) -> Verification:
    """Run a PyTorch model (the folded module, or a saved .pt2's) on the reference's batches
    and compare with its float64 outputs, as ``verify_onnx`` does for an ONNX file."""
    atol, rtol = _tolerances(reference.dtype, atol, rtol)
    worst = _Worst()
    with torch.no_grad():
        for batch, expected in zip(reference.batches, reference.expected, strict=True):
            try:
                got = [t for _, t in flatten_outputs(module(*batch))]
            except Exception as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise VerifyError(
                    f"the folded PyTorch model failed to run: {type(e).__name__}: {first}"
                ) from e
            worst.add(reference.names, got, expected)
    return _verification(
        worst,
        atol,
        rtol,
        len(reference.batches),
        input_source,
        None,
        reference.baseline_max_abs_error,
        reference,
        target="torch",
    )


def verify_onnx_pair(
    reference_path: Path,
    onnx_path: Path,
    batches: Sequence[Sequence[torch.Tensor | np.ndarray]],
    *,
    atol: float | None = None,
    rtol: float | None = None,
    input_source: str = "random (seeded)",
) -> Verification:
    """Compare two ONNX files in onnxruntime (optimisations off); the first is the reference.

    An ONNX reference runs in its own precision, so the errors include its rounding too.
    """
    atol, rtol = _tolerances(torch.float32, atol, rtol)
    reference = _session(reference_path, "original model")
    session = _session(onnx_path, "folded model")
    names = [o.name for o in reference.get_outputs()]
    worst = _Worst()
    for batch in batches:
        ref = [
            torch.from_numpy(np.asarray(r)).double()
            for r in _run(reference, batch, "original model")
        ]
        worst.add(names, _run(session, batch, "folded model"), ref)
    return _verification(worst, atol, rtol, len(batches), input_source, None, None)


def _float64(model: torch.nn.Module) -> Any:
    """``model`` as a float64 function, without copying the model itself.

    ``torch.func.functional_call`` runs the module with float64 copies of its
    parameters and buffers; modules it cannot drive (TorchScript) are deep-copied.
    """
    state = {
        k: v.double() if v.is_floating_point() else v
        for k, v in (*model.named_parameters(), *model.named_buffers())
    }
    if isinstance(model, torch.jit.ScriptModule):
        return copy.deepcopy(model).double()

    def run(*args: torch.Tensor) -> Any:
        return torch.func.functional_call(model, state, args)

    return run


def _double(batch: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.double() if t.is_floating_point() else t for t in batch]


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest ``|a - b|``; where both are NaN, or the same infinity, they agree (the
    original computes NaN there too: not an error), anywhere else NaN counts as Inf."""
    if a.numel() == 0:
        return 0.0
    a, b = a.double(), b.double()
    agree = (torch.isnan(a) & torch.isnan(b)) | (torch.isinf(a) & (a == b))
    diff = torch.where(agree, torch.zeros_like(a), (a - b).abs())
    return float(torch.nan_to_num(diff, nan=float("inf")).max())


def _to_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    if t.dtype is torch.bfloat16:
        import ml_dtypes  # shipped with onnx

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.detach().cpu().numpy()

"""The ``fuse`` job end to end: load -> capture -> fold -> export -> verify -> report.

Library code: it prints nothing; ``step`` (a context-manager factory) lets the CLI
show progress.  The loaded model is never modified, the input file is never
written, and the output appears only when every step before writing succeeded
(verification failures still write the file: the report says it failed and the
CLI exits 1).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnfold.errors import BnfoldError, OutputError
from bnfold.reports import FoldedSite, FuseReport, SkippedSite

__all__ = ["FuseOptions", "run_fuse"]


@dataclass
class FuseOptions:
    model: Path
    out: Path | None
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_pickle: bool = False
    input_shapes: Sequence[tuple[int, ...]] = ()
    input_dtype: str = "float32"
    inputs_npz: Path | None = None
    opset: int | None = None
    exporter: str = "dynamo"
    dynamic_batch: bool = True
    atol: float | None = None
    rtol: float | None = None
    verify_batches: int = 2
    seed: int = 0
    save_torch: Path | None = None
    force: bool = False


@contextlib.contextmanager
def _no_progress(label: str) -> Iterator[None]:
    yield


def run_fuse(
    opts: FuseOptions, step: Callable[[str], ContextManager[None]] = _no_progress
) -> FuseReport:
    """Fold, export and verify; return the report (verification may have failed).

    """
    from bnfold.fuse import count_params, fold_graph, shared_modules
    from bnfold.graph import capture, propagate_shapes
    from bnfold.inputs import infer_example_inputs, random_batches, read_npz
    from bnfold.loading import load_model

    _check_outputs(opts)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 4)
        clock = now

    with step(f"Loading {opts.model.name}"):
        loaded = load_model(
            opts.model, arch=opts.arch, arch_kwargs=opts.arch_kwargs, trust_pickle=opts.trust_pickle
        )
    if loaded.onnx_model is not None:
        lap("load")
        return _run_fuse_onnx(opts, loaded, step, lap, timings)
    if loaded.module is None:
        raise BnfoldError(
            "a bare state_dict has no architecture to fold",
            path=opts.model,
            hint="pass --arch (e.g. torchvision:resnet50 or mypkg.models:Net)",
        )
    original = loaded.module
    notes = list(loaded.notes)
    _check_finite(original, opts.model)
    lap("load")
    with step("Capturing the data flow"):
        gm = capture(original)
        real = read_npz(opts.inputs_npz) if opts.inputs_npz is not None else None
        if opts.input_shapes:
            example = random_batches(opts.input_shapes, opts.input_dtype, 1, seed=opts.seed)[0]
        elif real is not None:
            example = [t[:2] for t in real[0]]  # the real inputs decide the shape
        elif loaded.example_inputs is not None:
            example = list(loaded.example_inputs)  # saved in the torch.export archive
        else:
            inferred = infer_example_inputs(gm, batch=2)
            if inferred is None:
                raise BnfoldError(
                    "cannot infer the input shape: the first layer does not decide it",
                    hint="pass --input-shape, e.g. --input-shape 1,3,224,224",
                )
            example = inferred
            notes.append(
                f"input shape inferred from the first layer: {list(example[0].shape)}; the "
                "ONNX input keeps these sizes (batch aside): pass --input-shape for the "
                "size you deploy"
            )
        try:
            propagate_shapes(gm, example)
        except Exception as e:
            guessed = "" if opts.input_shapes else " (inferred from the first layer)"
            cause = e.__cause__ or e  # ShapeProp wraps the model's own error
            raise BnfoldError(
                f"the model does not run on inputs of shape{guessed} "
                f"{', '.join(str(list(t.shape)) for t in example)}: {type(cause).__name__}: "
                f"{(str(cause).splitlines() or [''])[0][:200]}",
                hint="pass the right --input-shape",
            ) from e
    lap("capture")
    reference = None
    if opts.out is not None:
        from bnfold.verify import compute_reference

        batches = random_batches(
            [tuple(t.shape) for t in example],
            opts.input_dtype,
            opts.verify_batches,
            seed=opts.seed + 1,
        )
        source = f"{opts.verify_batches} random (seeded)"
        if real is not None:
            batches = real + batches
            source = f"{opts.inputs_npz} + {source}"
        with step("Running the original model (float32 and float64)"):
            # before folding, on the still unfolded graph: the reference needs no copy of
            # the weights, and the original can be freed before the fold
            reference = compute_reference(original, batches, graph=gm)
        lap("reference")
    params_before = count_params(original)
    model_format = loaded.format.value
    protected = shared_modules(gm, original)
    # from here the captured graph alone holds the model (the reference is computed): a
    # layer folded away is freed as soon as its folded copy goes in
    del original, loaded
    with step("Folding BatchNorm layers"):
        ops_before = _ops(gm)
        outcome = fold_graph(gm, protected, shapes_known=True)
        ops_after = _ops(outcome.module)
        folded_model = outcome.module
    lap("fold")
    folded, skipped = _sites(outcome.decisions)
    gc.collect()  # modules kept alive only by reference cycles
    report_kwargs: dict[str, Any] = {}
    torch_out: str | None = None
    if opts.out is not None:
        import torch

        from bnfold.export import atomic_output, export_onnx
        from bnfold.verify import flatten_outputs, verify_onnx

        assert reference is not None
        export_example = [_batch_of_two(t) for t in example] if opts.dynamic_batch else example
        with atomic_output(opts.out, force=opts.force) as tmp:
            with step(f"Exporting ONNX ({opts.exporter})"):
                result = export_onnx(
                    folded_model,
                    export_example,
                    tmp,
                    opts.out.name,
                    exporter=opts.exporter,
                    opset=opts.opset,
                    dynamic_batch=opts.dynamic_batch,
                )
                notes.extend(result.notes)
            lap("export")
            with torch.no_grad():
                folded_first = [t for _, t in flatten_outputs(folded_model(*reference.batches[0]))]
            if opts.save_torch is not None:
                torch_out = _save_torch(folded_model, example, opts)
                notes.append(
                    f"folded PyTorch model saved as a torch.export archive ({opts.save_torch})"
                )
            params_after = count_params(folded_model)
            del folded_model, outcome, gm  # free what this run holds before onnxruntime loads
            gc.collect()
            with step("Verifying in onnxruntime"):
                verification = verify_onnx(
                    reference,
                    result.path,
                    atol=opts.atol,
                    rtol=opts.rtol,
                    input_source=source,
                    folded_outputs=folded_first,
                )
            lap("verify")
            if verification.baseline_max_abs_error is None:
                notes.append(
                    "the model is too large for a float64 copy: the float32 original in "
                    "PyTorch is the reference"
                )
        report_kwargs.update(
            exporter=f"torch.onnx.export(dynamo={opts.exporter == 'dynamo'})",
            opset=result.opset,
            onnx_nodes=result.nodes,
            onnx_bn_nodes=result.bn_nodes,
            verification=verification,
            output=str(opts.out),
        )
        if result.bn_nodes < len(skipped):
            notes.append(
                f"the exporter removed {len(skipped) - result.bn_nodes} more BatchNormalization "
                "nodes on its own; the table shows what bnfold folded"
            )
    else:
        report_kwargs.update(
            exporter="none",
            opset=None,
            onnx_nodes=None,
            onnx_bn_nodes=None,
            verification=None,
            output=None,
        )
    if opts.out is None:
        params_after = count_params(folded_model)
        if opts.save_torch is not None:
            torch_out = _save_torch(folded_model, example, opts)
            notes.append(
                f"folded PyTorch model saved as a torch.export archive ({opts.save_torch})"
            )
    return FuseReport(
        model=str(opts.model),
        format=model_format,
        folded=folded,
        skipped=skipped,
        params_before=params_before,
        params_after=params_after,
        ops_before=ops_before,
        ops_after=ops_after,
        torch_output=torch_out,
        timings=timings,
        notes=tuple(notes),
        **report_kwargs,
    )


def _run_fuse_onnx(
    opts: FuseOptions,
    loaded: Any,
    step: Callable[[str], ContextManager[None]],
    lap: Callable[[str], None],
    timings: dict[str, float],
) -> FuseReport:
    """Fold BatchNormalization in the ONNX graph itself, save, verify against the original."""
    import onnx

    from bnfold.export import atomic_output, onnx_counts
    from bnfold.inputs import onnx_batches, read_npz
    from bnfold.onnx_fold import fold_onnx
    from bnfold.verify import verify_onnx_pair

    original = loaded.onnx_model
    before = sum(_numel(t) for t in original.graph.initializer)
    with step("Folding BatchNormalization nodes"):
        outcome = fold_onnx(original)
    lap("fold")
    folded, skipped = _sites(outcome.decisions)
    after = sum(_numel(t) for t in outcome.model.graph.initializer)
    kwargs: dict[str, Any] = {
        "exporter": "none (folded in the ONNX graph)",
        "opset": None,
        "onnx_nodes": None,
        "onnx_bn_nodes": None,
        "verification": None,
        "output": None,
    }
    if opts.out is not None:
        with atomic_output(opts.out, force=opts.force) as tmp:
            path = tmp / opts.out.name
            big = after * 4 > 2**31 - 2**20
            onnx.save(
                outcome.model,
                str(path),
                save_as_external_data=big,
                all_tensors_to_one_file=True,
                location=opts.out.name + ".data",
            )
            lap("export")
            with step("Verifying in onnxruntime"):
                batches = onnx_batches(
                    original, opts.input_shapes, opts.verify_batches, seed=opts.seed + 1
                )
                source = f"{opts.verify_batches} random (seeded)"
                if opts.inputs_npz is not None:
                    batches = read_npz(opts.inputs_npz) + batches
                    source = f"{opts.inputs_npz} + {source}"
                verification = verify_onnx_pair(
                    opts.model, path, batches, atol=opts.atol, rtol=opts.rtol, input_source=source
                )
            lap("verify")
            nodes, bn_nodes, opset = onnx_counts(path)
        kwargs.update(
            opset=opset,
            onnx_nodes=nodes,
            onnx_bn_nodes=bn_nodes,
            verification=verification,
            output=str(opts.out),
        )
    return FuseReport(
        model=str(opts.model),
        format=loaded.format.value,
        folded=folded,
        skipped=skipped,
        params_before=before,
        params_after=after,
        ops_before=len(original.graph.node),
        ops_after=len(outcome.model.graph.node),
        timings=timings,
        notes=tuple(loaded.notes),
        **kwargs,
    )


def _sites(decisions: Sequence[Any]) -> tuple[tuple[FoldedSite, ...], tuple[SkippedSite, ...]]:
    """The fold pass's decisions as report rows: what folded, what stayed and why."""
    folded = tuple(
        FoldedSite(d.bn, d.into, d.direction.value, d.rule or "", d.kind)
        for d in decisions
        if d.folded
    )
    skipped = tuple(
        SkippedSite(
            d.bn,
            d.reason.value if d.reason else "",
            d.detail or (d.reason.explanation if d.reason else ""),
        )
        for d in decisions
        if not d.folded
    )
    return folded, skipped


def _ops(gm: Any) -> int:
    return sum(n.op in ("call_module", "call_function", "call_method") for n in gm.graph.nodes)


def _numel(tensor: Any) -> int:
    n = 1
    for d in tensor.dims:
        n *= d
    return n


def _check_finite(model: Any, path: Path) -> None:
    """Refuse weights with NaN/Inf: no output of such a model can be verified."""
    from bnfold.folding import all_finite

    bad = [
        name
        for name, t in (*model.named_parameters(), *model.named_buffers())
        if t.is_floating_point() and not all_finite(t)
    ]
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise BnfoldError(
            f"NaN or Inf in {len(bad)} tensors ({shown}); such a model cannot be verified",
            hint="bnfold inspect shows which layers; fix the weights first",
            path=path,
        )


def _batch_of_two(t: Any) -> Any:
    """Exporting a dynamic batch axis needs an example batch > 1."""
    if t.dim() > 0 and t.shape[0] == 1:
        return t.expand(2, *t.shape[1:]).contiguous()
    return t


def _check_outputs(opts: FuseOptions) -> None:
    out, torch_out = opts.out, opts.save_torch
    if out is not None and torch_out is not None and out.resolve() == torch_out.resolve():
        raise OutputError("--out and --save-torch name the same file")
    for out in (opts.out, opts.save_torch):
        if out is None:
            continue
        if out.resolve() == opts.model.resolve():
            raise OutputError(
                f"refusing to overwrite the input {opts.model}", hint="choose another output path"
            )
        if out.exists() and not opts.force:
            raise OutputError(f"{out} exists", hint="pass --force to overwrite it")


def _save_torch(model: Any, example: Sequence[Any], opts: FuseOptions) -> str:
    import torch

    from bnfold.export import atomic_output

    assert opts.save_torch is not None
    with atomic_output(opts.save_torch, force=opts.force) as tmp:
        program = torch.export.export(model, tuple(example))
        torch.export.save(program, tmp / opts.save_torch.name)
    return str(opts.save_torch)

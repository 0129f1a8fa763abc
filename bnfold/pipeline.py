"""The ``fuse`` job end to end, in the README's steps: load, capture, fold, export, verify.

Library code: it prints nothing; ``step`` (a context-manager factory) lets the CLI
show progress.  The loaded model is never modified, the input file is never
written, and the output appears only when every step before writing succeeded
(verification failures still write the file: the report says it failed and the
CLI exits 1).  Whatever is written is verified: the ONNX file in onnxruntime, the
``--save-torch`` archive in PyTorch, both against a float64 run of the original.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnfold.errors import BnfoldError, CaptureError, ExportError, OutputError
from bnfold.reports import FoldedSite, FuseReport, MergedSite, SkippedSite, Verification

if TYPE_CHECKING:
    import torch

    from bnfold.export import ExportResult
    from bnfold.graph import Captured, ProgramSpec
    from bnfold.loading import LoadedModel
    from bnfold.verify import Reference

__all__ = ["FuseOptions", "run_fuse"]

Step = Callable[[str], ContextManager[None]]


@dataclass
class FuseOptions:
    model: Path
    out: Path | None
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_pickle: bool = False
    input_shapes: Sequence[tuple[int, ...]] = ()
    input_dtype: str | Sequence[str] = "float32"  # one for every input, or one per input
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
    eval_mode: bool = False  # --eval: switch a model saved in training mode to eval, and say so


@contextlib.contextmanager
def _no_progress(label: str) -> Iterator[None]:
    yield


class _Clock:
    """Seconds per step, for the report's ``timings``."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._last, 4)
        self._last = now


@dataclass
class Examples:
    """The inputs a run uses: ``example`` (one batch, the size the model is captured and
    exported at), ``other`` (the same at another batch size, for a dynamic batch axis),
    the user's ``real`` data, and where the shape came from."""

    example: list[torch.Tensor]
    other: list[torch.Tensor] | None
    real: list[list[torch.Tensor]] | None
    notes: list[str] = field(default_factory=list)
    given: list[torch.Tensor] | None = None  # the example at the batch size it was given

    @property
    def static(self) -> list[torch.Tensor]:
        """The inputs a static batch is exported with: at the batch size given."""
        return self.given if self.given is not None else self.example

    def other_batch(self, dynamic: bool) -> int | None:
        """With a dynamic batch axis, the size of verification's batch of another size
        than the one given: the export's example size (a batch of 1 is exported at 2),
        else one more.  Verification's other batches keep the size given, the cheapest.
        (The shape proofs were made at the export's size and one more.)"""
        from bnfold.inputs import batch_size

        if not dynamic or self.other is None:
            return None
        size = batch_size(self.given if self.given is not None else self.example)
        export_size = batch_size(self.example)
        if export_size is None:
            return None
        return export_size if size is not None and size != export_size else export_size + 1


def run_fuse(
    opts: FuseOptions,
    step: Step = _no_progress,
    *,
    loaded: LoadedModel | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
) -> FuseReport:
    """Fold, export and verify; return the report (verification may have failed).

    ``loaded`` is a model already in memory (the Python API), else ``opts.model`` is
    loaded; ``example_inputs`` give the input shape, as ``--input-shape`` does.
    """
    from bnfold.export import atomic_output, join_weights
    from bnfold.fold_torch import count_params, shared_modules
    from bnfold.loading import load_model
    from bnfold.verify import verify_onnx

    _check_outputs(opts)
    clock = _Clock()
    if loaded is None:
        with step(f"Loading {opts.model.name}"):
            loaded = load_model(
                opts.model,
                arch=opts.arch,
                arch_kwargs=opts.arch_kwargs,
                trust_pickle=opts.trust_pickle,
            )
    if loaded.onnx_model is not None:
        clock.lap("load")
        return _run_fuse_onnx(opts, loaded, step, clock)
    notes = list(loaded.notes)
    model = _model_to_fold(loaded, opts, notes)
    clock.lap("load")
    with step("Capturing the data flow"):
        examples = _examples(opts, loaded, model, example_inputs)
        captured = _capture(model, examples)
    notes += examples.notes + ([captured.note] if captured.note else [])
    gm, dynamic, program = captured.module, captured.dynamic_batch, captured.program
    capture, capture_detail = captured.how, captured.why
    del captured
    clock.lap("capture")
    reference = None
    if opts.out is not None or opts.save_torch is not None:
        with step("Running the original model in float64"):
            reference = _reference(model, gm, dynamic, examples, opts)
        clock.lap("reference")
        if not reference.how.startswith("float64"):
            notes.append(f"the reference is {reference.how}")
    params_before, model_format = count_params(model), loaded.format.value
    protected = shared_modules(gm, model)
    # from here the graph alone holds the model: each layer folded away is freed as soon
    # as its folded copy goes in, so the fold needs no second copy of the weights
    del model, loaded
    with step("Folding BatchNorm layers"):
        folded_model, folded, skipped, ops, merged = _fold(gm, protected)
    del gm
    clock.lap("fold")
    params_after = count_params(folded_model)
    written: dict[str, Any] = {"exporter": "none", "dynamic_batch": dynamic}
    torch_verification = None
    with contextlib.ExitStack() as outputs:
        tmp = outputs.enter_context(atomic_output(opts.out, force=opts.force)) if opts.out else None
        if tmp is not None:
            assert reference is not None
            with step(f"Exporting ONNX ({opts.exporter})"):
                result = _export(
                    folded_model, dynamic, program, examples, opts, tmp, reference, notes
                )
            written = _written(result, opts)
            file_reference = reference
            if dynamic and not result.dynamic_batch:
                file_reference = _at_batch_of(reference, examples.static)
            folded_first = _outputs_of(folded_model, file_reference.batches[0])
            clock.lap("export")
        if opts.save_torch is not None:
            assert reference is not None
            with step("Saving and verifying the folded PyTorch model"):
                torch_verification = _save_torch(folded_model, dynamic, examples, reference, opts)
            clock.lap("save_torch")
        del folded_model  # let the folded weights go before they are written again
        gc.collect()
        if tmp is not None:
            with step("Writing the ONNX file"):
                join_weights(result)
            with step("Verifying in onnxruntime"), _named_as(result.path, opts.out):
                written["verification"] = verify_onnx(
                    file_reference,
                    result.path,
                    atol=opts.atol,
                    rtol=opts.rtol,
                    input_source=", ".join(file_reference.fed),
                    folded_outputs=folded_first,
                )
            clock.lap("verify")
            if result.bn_nodes < len(skipped):
                notes.append(
                    f"the exporter removed {len(skipped) - result.bn_nodes} more "
                    "BatchNormalization nodes on its own; the table shows what bnfold folded"
                )
    return FuseReport(
        model=str(opts.model),
        format=model_format,
        output=written.get("output"),
        exporter=written["exporter"],
        opset=written.get("opset"),
        folded=folded,
        skipped=skipped,
        params_before=params_before,
        params_after=params_after,
        onnx_nodes=written.get("onnx_nodes"),
        onnx_bn_nodes=written.get("onnx_bn_nodes"),
        verification=written.get("verification"),
        torch_output=str(opts.save_torch) if opts.save_torch is not None else None,
        ops_before=ops[0],
        ops_after=ops[1],
        timings=clock.timings,
        notes=tuple(notes),
        capture=capture,
        capture_detail=capture_detail,
        dynamic_batch=written["dynamic_batch"],
        torch_verification=torch_verification,
        merged=merged,
    )


# --------------------------------------------------------------------------- steps


def _model_to_fold(loaded: LoadedModel, opts: FuseOptions, notes: list[str]) -> torch.nn.Module:
    """The loaded architecture, refused when it cannot be folded and verified: no
    architecture, TorchScript, training mode (unless ``--eval``), NaN/Inf weights."""
    import torch

    path = opts.model
    if loaded.module is None:
        raise BnfoldError(
            "a bare state_dict has no architecture to fold",
            path=path,
            hint="pass --arch (e.g. torchvision:resnet50 or mypkg.models:Net)",
        )
    model = loaded.module
    if isinstance(model, torch.jit.ScriptModule):
        raise CaptureError(
            "a TorchScript archive cannot be folded: its graph is TorchScript's, not one "
            "bnfold can rewrite and export",
            path=path,
            hint="bnfold inspect reports its BatchNorm layers; to fold, save model.state_dict() "
            "and pass --arch, or save a torch.export archive (.pt2)",
        )
    training = _in_training_mode(model)
    if training:
        if not opts.eval_mode:
            shown = ", ".join(training[:3]) + (
                f" and {len(training) - 3} more" if len(training) > 3 else ""
            )
            raise BnfoldError(
                f"the model is in training mode ({shown}): its BatchNorm layers normalise "
                "with batch statistics, which no folded or exported model can reproduce",
                path=path,
                hint="save it after model.eval(), or pass --eval to switch it to eval mode",
            )
        model.eval()
        notes.append(f"--eval: switched {len(training)} modules from training to eval mode")
    _check_finite(model, path)
    if opts.out is not None:
        _check_runs_in_onnxruntime(model, path)
    return model


def _check_runs_in_onnxruntime(model: torch.nn.Module, path: Path) -> None:
    """Refuse, before any export, a model whose ONNX file onnxruntime could not run, so
    that nothing unverified is ever written: float64 (the CPU provider has no float64
    convolution) and bfloat16 (no kernels for most operators)."""
    import torch

    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    bad = sorted(str(d).removeprefix("torch.") for d in dtypes & {torch.float64, torch.bfloat16})
    if bad:
        raise BnfoldError(
            f"the model's weights are {', '.join(bad)}: onnxruntime's CPU provider has no "
            "kernels for it (float64 convolutions, most bfloat16 operators), so an ONNX "
            "export could not be verified",
            path=path,
            hint="cast the model to float32 or float16 first, or leave out --out and keep "
            "--save-torch (verified in PyTorch)",
        )


def _in_training_mode(model: torch.nn.Module) -> list[str]:
    """The BatchNorm layers that normalise with batch statistics (training mode with
    running statistics); empty when every one uses its running statistics."""
    from bnfold.graph import is_bn_module

    return [
        name or "<model>"
        for name, m in model.named_modules()
        if is_bn_module(m) and m.training and getattr(m, "track_running_stats", True) is not False
    ]


def _examples(
    opts: FuseOptions,
    loaded: LoadedModel,
    model: torch.nn.Module,
    given: Sequence[torch.Tensor] | None = None,
) -> Examples:
    """One example batch and, for a dynamic batch axis, the same at another batch size.

    The shape comes from ``--input-shape``, else from ``--inputs``, else from a ``.pt2``'s
    saved example inputs, else from the first layer (and the report says so).  A dynamic
    batch axis needs an example batch of at least 2 (torch.export takes a size of 1 for a
    constant), so a batch of 1 is repeated to 2; ``other`` is one larger still.
    """
    from bnfold.inputs import batch_size, random_batches, read_npz, with_batch

    notes: list[str] = []
    real = read_npz(opts.inputs_npz) if opts.inputs_npz is not None else None
    if opts.verify_batches < 0 or (opts.verify_batches == 0 and real is None):
        raise BnfoldError(
            "--verify-batches 0 needs --inputs: verification must feed something",
            hint="give --inputs data.npz, or at least one random batch",
        )
    if given is not None:
        example = list(given)
    elif opts.input_shapes:
        example = random_batches(opts.input_shapes, opts.input_dtype, 1, seed=opts.seed)[0]
    elif real is not None:
        example = list(real[0])  # the real inputs decide the shape
    elif loaded.example_inputs is not None:
        example = list(loaded.example_inputs)  # saved in the torch.export archive
    else:
        example = _inferred_example(model)
        notes.append(
            f"input shape inferred from the first layer: {list(example[0].shape)}; the "
            "ONNX input keeps these sizes (batch aside): pass --input-shape for the "
            "size you deploy"
        )
    size = batch_size(example)
    given, other = example, None
    if opts.dynamic_batch and size is not None:
        export_size = max(2, size)
        example = with_batch(example, export_size, size)
        other = with_batch(example, export_size + 1, export_size)
    elif opts.dynamic_batch:
        notes.append("the inputs share no batch axis: exported with static shapes")
    return Examples(example, other, real, notes, given)


def _inferred_example(model: torch.nn.Module) -> list[torch.Tensor]:
    from bnfold.graph import capture
    from bnfold.inputs import infer_example_inputs

    hint = "pass --input-shape, e.g. --input-shape 1,3,224,224 (repeat it for several inputs)"
    try:
        gm = capture(model)
    except CaptureError as e:
        raise BnfoldError("cannot infer the input shape: " + e.message, hint=hint) from e
    inferred = infer_example_inputs(gm, batch=2)
    if inferred is None:
        raise BnfoldError(
            "cannot infer the input shape: the first layer does not decide it", hint=hint
        )
    return inferred


def _capture(model: torch.nn.Module, examples: Examples) -> Captured:
    """The data flow (``graph.capture_model``).  A capture with a static batch uses the
    inputs as given (``examples`` is updated: the export takes them too).  When nothing
    captures the model, first find out whether it runs on the inputs at all, which is the
    error to show then."""
    import torch

    from bnfold.graph import capture_model
    from bnfold.inputs import batch_size

    given = examples.static
    try:
        captured = capture_model(model, examples.example, examples.other, static=given)
    except CaptureError as e:
        try:
            with torch.no_grad():
                model(*given)
        except Exception as run:
            shapes = ", ".join(str(list(t.shape)) for t in given)
            first = (str(run).strip().splitlines() or [""])[0][:200]
            raise BnfoldError(
                f"the model does not run on inputs of shape {shapes}: "
                f"{type(run).__name__}: {first}",
                hint="pass the right --input-shape (and --input-dtype)",
            ) from run
        raise e from None
    if captured.dynamic_batch and not _runs_on(model, examples.example):
        # the graph runs at other batch sizes, the model itself does not (a .pt2 whose
        # input constraints fix the batch): the model decides
        captured = capture_model(model, given, None)
        captured.note = (
            f"the model does not run at batch size {batch_size(examples.example)}: the "
            "batch axis cannot be dynamic"
        )
    if not captured.dynamic_batch:
        examples.example, examples.other = list(given), None
    return captured


@contextlib.contextmanager
def _named_as(written: Path, out: Path | None) -> Iterator[None]:
    """Errors about the file being written name ``--out``, not the temporary folder it is
    written in until it is verified."""
    from bnfold.errors import VerifyError

    try:
        yield
    except VerifyError as e:
        message = e.message.replace(str(written), str(out)).replace(str(written.parent), ".")
        raise VerifyError(message, hint=e.hint, path=e.path) from e


def _runs_on(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> bool:
    import torch

    try:
        with torch.no_grad():
            model(*inputs)
    except Exception:  # noqa: BLE001 - any failure means no
        return False
    return True


def _reference(
    model: torch.nn.Module,
    gm: torch.fx.GraphModule,
    dynamic: bool,
    examples: Examples,
    opts: FuseOptions,
) -> Reference:
    """The original model's outputs, in float64, on every batch verification feeds
    (computed on the captured graph, one layer widened at a time, and checked against
    the model itself: ``verify.compute_reference``)."""
    from bnfold.inputs import verification_batches
    from bnfold.verify import compute_reference

    batches, fed = verification_batches(
        examples.static,
        opts.verify_batches,
        seed=opts.seed + 1,
        real=examples.real,
        real_name=str(opts.inputs_npz),
        other_batch=examples.other_batch(dynamic),
    )
    reference = compute_reference(model, batches, graph=gm)
    reference.fed = fed
    return reference


def _fold(
    gm: torch.fx.GraphModule, protected: AbstractSet[int]
) -> tuple[
    torch.fx.GraphModule,
    tuple[FoldedSite, ...],
    tuple[SkippedSite, ...],
    tuple[int, int],
    tuple[MergedSite, ...],
]:
    """Fold every BN that folds exactly, leaving the modules in ``protected`` (the model's
    own) untouched; the folded module, the report rows, the operations before and after,
    and the branch merges."""
    from bnfold.fold_torch import fold_graph

    before = _ops(gm)
    outcome = fold_graph(gm, protected, shapes_known=True)
    gc.collect()  # modules kept alive only by reference cycles
    folded, skipped = _sites(outcome.decisions)
    ops = (before, _ops(outcome.module))
    return outcome.module, folded, skipped, ops, _merged(outcome.merges)


def _export(
    folded_model: torch.fx.GraphModule,
    dynamic: bool,
    program: ProgramSpec | None,
    examples: Examples,
    opts: FuseOptions,
    folder: Path,
    reference: Reference,
    notes: list[str],
) -> ExportResult:
    """Export the folded model into ``folder`` (``opts.out``'s name), its outputs named
    after their place in the model's output structure (which folding does not change:
    the reference's paths); a torch.export capture goes back to the exporter as the
    program it came from (``program``), not traced again."""
    from bnfold.export import export_onnx
    from bnfold.verify import onnx_output_names

    assert opts.out is not None
    names = onnx_output_names(reference.names)
    result = export_onnx(
        folded_model,
        examples.example,
        folder,
        opts.out.name,
        exporter=opts.exporter,
        opset=opts.opset,
        dynamic_batch=dynamic,
        output_names=names,
        one_file=False,  # joined by join_weights once the folded model is let go
        program=program,
        static_inputs=examples.static,
    )
    notes.extend(result.notes)
    return result


def _written(result: ExportResult, opts: FuseOptions) -> dict[str, Any]:
    """The report's fields about the ONNX file."""
    return {
        "exporter": f"torch.onnx.export(dynamo={opts.exporter == 'dynamo'})",
        "opset": result.opset,
        "onnx_nodes": result.nodes,
        "onnx_bn_nodes": result.bn_nodes,
        "output": str(opts.out),
        "dynamic_batch": result.dynamic_batch,
    }


def _at_batch_of(reference: Reference, example: Sequence[torch.Tensor]) -> Reference:
    """The reference without the batches of another batch size (the export is static)."""
    from bnfold.inputs import batch_size

    size = batch_size(example)
    keep = [i for i, b in enumerate(reference.batches) if batch_size(b) == size]
    fed = tuple(f for f in reference.fed if "batch size" not in f)
    return replace(
        reference,
        batches=[reference.batches[i] for i in keep],
        expected=[reference.expected[i] for i in keep],
        fed=fed,
    )


def _outputs_of(module: torch.nn.Module, batch: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    import torch

    from bnfold.verify import flatten_outputs

    with torch.no_grad():
        return [t for _, t in flatten_outputs(module(*batch))]


def _save_torch(
    folded_model: torch.fx.GraphModule,
    dynamic: bool,
    examples: Examples,
    reference: Reference,
    opts: FuseOptions,
) -> Verification:
    """Write the folded model as a torch.export archive, then load it back and verify it
    like the ONNX file: what is written is what was checked."""
    import torch

    from bnfold.export import atomic_output
    from bnfold.graph import export_program
    from bnfold.verify import verify_torch

    assert opts.save_torch is not None
    wanted = dynamic
    with atomic_output(opts.save_torch, force=opts.force) as tmp:
        try:
            try:
                program = export_program(folded_model, examples.example, dynamic)
            except Exception:
                if not dynamic:
                    raise
                dynamic = False  # a static batch, as for the ONNX export
                program = export_program(folded_model, examples.example, dynamic)
        except Exception as e:
            from bnfold.export import _first

            raise ExportError(
                f"torch.export of the folded model failed: {_first(e)}",
                hint="leave out --save-torch; the ONNX export does not need it",
            ) from e
        path = tmp / opts.save_torch.name
        torch.export.save(program, path)
        saved = torch.export.load(path).module()
        if wanted and not dynamic:
            reference = _at_batch_of(reference, examples.example)
        return verify_torch(
            reference, saved, atol=opts.atol, rtol=opts.rtol, input_source=", ".join(reference.fed)
        )


# --------------------------------------------------------------------------- ONNX input


def _run_fuse_onnx(opts: FuseOptions, loaded: LoadedModel, step: Step, clock: _Clock) -> FuseReport:
    """Fold BatchNormalization in the ONNX graph itself, save, verify against the original."""
    import onnx

    from bnfold.export import atomic_output, onnx_counts
    from bnfold.inputs import onnx_verification_batches, read_npz
    from bnfold.onnx_fold import fold_onnx
    from bnfold.verify import verify_onnx_pair

    original = loaded.onnx_model
    assert original is not None
    before = sum(_numel(t) for t in original.graph.initializer)
    with step("Folding BatchNormalization nodes"):
        outcome = fold_onnx(original)
    clock.lap("fold")
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
            clock.lap("export")
            with step("Verifying in onnxruntime"), _named_as(path, opts.out):
                real = None
                if opts.inputs_npz is not None:
                    real = read_npz(opts.inputs_npz, as_numpy=True)
                batches, fed = onnx_verification_batches(
                    original,
                    opts.input_shapes,
                    opts.verify_batches,
                    seed=opts.seed + 1,
                    real=real,
                    real_name=str(opts.inputs_npz),
                )
                verification = verify_onnx_pair(
                    opts.model,
                    path,
                    batches,
                    atol=opts.atol,
                    rtol=opts.rtol,
                    input_source=", ".join(fed),
                )
                verification = replace(
                    verification, fed=fed, reference="the original ONNX graph in onnxruntime"
                )
            clock.lap("verify")
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
        timings=clock.timings,
        notes=tuple(loaded.notes),
        capture="onnx",
        merged=tuple(outcome.merges),
        **kwargs,
    )


# --------------------------------------------------------------------------- helpers


def _sites(decisions: Sequence[Any]) -> tuple[tuple[FoldedSite, ...], tuple[SkippedSite, ...]]:
    """The fold pass's decisions as report rows: what folded, what stayed and why."""
    folded = tuple(
        FoldedSite(
            d.bn, d.into, d.direction.value if d.direction else "merge", d.rule or "", d.kind
        )
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


def _merged(merges: Sequence[Any]) -> tuple[MergedSite, ...]:
    """The branch merges the fold pass made, as report rows."""
    return tuple(
        MergedSite(m.into, m.rule, m.convs, m.identities, m.skips)
        for m in merges
        if m.into is not None
    )


def _ops(gm: Any) -> int:
    return sum(n.op in ("call_module", "call_function", "call_method") for n in gm.graph.nodes)


def _numel(tensor: Any) -> int:
    n = 1
    for d in tensor.dims:
        n *= d
    return n


def _check_finite(model: Any, path: Path) -> None:
    """Refuse NaN/Inf where they make the folded model unverifiable: in parameters and in
    BatchNorm statistics.  Other buffers may hold them on purpose (a ``-inf`` attention
    mask)."""
    from bnfold.folding import all_finite
    from bnfold.graph import is_bn_module

    tensors = list(model.named_parameters())
    for name, m in model.named_modules():
        if is_bn_module(m):
            for key in ("running_mean", "running_var"):
                value = getattr(m, key, None)
                if value is not None:
                    tensors.append((f"{name}.{key}" if name else key, value))
    bad = [name for name, t in tensors if t.is_floating_point() and not all_finite(t)]
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise BnfoldError(
            f"NaN or Inf in {len(bad)} tensors ({shown}); such a model cannot be verified",
            hint="bnfold inspect shows which layers; fix the weights first",
            path=path,
        )


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

"""Export a (folded) PyTorch model to ONNX, atomically.

Exporters: ``dynamo`` (``torch.onnx.export(dynamo=True)``, the default of modern
torch, needs onnxscript) and ``legacy`` (the TorchScript-based exporter,
``dynamo=False``).  Both may fold or rewrite further on their own (constant
folding, their own Conv+BN fusion); bnfold reports what *it* folded and counts the
BatchNormalization nodes left in the file separately.

The file is written to a temporary folder next to the destination and moved into
place only when the export succeeded, so a failed run leaves no partial output and
an existing file intact.  Models whose weights exceed 2 GB (protobuf's limit) are
written with external data in ``<out>.data`` beside the ``.onnx`` file.
"""

from __future__ import annotations

import contextlib
import copy
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bnfold.errors import ExportError, OutputError

if TYPE_CHECKING:
    from bnfold.graph import ProgramSpec

__all__ = ["EXPORTERS", "ExportResult", "atomic_output", "export_onnx", "onnx_counts"]

EXPORTERS = ("dynamo", "legacy")
_TWO_GB = 2**31 - 2**20  # a margin below protobuf's 2 GiB


@dataclass(frozen=True)
class ExportResult:
    path: Path
    exporter: str
    opset: int
    nodes: int
    bn_nodes: int
    external_data: bool
    notes: tuple[str, ...] = ()
    dynamic_batch: bool = False  # whether the file's batch axis is dynamic


@contextlib.contextmanager
def atomic_output(dest: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary folder next to ``dest``; on success move every file in it into
    ``dest``'s folder (the main file last), on failure remove it all."""
    dest = Path(dest)
    if dest.exists() and not force:
        raise OutputError(f"{dest} exists", hint="pass --force to overwrite it")
    if dest.is_dir():
        raise OutputError(f"{dest} is a directory")
    parent = dest.parent if str(dest.parent) else Path()
    if not parent.is_dir():
        raise OutputError(f"the folder {parent} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".bnfold-tmp", dir=parent))
    try:
        yield tmp
        main = tmp / dest.name
        for extra in sorted(tmp.iterdir()):
            if extra != main:
                extra.replace(parent / extra.name)
        main.replace(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_onnx(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    folder: Path,
    name: str,
    *,
    exporter: str = "dynamo",
    opset: int | None = None,
    dynamic_batch: bool = True,
    output_names: Sequence[str] | None = None,
    one_file: bool = True,
    program: ProgramSpec | None = None,
    static_inputs: Sequence[torch.Tensor] | None = None,
) -> ExportResult:
    """Write ``folder/name`` (plus ``name.data`` for big models); return what was written.

    ``one_file=False`` (dynamo exporter) writes a small model's weights to ``name.data``
    as well, one tensor at a time, for a caller that lets the model go before
    ``join_weights`` puts them into ``name``: the model's weights are then never held
    three times at once (the model's, the protobuf message's, its bytes').

    ``output_names`` name the graph's outputs (``verify.onnx_output_names``: the model's
    output structure flattened in pytree order), else the exporter names them.

    With ``dynamic_batch`` the batch axis is dynamic where the exporter manages it; when
    it does not, the file gets a static batch, that of ``static_inputs`` (the batch size
    the user gave; ``example_inputs`` by default), and the result says so (a note, and
    ``dynamic_batch=False``).

    ``program`` (dynamo exporter): ``module`` is a graph unlifted from that torch.export
    program (and folded since); it goes to the exporter as a program again
    (``as_program``), not traced a second time.  Should the exporter refuse it, the module
    is exported as any other.
    """
    path = Path(folder) / name
    check_opset(opset, exporter)
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )
    big = n_bytes > _TWO_GB
    external = big or (not one_file and exporter == "dynamo")
    notes: list[str] = []
    inputs = tuple(example_inputs)
    names = [f"input_{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    counts: tuple[int, int, int] | None = None
    dynamic = dynamic_batch
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        try:
            if exporter == "dynamo":
                counts, dynamic = _export_dynamo(
                    module,
                    inputs,
                    tuple(static_inputs) if static_inputs is not None else inputs,
                    path,
                    opset,
                    dynamic_batch,
                    external,
                    notes,
                    output_names,
                    program,
                )
            elif exporter == "legacy":
                dynamic = _export_legacy(
                    module, inputs, path, opset, dynamic_batch, names, big, output_names
                )
            else:
                raise ExportError(f"unknown exporter {exporter!r}; use one of {EXPORTERS}")
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(
                f"torch.onnx.export ({exporter}) failed: {_why(e)}",
                hint=_hint(e, exporter),
            ) from e
        finally:
            if exporter == "dynamo":
                release_rewriter_state()
    # counting from the in-memory program avoids parsing the whole file (weights and all)
    nodes, bn_nodes, used_opset = counts if counts is not None else onnx_counts(path)
    return ExportResult(path, exporter, used_opset, nodes, bn_nodes, big, tuple(notes), dynamic)


def join_weights(result: ExportResult) -> None:
    """Put the weights ``export_onnx(one_file=False)`` left in ``<name>.data`` into the
    ``.onnx`` file itself (a model over protobuf's 2 GB keeps them beside it), with onnx's
    own reader and writer; nothing to do when they are in the file already."""
    import onnx

    data = result.path.with_name(result.path.name + ".data")
    if result.external_data or not data.exists():
        return
    model = onnx.load(str(result.path))  # reads the external data, inside its folder
    onnx.save(model, str(result.path))
    del model
    data.unlink()


def check_opset(opset: int | None, exporter: str) -> None:
    """ExportError for an opset the exporter cannot write (before any work is done)."""
    if opset is None:
        return
    import onnx

    low = 18 if exporter == "dynamo" else 7
    high = onnx.defs.onnx_opset_version()
    if not low <= opset <= high:
        raise ExportError(
            f"--opset {opset} is not supported: the {exporter} exporter writes opsets "
            f"{low} to {high}",
            hint="leave --opset out for the exporter's default"
            + ("; --exporter legacy writes older opsets" if exporter == "dynamo" else ""),
        )


_NO_FUNCTION = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'")


def _why(e: BaseException) -> str:
    """The failure in a few words: the operator the exporter cannot translate, when that is
    it (the dynamo exporter buries it in a page of advice), else the first line."""
    missing = _NO_FUNCTION.search(str(e))
    if missing:
        return f"the ONNX exporter has no translation for the operator {missing.group(1)}"
    return _first(e)


def _hint(e: BaseException, exporter: str) -> str:
    """The next step after a failed export (a static batch was tried already, when a
    dynamic one failed)."""
    if _NO_FUNCTION.search(str(e)):
        return (
            "torch.onnx.export cannot export this model either: replace that operator, or "
            "register an ONNX function for it (torch.onnx's custom_translation_table)"
        )
    other = "legacy" if exporter == "dynamo" else "dynamo"
    return f"--exporter {other} may export it (a static batch was tried already)"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _first(e: BaseException) -> str:
    """An exception in a few words: its first line, without colour codes."""
    lines = [line.strip() for line in _ANSI.sub("", str(e)).splitlines() if line.strip()]
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:300]}"


def release_rewriter_state() -> None:
    """Make onnxscript's rewrite rules let go of the last graph they matched.

    ``torch.onnx.export``'s optimiser runs onnxscript's rewriter, whose rules are module
    level objects; each keeps a pattern matcher, and the matcher keeps the last graph,
    node and match it saw (onnxscript 0.7, ``SimplePatternMatcher.match``).  That graph
    holds every exported weight, so after export the folded weights stay alive as long as
    the process, beside onnxruntime's copy during verification.  A matcher resets these
    fields itself before its next match; this resets them now.  Private onnxscript
    state: when it is not there, nothing is done (tests/test_export.py notices a leak).
    """
    import sys

    try:
        from onnxscript.rewriter import _basics, _matcher, _rewrite_rule
    except ImportError:
        return
    seen: set[int] = set()
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("onnxscript.rewriter"):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, _rewrite_rule.RewriteRuleSet):
                rules: Any = value.rules
            elif isinstance(value, (list, tuple)):
                rules = value
            else:
                rules = (value,)
            for rule in rules:
                matcher = getattr(rule, "_matcher", None)
                if not isinstance(matcher, _matcher.PatternMatcher) or id(matcher) in seen:
                    continue
                seen.add(id(matcher))
                state = vars(matcher)
                for field in ("_graph", "_current_node", "_tracer"):
                    if field in state:
                        state[field] = None
                if "_match" in state:
                    state["_match"] = _basics.MatchResult()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress to stdout and log tracebacks (with colour codes) to
    stderr; machine output must stay clean and an error is one line, so both go."""
    import io
    import logging

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export",
                                              "torch._export", "onnxscript")]  # fmt: skip
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export_dynamo(
    module: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    static_inputs: tuple[torch.Tensor, ...],
    path: Path,
    opset: int | None,
    dynamic_batch: bool,
    external: bool,
    notes: list[str],
    output_names: Sequence[str] | None,
    spec: ProgramSpec | None,
) -> tuple[tuple[int, int, int], bool]:
    from bnfold.graph import dynamic_shapes

    kwargs: dict[str, Any] = {"dynamo": True, "external_data": external}
    if output_names:
        kwargs["output_names"] = list(output_names)
    if opset is not None:
        kwargs["opset_version"] = opset
    dynamic = dynamic_batch
    program = None
    if spec is not None and isinstance(module, torch.fx.GraphModule):
        try:
            # dynamic_shapes only names the batch axis here: the program's shapes are its own
            shapes = dynamic_shapes(inputs) if dynamic_batch else None
            program = torch.onnx.export(
                as_program(module, spec), inputs, dynamic_shapes=shapes, **kwargs
            )
        except Exception:  # noqa: BLE001 - traced again below, as any module
            program = None
    if program is None and dynamic_batch:
        try:
            program = torch.onnx.export(
                module, inputs, dynamic_shapes=dynamic_shapes(inputs), **kwargs
            )
        except Exception as e:  # noqa: BLE001 - fall back to a static batch, and say so
            notes.append(
                f"the batch axis could not be exported dynamic ({_first(e)}); the ONNX file "
                "has a static batch"
            )
            dynamic = False
            program = torch.onnx.export(module, static_inputs, **kwargs)
    elif program is None:
        program = torch.onnx.export(module, inputs, **kwargs)
    if program is None:
        raise ExportError("torch.onnx.export(dynamo=True) returned no program")
    if external:
        program.save(str(path), external_data=True)
    else:
        save_single_file(program.model, path)
    graph = program.model.graph
    ops = [node.op_type for node in graph.all_nodes()]
    opset = program.model.opset_imports.get("", 0)
    return (len(list(graph)), sum(op == "BatchNormalization" for op in ops), opset), dynamic


def _export_legacy(
    module: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    opset: int | None,
    dynamic_batch: bool,
    names: list[str],
    external: bool,
    output_names: Sequence[str] | None,
) -> bool:
    if isinstance(module, torch.fx.GraphModule):
        # the legacy exporter reads a ``.graph`` attribute as a TorchScript graph (and fails
        # with dynamic axes); a plain wrapper hides the fx graph from it
        module = _Plain(module)
    batched = [n for n, t in zip(names, inputs, strict=True) if t.dim() > 0]
    dynamic_axes = {n: {0: "batch"} for n in batched} if dynamic_batch else None
    torch.onnx.export(
        module,
        inputs,
        str(path),
        dynamo=False,
        input_names=names,
        output_names=list(output_names) if output_names else None,
        dynamic_axes=dynamic_axes,
        opset_version=opset or 17,
    )
    if external:
        import onnx

        model = onnx.load(str(path))
        onnx.save(
            model,
            str(path),
            save_as_external_data=True,
            location=path.name + ".data",
            all_tensors_to_one_file=True,
        )
    return dynamic_batch


def as_program(gm: torch.fx.GraphModule, spec: ProgramSpec) -> torch.export.ExportedProgram:
    """A graph unlifted from a torch.export program (``ExportedProgram.module()``), folded
    since, as a program again, without tracing it: a copy of the graph whose weights
    (``get_attr`` nodes) are lifted to inputs, as torch.export lays a program out, with
    ``spec``'s batch range and call signature.  Every node keeps the value torch.export
    gave it; a node the fold added gets its own, computed on fake tensors.  ``gm`` is not
    changed.  Raises when the graph holds anything a program cannot (a module call)."""
    from torch._guards import detect_fake_mode
    from torch.export.graph_signature import (
        ExportGraphSignature,
        InputKind,
        InputSpec,
        OutputKind,
        OutputSpec,
        TensorArgument,
    )

    from bnfold.graph import attribute

    graph = torch.fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)  # the unlifted module's input check; the program has its own
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    fake = detect_fake_mode(tuple(n.meta.get("val") for n in inputs))
    if fake is None:
        raise ValueError("the graph's inputs carry no fake values")
    for node in inputs:
        for dim in node.meta["val"].shape:
            if isinstance(dim, torch.SymInt) and not dim.node.expr.free_symbols:
                # something ran since with the symbolic sizes and pinned them
                raise ValueError("the program's batch size is no longer symbolic")
    weights: dict[str, torch.fx.Node] = {}
    specs: list[InputSpec] = []
    state: dict[str, torch.Tensor] = {}
    for node in list(graph.nodes):
        if node.op == "get_attr":
            target = str(node.target)
            value = attribute(gm, target)
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{target} is not a tensor")
            if target not in weights:
                with graph.inserting_before(inputs[0]):
                    lifted = graph.placeholder("p_" + target.replace(".", "_"))
                lifted.meta["val"] = fake.from_tensor(value, static_shapes=True)
                weights[target] = lifted
                argument = TensorArgument(lifted.name)
                if isinstance(value, torch.nn.Parameter):
                    specs.append(InputSpec(InputKind.PARAMETER, argument, target))
                else:
                    specs.append(InputSpec(InputKind.BUFFER, argument, target, persistent=True))
                state[target] = value
            node.replace_all_uses_with(weights[target])
            graph.erase_node(node)
        elif node.op == "call_function" and "val" not in node.meta:
            with fake:
                args, kwargs = torch.fx.node.map_arg(
                    (node.args, node.kwargs), lambda a: a.meta["val"]
                )
                node.meta["val"] = node.target(*args, **kwargs)
        elif node.op not in ("placeholder", "call_function", "output"):
            raise ValueError(f"a program cannot hold {node.format_node()}")
    specs += [InputSpec(InputKind.USER_INPUT, TensorArgument(n.name), None) for n in inputs]
    results = next(n for n in graph.nodes if n.op == "output").args[0]
    outputs = [
        OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(n.name), None)
        for n in (results if isinstance(results, (list, tuple)) else (results,))
    ]
    root = torch.fx.GraphModule(torch.nn.Module(), graph)
    return torch.export.ExportedProgram(
        root=root,
        graph=root.graph,
        graph_signature=ExportGraphSignature(specs, outputs),
        state_dict=state,
        range_constraints=spec.range_constraints,
        module_call_graph=copy.deepcopy(spec.module_call_graph),
    )


def save_single_file(model: Any, path: Path) -> None:
    """Write an onnx_ir model as one ``.onnx`` file (``ir.save``; under protobuf's 2 GB
    limit: bigger models are written with external data by ``program.save``)."""
    import onnx_ir as ir

    ir.save(model, path)


class _Plain(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.model = inner

    def forward(self, *args: Any) -> Any:
        return self.model(*args)


def onnx_counts(path: Path) -> tuple[int, int, int]:
    """(nodes, BatchNormalization nodes, default-domain opset) of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    nodes = list(model.graph.node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return len(nodes), sum(n.op_type == "BatchNormalization" for n in nodes), opset

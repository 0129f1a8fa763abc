"""bnfold against the tools people use today, side by side, in one run.

    python bench/peers.py            # writes docs/BENCHMARKS.md and docs/benchmarks.png
    python bench/peers.py --quick    # the hand-built cases and two models: a smoke test

Models: the hand-built cases the fold rules exist for, torchvision and timm
architectures (re-parameterizable ones included), and the architectures people ship
(ultralytics YOLO, torchvision segmentation, segmentation-models-pytorch, Hugging Face;
built as in tests/shipped.py), all with random weights (nothing can be downloaded
here), gamma/beta drawn from U(0.5, 1.5)/U(-0.5, 0.5) and BatchNorm statistics from two
train-mode passes, as in tests/test_real_models.py.

Tools, each given the same eval-mode model:

1. bnfold: ``bnfold.fuse(model, out, dynamic_batch=False)``, what ``bnfold fuse`` runs
   (capture, fold, export with the dynamo exporter, static batch like every peer here,
   and its own verification in onnxruntime, which its time includes);
2. ``torch.fx.experimental.optimization.fuse``: BN left is counted in its fx graph and its
   error measured on its own PyTorch output; its latency is that of its graph exported
   with ``torch.onnx.export(dynamo=True)``;
3. ``torch.onnx.export(dynamo=True)`` (its default optimiser folds Conv+BN);
4. ``torch.onnx.export(dynamo=False)``, the legacy exporter (constant folding folds Conv+BN);
5. onnxsim and 6. onnxruntime's ORT_ENABLE_BASIC level (``optimized_model_filepath``),
   both applied to an export that keeps every BatchNormalization (legacy exporter,
   ``do_constant_folding=False, training=TrainingMode.PRESERVE``); their time is theirs
   alone, without that export.

Per model and tool: BatchNorm left, the max error against the model run in float64 in
PyTorch on two seeded inputs (relative to the reference's largest magnitude; onnxruntime
with all optimisations off, so its own fusions cannot hide a mistake), "wrong" above
1e-3, the tool's wall time, and the onnxruntime latency of its output (batch as listed,
CPU, 2 threads without spinning, all optimisations on, median of 60 runs taken
round-robin across the tools so that drift in the machine's speed hits every tool
alike). A tool that fails is recorded with the reason.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import bnfold  # noqa: E402
from bnfold.graph import bn_site, is_bn_module  # noqa: E402
from bnfold.verify import flatten_outputs  # noqa: E402

WRONG = 1e-3
TOOLS = ("bnfold", "torch.fx fuse", "dynamo export", "legacy export", "onnxsim", "ORT basic")
LATENCY_ROUNDS, LATENCY_PER_ROUND = 20, 3  # 60 timed runs per tool and model


# --------------------------------------------------------------------------- hand-built cases


class ConvTGroups(nn.Module):
    """ConvTranspose2d with groups=4, then BN: the weight's channel axis is split by group."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(8, 12, 3, stride=2, groups=4)
        self.bn = nn.BatchNorm2d(12)

    def forward(self, x):
        return self.bn(self.up(x))


class LeViTTokens(nn.Module):
    """timm's LeViT ``Linear_BN``: Linear over tokens, BN1d over the flattened tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)

    def forward(self, x):
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class BNNeck(nn.Module):
    """A BN between global pooling and the classifier (re-identification's BNNeck)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.neck = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.neck(torch.flatten(self.pool(torch.relu(self.conv(x))), 1)))


class SharedConv(nn.Module):
    """One conv module called twice, a BN after only one call: folding in place breaks the
    other call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class PaddedAfterBN(nn.Module):
    """BN -> zero-padded conv: the padding sees zeros, not the BN's shift, so it must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(self.bn(x))


class ConvBNBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.bn1(self.conv(x)))


# --------------------------------------------------------------------------- the zoo


@dataclass
class Case:
    name: str
    group: str  # "hand-built" or "zoo"
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]  # the input, batch included
    reparam: bool = False  # timm's reparameterize_model is measured beside the tools


def _tv(arch: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(arch, weights=None)

    return build


def _timm(arch: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(arch, pretrained=False)

    return build


IMAGE = (1, 3, 224, 224)
HAND = [
    Case("convtranspose groups=4 + BN", "hand-built", ConvTGroups, (1, 8, 9, 9)),
    Case("LeViT Linear+BN over tokens", "hand-built", LeViTTokens, (2, 10, 16)),
    Case("BN before classifier (BNNeck)", "hand-built", BNNeck, (2, 3, 16, 16)),
    Case("conv called twice, BN after one", "hand-built", SharedConv, (1, 8, 12, 12)),
    Case("BN -> zero-padded conv (must stay)", "hand-built", PaddedAfterBN, (1, 8, 12, 12)),
    Case("conv -> BN -> BN", "hand-built", ConvBNBN, (1, 3, 12, 12)),
]
QUICK_ZOO = [
    Case("tv resnet18", "zoo", _tv("resnet18"), IMAGE),
    Case("tv mobilenet_v3_small", "zoo", _tv("mobilenet_v3_small"), IMAGE),
]
ZOO = [
    *QUICK_ZOO,
    Case("tv resnet50", "zoo", _tv("resnet50"), IMAGE),
    Case("tv efficientnet_b0", "zoo", _tv("efficientnet_b0"), IMAGE),
    Case("tv regnet_y_400mf", "zoo", _tv("regnet_y_400mf"), IMAGE),
    Case("tv shufflenet_v2_x0_5", "zoo", _tv("shufflenet_v2_x0_5"), IMAGE),
    Case("tv googlenet", "zoo", _tv("googlenet"), IMAGE),
    Case("tv densenet121", "zoo", _tv("densenet121"), IMAGE),
    Case("tv convnext_tiny (no BN)", "zoo", _tv("convnext_tiny"), IMAGE),
    Case("timm levit_128s", "zoo", _timm("levit_128s"), IMAGE),
    Case("timm efficientnet_b0", "zoo", _timm("efficientnet_b0"), IMAGE),
    Case("timm rexnet_100", "zoo", _timm("rexnet_100"), IMAGE),
    Case("timm resnet26d", "zoo", _timm("resnet26d"), IMAGE),
    Case("timm dla34", "zoo", _timm("dla34"), IMAGE),
    # re-parameterizable blocks: BN on parallel and identity branches (issue 18)
    Case("timm repvgg_a0", "zoo", _timm("repvgg_a0"), IMAGE, reparam=True),
    Case("timm mobileone_s0", "zoo", _timm("mobileone_s0"), IMAGE, reparam=True),
    Case("timm fastvit_t8", "zoo", _timm("fastvit_t8"), IMAGE, reparam=True),
]


def _shipped(name: str) -> Case:
    """A model from tests/shipped.py (the architectures people ship, issue 14)."""
    from tests.shipped import BY_NAME

    shipped = BY_NAME[name]
    return Case(name, "zoo", shipped.build, shipped.shape)


SHIPPED = [
    _shipped(name)
    for name in (
        "yolov8n",
        "yolov8n-seg",
        "yolo11n",
        "yolo11n-cls",
        "deeplabv3_mobilenet_v3_large",
        "lraspp_mobilenet_v3_large",
        "smp Unet resnet34",
        "smp DeepLabV3Plus mobilenet_v2",
        "hf ResNet",
        "hf RegNet",
        "hf MobileViT",
    )
]
REPARAM = "timm reparameterize"


def populate(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Random gamma/beta and real running statistics (two train-mode passes), then eval."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if is_bn_module(m) and getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        batch = (max(shape[0], 2), *shape[1:])  # BN1d in train mode needs a batch > 1
        for _ in range(2):
            model(torch.randn(batch))
    return model.eval()


# --------------------------------------------------------------------------- measuring


def quiet(fn, *args, **kwargs):
    """Call fn with the exporters' progress prints and warnings swallowed."""
    saved = sys.stdout
    sys.stdout = io.StringIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    finally:
        sys.stdout = saved


def bn_in_onnx(path: Path) -> int:
    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(n.op_type == "BatchNormalization" for n in graph.node)


def nodes_in_onnx(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def bn_in_fx(gm: torch.fx.GraphModule) -> int:
    """BN modules and functional batch_norm calls left in an fx graph."""
    return sum(bn_site(gm, node) is not None for node in gm.graph.nodes)


def session(path: Path, level: ort.GraphOptimizationLevel, save: Path | None = None):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # spinning worker threads of the sessions taking turns would compete for the 2 cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if save is not None:
        opts.optimized_model_filepath = str(save)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def outputs(out) -> list[np.ndarray]:
    """Every tensor of a model's output (tensor, tuple, dict, dataclass), in export order."""
    return [t.detach().numpy() for _, t in flatten_outputs(out)]


def rel_error(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    """The largest error over all outputs, each relative to its reference's magnitude."""
    if len(got) != len(ref):
        raise RuntimeError(f"{len(got)} outputs where the model has {len(ref)}")
    return max(
        float(np.abs(g.astype(np.float64) - r).max() / max(np.abs(r).max(), 1e-30))
        for g, r in zip(got, ref, strict=True)
        if r.size
    )


def onnx_error(path: Path, inputs: list[torch.Tensor], refs: list[list[np.ndarray]]) -> float:
    s = session(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    name = s.get_inputs()[0].name
    return max(
        rel_error(s.run(None, {name: x.numpy()}), r) for x, r in zip(inputs, refs, strict=True)
    )


@dataclass
class Cell:
    """One tool on one model."""

    bn_left: int | None = None
    error: float | None = None
    seconds: float | None = None
    latency_ms: float | None = None
    nodes: int | None = None  # nodes in the ONNX file whose latency is measured
    onnx: Path | None = None  # the file whose latency is measured
    failed: str | None = None
    note: str = ""
    convs: int | None = None  # Conv nodes in that file

    @property
    def wrong(self) -> bool:
        return self.error is not None and self.error > WRONG


@dataclass
class Row:
    case: Case
    bn: int  # BN modules in the model
    bn_unfolded: int | None = None  # BatchNormalization nodes in the export onnxsim/ORT start from
    kept: Counter = field(default_factory=Counter)  # bnfold's reason codes for BNs it kept
    again_ms: float | None = None  # bnfold's file in a second session: the noise floor
    bn_unused: int = 0  # BN modules the eval-mode forward never calls
    cells: dict[str, Cell] = field(default_factory=dict)


def run_tool(tool: str, model: nn.Module, inputs, refs, work: Path, row: Row) -> Cell:
    x = inputs[0]
    path = work / f"{tool.replace(' ', '_').replace('.', '')}.onnx"
    start = time.perf_counter()
    if tool == "bnfold":
        report = quiet(bnfold.fuse, model, path, example_inputs=x, dynamic_batch=False)
        seconds = time.perf_counter() - start
        row.kept = Counter(s.reason for s in report.skipped)
        return Cell(bn_in_onnx(path), onnx_error(path, inputs, refs), seconds, onnx=path)
    if tool == "torch.fx fuse":
        from torch.fx.experimental.optimization import fuse

        fused = quiet(fuse, model)  # fuse deep-copies the model (inplace=False)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            error = max(rel_error(outputs(fused(i)), r) for i, r in zip(inputs, refs, strict=True))
        cell = Cell(bn_in_fx(fused), error, seconds)
        try:
            quiet(torch.onnx.export, fused, (x,), str(path), dynamo=True)
            cell.onnx = path
            cell.note = f"{bn_in_onnx(path)} BN in its ONNX export"
        except Exception as e:  # noqa: BLE001 - the fuse result stands; only latency is lost
            cell.note = f"its ONNX export failed: {_first_line(e)}"
        return cell
    if tool in ("dynamo export", "legacy export"):
        quiet(torch.onnx.export, model, (x,), str(path), dynamo=tool == "dynamo export")
        seconds = time.perf_counter() - start
        return Cell(bn_in_onnx(path), onnx_error(path, inputs, refs), seconds, onnx=path)
    raw = work / "unfolded.onnx"
    if not raw.exists():
        why = row.cells["_unfolded"].failed if "_unfolded" in row.cells else "unknown"
        raise RuntimeError(f"the unfolded export it starts from failed: {why}")
    start = time.perf_counter()
    if tool == "onnxsim":
        import onnxsim

        simplified, ok = onnxsim.simplify(onnx.load(str(raw)))
        if not ok:
            raise RuntimeError("onnxsim could not validate its result")
        onnx.save(simplified, str(path))
    else:
        session(raw, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, save=path)
    seconds = time.perf_counter() - start
    return Cell(bn_in_onnx(path), onnx_error(path, inputs, refs), seconds, onnx=path)


def export_unfolded(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    """An ONNX export that keeps every BatchNormalization, for onnxsim and ORT to fold."""
    quiet(
        torch.onnx.export,
        model,
        (x,),
        str(path),
        dynamo=False,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
    )


def latencies(row: Row, x: torch.Tensor) -> None:
    """Median latency of each tool's ONNX, optimisations on, sessions run in turn; bnfold's
    file twice, in two sessions, so that the page shows how far one file's figures spread."""
    files = {tool: cell.onnx for tool, cell in row.cells.items() if cell.onnx is not None}
    if "bnfold" in files:
        files["again"] = files["bnfold"]
    runs = {}
    for tool, path in files.items():
        s = session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        feed = {s.get_inputs()[0].name: x.numpy()}
        for _ in range(3):
            s.run(None, feed)
        runs[tool] = (s, feed, [])
    for _ in range(LATENCY_ROUNDS):
        for s, feed, times in runs.values():
            for _ in range(LATENCY_PER_ROUND):
                start = time.perf_counter()
                s.run(None, feed)
                times.append((time.perf_counter() - start) * 1000)
    for tool, (_, _, times) in runs.items():
        if tool == "again":
            row.again_ms = statistics.median(times)
        else:
            row.cells[tool].latency_ms = statistics.median(times)
            row.cells[tool].nodes = nodes_in_onnx(files[tool])


def _first_line(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:140]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def measure_case(case: Case) -> Row:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's googlenet warns about its init
        model = populate(case.build(), case.shape)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(case.shape, generator=gen) for _ in range(2)]
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        refs = [outputs(reference(x.double())) for x in inputs]
    del reference
    row = Row(case, sum(1 for m in model.modules() if is_bn_module(m)))
    row.bn_unused = unused_bn(model, inputs[0])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            export_unfolded(model, inputs[0], work / "unfolded.onnx")
            row.bn_unfolded = bn_in_onnx(work / "unfolded.onnx")
        except Exception as e:  # noqa: BLE001 - onnxsim and ORT then fail with this reason
            row.cells["_unfolded"] = Cell(failed=_first_line(e))
        for tool in TOOLS:
            try:
                row.cells[tool] = run_tool(tool, model, inputs, refs, work, row)
            except Exception as e:  # noqa: BLE001 - a failing tool is a result
                row.cells[tool] = Cell(failed=_first_line(e))
        row.cells.pop("_unfolded", None)
        if case.reparam:
            try:
                row.cells[REPARAM] = run_reparam(model, inputs, refs, work)
            except Exception as e:  # noqa: BLE001 - a failing tool is a result
                row.cells[REPARAM] = Cell(failed=_first_line(e))
        latencies(row, inputs[0])
        for cell in row.cells.values():
            if cell.onnx is not None:
                cell.convs = sum(n.op_type == "Conv" for n in onnx.load(str(cell.onnx)).graph.node)
    return row


def run_reparam(model: nn.Module, inputs, refs, work: Path) -> Cell:
    """timm's own ``reparameterize_model`` (each block's ``reparameterize()``) on a copy,
    then the dynamo export: the architecture's authors' answer to the branches bnfold
    merges from the graph."""
    from timm.utils.model import reparameterize_model

    path = work / "timm_reparameterize.onnx"
    start = time.perf_counter()
    merged = reparameterize_model(copy.deepcopy(model))
    quiet(torch.onnx.export, merged, (inputs[0],), str(path), dynamo=True)
    seconds = time.perf_counter() - start
    return Cell(bn_in_onnx(path), onnx_error(path, inputs, refs), seconds, onnx=path)


def unused_bn(model: nn.Module, x: torch.Tensor) -> int:
    """BN modules that one eval-mode forward never calls (e.g. googlenet's aux classifiers)."""
    called: set[int] = set()
    hooks = [
        m.register_forward_hook(lambda mod, *_: called.add(id(mod)))
        for m in model.modules()
        if is_bn_module(m)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return sum(1 for m in model.modules() if is_bn_module(m) and id(m) not in called)


def warm_up() -> None:
    """Pay the exporters' one-time start-up (imports, registries) before anything is timed."""
    model = populate(ConvBNBN(), (1, 3, 12, 12))
    x = torch.randn(1, 3, 12, 12)
    with tempfile.TemporaryDirectory() as tmp:
        for dynamo in (True, False):
            quiet(torch.onnx.export, model, (x,), f"{tmp}/w.onnx", dynamo=dynamo)
        export_unfolded(model, x, Path(tmp) / "u.onnx")
        quiet(bnfold.fuse, model, Path(tmp) / "b.onnx", example_inputs=x, dynamic_batch=False)
        try:
            import onnxsim

            onnxsim.simplify(onnx.load(f"{tmp}/u.onnx"))
        except ImportError:
            pass


# --------------------------------------------------------------------------- the page


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for mod in ("torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxscript", "onnxsim"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            versions.append(f"{mod} not installed")
    return (
        f"{os.cpu_count()} CPUs ({cpu}, {platform.machine()}), torch using "
        f"{torch.get_num_threads()} threads; Python {platform.python_version()}; "
        + ", ".join(versions)
    )


def best_peer(row: Row) -> int | None:
    """Fewest BN left by a peer that neither failed nor changed the model."""
    left = [
        c.bn_left
        for t, c in row.cells.items()
        if t in TOOLS
        and t != "bnfold"
        and c.failed is None
        and not c.wrong
        and c.bn_left is not None
    ]
    return min(left) if left else None


def fmt(cell: Cell, key: str) -> str:
    if cell.failed is not None:
        return "failed"
    value = getattr(cell, key)
    if value is None:
        return "-"
    if key == "error":
        return ("**WRONG** " if cell.wrong else "") + f"{value:.1e}"
    if key == "seconds":
        return f"{value:.2f}"
    if key == "latency_ms":
        return f"{value:.3f}" if value < 1 else f"{value:.1f}"
    return str(value)


def table(
    rows: list[Row],
    key: str,
    before: tuple[str, Callable[[Row], str]] | None = None,
    after: tuple[str, Callable[[Row], str]] | None = None,
) -> list[str]:
    head = "| model | BN in model | " + (f"{before[0]} | " if before else "") + " | ".join(TOOLS)
    head += f" | {after[0]}" if after else ""
    lines = [
        head + " |",
        "|---|---:|"
        + ("---:|" if before else "")
        + "---:|" * len(TOOLS)
        + ("---:|" if after else ""),
    ]
    for group in ("hand-built", "zoo"):
        for r in (r for r in rows if r.case.group == group):
            cells = []
            for t in TOOLS:
                text = fmt(r.cells[t], key)
                if key == "bn_left" and t == "bnfold" and r.cells[t].failed is None:
                    peer = best_peer(r)
                    if peer is not None and r.cells[t].bn_left is not None:
                        if r.cells[t].bn_left < peer:
                            text = f"**{text}**"
                        elif r.cells[t].bn_left > peer:
                            text = f"{text} ⚠"
                cells.append(text)
            lines.append(
                f"| {r.case.name} | {r.bn} | "
                + (f"{before[1](r)} | " if before else "")
                + " | ".join(cells)
                + (f" | {after[1](r)}" if after else "")
                + " |"
            )
    return lines


# Other benchmarks write their sections below this line (bench/recalibrate_accuracy.py);
# regenerating the page keeps them.
OTHERS_MARKER = "<!-- written by other benchmarks: bench/peers.py keeps everything below -->"


def kept_sections(path: Path) -> str:
    """What other benchmarks wrote below ``OTHERS_MARKER`` in ``path``, marker included."""
    text = path.read_text() if path.is_file() else ""
    return "\n" + OTHERS_MARKER + text.split(OTHERS_MARKER, 1)[1] if OTHERS_MARKER in text else ""


def page(rows: list[Row], seconds: float, command: str, started: str, load: str) -> str:
    fewer = [r.case.name for r in rows if _compare(r) == "fewer"]
    more = [r.case.name for r in rows if _compare(r) == "more"]
    lines = [
        "# bnfold against the tools people use today",
        "",
        "Generated by `bench/peers.py`; do not edit by hand. Regenerate with "
        "`make bench-peers` or:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"This run: **{seconds / 60:.1f} min** wall time, started {started}; "
        f"{machine()}. Load average before the run: {load}.",
        "",
        "## What is compared",
        "",
        "Every tool gets the same eval-mode PyTorch model:",
        "",
        "| tool | what runs | BN left counted in | error measured on |",
        "|---|---|---|---|",
        "| bnfold | `capture` → `propagate_shapes` → `fold_graph`, then `export_onnx` "
        "(dynamo exporter, static batch) | its ONNX file | its ONNX file |",
        "| torch.fx fuse | `torch.fx.experimental.optimization.fuse(model)` | **its fx graph** "
        "(BN modules and `batch_norm` calls); the count after exporting that graph with "
        "the dynamo exporter is in the notes | its PyTorch output |",
        "| dynamo export | `torch.onnx.export(model, dynamo=True)` (default optimiser on) "
        "| its ONNX file | its ONNX file |",
        "| legacy export | `torch.onnx.export(model, dynamo=False)` (constant folding on) "
        "| its ONNX file | its ONNX file |",
        "| onnxsim | `onnxsim.simplify` on the unfolded export¹ | its ONNX file | its ONNX file |",
        "| ORT basic | `onnxruntime.InferenceSession` with `ORT_ENABLE_BASIC` and "
        "`optimized_model_filepath`, on the unfolded export¹ | the saved ONNX file "
        "| the saved ONNX file |",
        "",
        "¹ The unfolded export is `torch.onnx.export(model, dynamo=False, "
        "do_constant_folding=False, training=TrainingMode.PRESERVE)`; the column "
        '"unfolded export" below shows it kept every BatchNormalization. Its time is not '
        "counted in onnxsim's or ORT's.",
        "",
        "Models have random weights (no downloads are possible here), gamma and beta drawn "
        "from U(0.5, 1.5) and U(-0.5, 0.5), and running statistics from two train-mode "
        "passes on random batches. **Error** is max |output − reference| / max |reference| "
        "over two seeded inputs, the reference being the PyTorch model in float64; ONNX "
        "files run in onnxruntime with all graph optimisations off, so its own fusions "
        f"cannot hide a mistake. **WRONG** means an error above {WRONG:g}. **Time** is the "
        "tool's wall time in this process (exporters warmed up first on a tiny model). "
        "**Latency** is onnxruntime on the CPU, 2 intra-op threads without spinning, all "
        "optimisations on, "
        "input batch as in the model's shape (1 for the zoo), median of "
        f"{LATENCY_ROUNDS * LATENCY_PER_ROUND} runs taken round-robin across the tools.",
        "",
        "![BatchNorm left per model and tool](benchmarks.png)",
        "",
        "## Summary",
        "",
        f"- bnfold leaves fewer BatchNorm layers than the best correct peer on "
        f"{len(fewer)} of {len(rows)} models: {', '.join(fewer) if fewer else 'none'}.",
        f"- bnfold leaves more BatchNorm layers than some correct peer on: "
        f"{', '.join(more) if more else 'none'}.",
    ]
    for tool in TOOLS:
        wrong = [r.case.name for r in rows if r.cells[tool].wrong]
        failed = [r.case.name for r in rows if r.cells[tool].failed is not None]
        lines.append(
            f"- {tool}: wrong results on {', '.join(wrong) if wrong else 'none'}; "
            f"failed on {', '.join(failed) if failed else 'none'}."
        )
    lines += [
        "",
        "## BatchNorm left",
        "",
        "Bold: bnfold leaves fewer than every correct peer; ⚠: more than some correct peer.",
        "",
        *table(
            rows,
            "bn_left",
            ("unfolded export", lambda r: "-" if r.bn_unfolded is None else str(r.bn_unfolded)),
        ),
        "",
        "## Why bnfold keeps the BatchNorm layers it keeps",
        "",
        "| model | kept | reason codes (bnfold's own report) |",
        "|---|---:|---|",
    ]
    for r in rows:
        if r.kept:
            codes = ", ".join(f"`{code}` × {n}" for code, n in r.kept.most_common())
            lines.append(f"| {r.case.name} | {sum(r.kept.values())} | {codes} |")
    lines += [
        "",
        "## Error against the float64 reference",
        "",
        *table(rows, "error"),
        "",
        "## Time taken by the tool (s)",
        "",
        *table(rows, "seconds"),
        "",
        "## onnxruntime latency of the output (ms, optimisations on)",
        "",
        *table(
            rows,
            "latency_ms",
            after=(
                "bnfold, 2nd session",
                lambda r: (
                    "-" if r.again_ms is None else fmt(Cell(latency_ms=r.again_ms), "latency_ms")
                ),
            ),
        ),
        "",
        "The last column is bnfold's own file again, in a second session taking its turn "
        "with the others: how far two measurements of one file drift apart in this run. "
        "Latencies of the hand-built cases are microseconds of call overhead, not a "
        "comparison.",
        "",
        "## Nodes in the ONNX file whose latency is measured",
        "",
        "For torch.fx fuse, its graph exported with the dynamo exporter.",
        "",
        *table(rows, "nodes"),
    ]
    reparam = [r for r in rows if r.case.reparam]
    if reparam:
        lines += [
            "",
            "## Re-parameterizable models: bnfold against timm's `reparameterize_model`",
            "",
            "RepVGG, MobileOne and FastViT sum parallel branches (`BN(conv_kxk(x)) + "
            "BN(conv_1x1(x)) + BN(x)`); bnfold merges them from the graph (rule "
            "`branch_merge`), timm with each block's own `reparameterize()` "
            "(`timm.utils.model.reparameterize_model` on a copy, then the dynamo export).",
            "",
            "| model | tool | BN left | Conv nodes | nodes | error | latency (ms) |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in reparam:
            for tool in ("bnfold", "dynamo export", REPARAM):
                c = r.cells.get(tool)
                if c is None or c.failed is not None:
                    lines.append(f"| {r.case.name} | {tool} | failed | | | | |")
                    continue
                lines.append(
                    f"| {r.case.name} | {tool} | {fmt(c, 'bn_left')} | "
                    f"{'-' if c.convs is None else c.convs} | {fmt(c, 'nodes')} | "
                    f"{fmt(c, 'error')} | {fmt(c, 'latency_ms')} |"
                )
    notes = (
        [
            f"- {t} on {r.case.name}: failed: {c.failed}"
            for r in rows
            for t, c in r.cells.items()
            if c.failed is not None
        ]
        + [
            f"- {r.case.name}: the model has {r.bn} BN modules, the unfolded export "
            f"{r.bn_unfolded} BatchNormalization nodes; {r.bn_unused} BN modules are never "
            "called by the eval-mode forward"
            for r in rows
            if r.bn_unfolded is not None and r.bn_unfolded != r.bn
        ]
        + [
            f"- {t} on {r.case.name}: {c.note}"
            for r in rows
            for t, c in r.cells.items()
            if c.note
            and not (t == "torch.fx fuse" and c.note == f"{c.bn_left} BN in its ONNX export")
        ]
    )
    if notes:
        lines += [
            "",
            "## Failures and notes",
            "",
            "torch.fx fuse notes appear only where its ONNX export holds a different number "
            "of BatchNormalization nodes than its fx graph (the dynamo exporter folded more).",
            "",
            *notes,
        ]
    return "\n".join(lines) + "\n"


def _compare(row: Row) -> str:
    ours, peer = row.cells["bnfold"], best_peer(row)
    if ours.failed is not None or ours.wrong or ours.bn_left is None or peer is None:
        return "n/a"
    return "fewer" if ours.bn_left < peer else "more" if ours.bn_left > peer else "same"


def chart(rows: list[Row], path: Path) -> None:
    """A grid, models down and tools across: the BN left in each cell, shaded by the share
    of the model's BN left (pale green: none), red for a wrong result, grey for a failure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    ordered = [r for g in ("hand-built", "zoo") for r in rows if r.case.group == g]
    columns = ["BN in model", *TOOLS]
    n_hand = sum(r.case.group == "hand-built" for r in ordered)
    fig, ax = plt.subplots(figsize=(11, 0.42 * len(ordered) + 2.4))
    cmap = plt.get_cmap("Blues")
    for i, r in enumerate(ordered):
        y = len(ordered) - 1 - i
        ax.add_patch(Rectangle((0, y), 1, 1, facecolor="#f0f0f0", edgecolor="white", lw=2))
        ax.text(0.5, y + 0.5, str(r.bn), ha="center", va="center", fontsize=10)
        for j, tool in enumerate(TOOLS, start=1):
            c = r.cells[tool]
            if c.failed is not None:
                face, text, colour, weight = "#d0d0d0", "failed", "#444444", "normal"
            elif c.bn_left is None:  # the tool does not apply to this model
                face, text, colour, weight = "#f7f7f7", "-", "#444444", "normal"
            elif c.wrong:
                face, text, colour, weight = "#d62728", f"{c.bn_left}: WRONG", "white", "bold"
            elif c.bn_left == 0:
                face, text, colour, weight = "#dff2e1", "0", "#2e7d32", "normal"
            else:
                share = (c.bn_left or 0) / max(r.bn, 1)
                face, text = cmap(0.2 + 0.55 * share), str(c.bn_left)
                colour, weight = ("white" if share > 0.7 else "black"), "normal"
            ax.add_patch(Rectangle((j, y), 1, 1, facecolor=face, edgecolor="white", lw=2))
            if tool == "bnfold" and _compare(r) == "fewer":
                weight = "bold"
                text += " ★"
            ax.text(
                j + 0.5,
                y + 0.5,
                text,
                ha="center",
                va="center",
                fontsize=10,
                color=colour,
                fontweight=weight,
            )
    # bnfold's column framed; a rule between the hand-built cases and the zoo
    ax.add_patch(Rectangle((1, 0), 1, len(ordered), fill=False, edgecolor="black", lw=2.5))
    if 0 < n_hand < len(ordered):
        ax.axhline(len(ordered) - n_hand, color="black", lw=1.5)
    ax.set_xlim(0, len(columns))
    ax.set_ylim(0, len(ordered))
    ax.set_xticks([j + 0.5 for j in range(len(columns))], columns, fontsize=10)
    ax.xaxis.tick_top()
    ax.set_yticks(
        [len(ordered) - 1 - i + 0.5 for i in range(len(ordered))],
        [r.case.name for r in ordered],
        fontsize=10,
    )
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(
        "BatchNorm layers left after each tool (hand-built cases above the line, model zoo below)",
        fontsize=12,
        pad=28,
    )
    fig.text(
        0.01,
        0.01,
        "green: none left · blue: darker = larger share of the model's BN left · red: wrong "
        "result (error > 1e-3) · grey: the tool failed · ★: bnfold leaves fewer than every "
        "correct peer",
        fontsize=8.5,
        color="#444444",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="the hand-built cases and two models (smoke test)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the page")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    start = time.perf_counter()
    warm_up()
    rows = []
    for case in HAND + (QUICK_ZOO if args.quick else ZOO + SHIPPED):
        t0 = time.perf_counter()
        rows.append(measure_case(case))
        left = {t: c.bn_left if c.failed is None else "failed" for t, c in rows[-1].cells.items()}
        print(f"{case.name} ({time.perf_counter() - t0:.0f} s): {left}", file=sys.stderr)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python bench/peers.py" + (" --quick" if args.quick else "")
    target = args.out / "BENCHMARKS.md"
    target.write_text(page(rows, seconds, command, started, load) + kept_sections(target))
    chart(rows, args.out / "benchmarks.png")
    print(f"wrote {args.out}/BENCHMARKS.md and benchmarks.png in {seconds:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

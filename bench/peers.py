"""bnfold against the tools people use today, side by side, in one run.

    python bench/peers.py [--quick]      # writes docs/BENCHMARKS.md and docs/benchmarks.png

For every model (torchvision and timm architectures with random weights and statistics
from a few train-mode passes; the hand-built cases the fold rules exist for) and every
tool, it records the BatchNorm layers left, the error against a float64 PyTorch
reference on the same seeded inputs (relative to the output's largest magnitude),
"wrong" when that error exceeds 1e-3, the tool's time, and the onnxruntime latency of its
output (batch 1, 2 threads, optimisations on, median). A tool that fails is recorded
with its reason.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bnfold.export import export_onnx  # noqa: E402
from bnfold.fuse import fold_graph  # noqa: E402
from bnfold.graph import capture, is_bn_module, propagate_shapes  # noqa: E402

WRONG = 1e-3
TOOLS = ("bnfold", "torch.fx fuse", "dynamo export", "legacy export", "onnxsim", "ORT basic opt")


# --------------------------------------------------------------------------- models


def _stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if is_bn_module(m) and getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        for _ in range(2):
            model(x)
    return model.eval()


class ConvTGroups(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(8, 12, 3, stride=2, groups=4)
        self.bn = nn.BatchNorm2d(12)

    def forward(self, x):
        return self.bn(self.up(x))


class LeViTTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)

    def forward(self, x):
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class BNNeck(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.neck = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.neck(torch.flatten(self.pool(torch.relu(self.conv(x))), 1)))


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class PaddedAfterBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(self.bn(x))


class ConvBNBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.bn1(self.conv(x)))


def zoo(quick: bool) -> list[tuple[str, nn.Module, torch.Tensor]]:
    import timm
    import torchvision

    image = torch.randn(1, 3, 224, 224)
    hand = [
        ("convtranspose groups=4 + BN", ConvTGroups(), torch.randn(1, 8, 9, 9)),
        ("LeViT Linear+BN over tokens", LeViTTokens(), torch.randn(2, 10, 16)),
        ("BN before classifier (BNNeck)", BNNeck(), torch.randn(2, 3, 16, 16)),
        ("conv called twice, BN after one", SharedConv(), torch.randn(1, 8, 12, 12)),
        ("BN -> zero-padded conv (must stay)", PaddedAfterBN(), torch.randn(1, 8, 12, 12)),
        ("conv -> BN -> BN", ConvBNBN(), torch.randn(1, 3, 12, 12)),
    ]
    real = [
        ("torchvision resnet18", lambda: torchvision.models.resnet18(), image),
        ("torchvision mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(), image),
    ]
    if not quick:
        real += [
            ("torchvision resnet50", lambda: torchvision.models.resnet50(), image),
            ("torchvision efficientnet_b0", lambda: torchvision.models.efficientnet_b0(), image),
            ("torchvision regnet_y_400mf", lambda: torchvision.models.regnet_y_400mf(), image),
            ("torchvision densenet121", lambda: torchvision.models.densenet121(), image),
            (
                "torchvision convnext_tiny (no BN)",
                lambda: torchvision.models.convnext_tiny(),
                image,
            ),
            ("timm levit_128s", lambda: timm.create_model("levit_128s"), image),
            ("timm rexnet_100", lambda: timm.create_model("rexnet_100"), image),
        ]
    out = []
    for name, model, x in hand:
        out.append((name, _stats(model, torch.randn(4, *x.shape[1:])), x))
    for name, build, x in real:
        torch.manual_seed(0)
        out.append((name, _stats(build(), torch.randn(2, *x.shape[1:])), x))
    return out


# --------------------------------------------------------------------------- measuring


def bn_in_onnx(path: Path) -> int:
    return sum(
        n.op_type == "BatchNormalization"
        for n in onnx.load(str(path), load_external_data=False).graph.node
    )


def bn_in_fx(gm: torch.fx.GraphModule) -> int:
    left = 0
    for node in gm.graph.nodes:
        if (node.op == "call_module" and is_bn_module(gm.get_submodule(node.target))) or (
            node.op == "call_function" and "batch_norm" in str(node.target)
        ):
            left += 1
    return left


def session(path: Path, level: ort.GraphOptimizationLevel, save: Path | None = None):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    if save is not None:
        opts.optimized_model_filepath = str(save)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_error(path: Path, x: torch.Tensor, ref: np.ndarray) -> tuple[float, float]:
    """(relative error of the ONNX model, latency ms with optimisations on)."""
    s = session(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    feed = {s.get_inputs()[0].name: x.numpy()}
    got = s.run(None, feed)[0]
    err = float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())
    fast = session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    for _ in range(3):
        fast.run(None, feed)
    times = []
    for _ in range(15):
        start = time.perf_counter()
        fast.run(None, feed)
        times.append((time.perf_counter() - start) * 1000)
    return err, statistics.median(times)


def quiet(fn, *args, **kwargs):
    saved = sys.stdout
    sys.stdout = io.StringIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    finally:
        sys.stdout = saved


def run_tool(tool: str, model: nn.Module, x: torch.Tensor, ref: np.ndarray, work: Path):
    """One row cell: dict with bn_left, error, wrong, seconds, latency_ms or failed."""
    path = work / f"{tool.replace(' ', '_').replace('.', '')}.onnx"
    start = time.perf_counter()
    latency = None
    if tool == "bnfold":
        gm = capture(model)
        propagate_shapes(gm, [x])
        folded = fold_graph(gm, model, shapes_known=True).module
        quiet(export_onnx, folded, [x], work, path.name, dynamic_batch=False)
        seconds = time.perf_counter() - start
        left = bn_in_onnx(path)
        err, latency = onnx_error(path, x, ref)
    elif tool == "torch.fx fuse":
        from torch.fx.experimental.optimization import fuse

        fused = quiet(fuse, copy.deepcopy(model))
        seconds = time.perf_counter() - start
        left = bn_in_fx(fused)
        with torch.no_grad():
            got = fused(x).double().numpy()
        err = float(np.abs(got - ref).max() / np.abs(ref).max())
        quiet(torch.onnx.export, fused, (x,), str(path), dynamo=True)
        _, latency = onnx_error(path, x, ref)
    elif tool == "dynamo export":
        quiet(torch.onnx.export, model, (x,), str(path), dynamo=True)
        seconds = time.perf_counter() - start
        left = bn_in_onnx(path)
        err, latency = onnx_error(path, x, ref)
    elif tool == "legacy export":
        quiet(torch.onnx.export, model, (x,), str(path), dynamo=False)
        seconds = time.perf_counter() - start
        left = bn_in_onnx(path)
        err, latency = onnx_error(path, x, ref)
    else:
        raw = work / "unfolded.onnx"
        quiet(
            torch.onnx.export,
            model,
            (x,),
            str(raw),
            dynamo=False,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.PRESERVE,
        )
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
        left = bn_in_onnx(path)
        err, latency = onnx_error(path, x, ref)
    return {
        "bn_left": left,
        "error": err,
        "wrong": err > WRONG,
        "seconds": seconds,
        "latency_ms": latency,
    }


def measure(quick: bool) -> list[dict]:
    rows = []
    for name, model, x in zoo(quick):
        with torch.no_grad():
            ref = copy.deepcopy(model).double()(x.double()).numpy()
        bn_total = sum(1 for m in model.modules() if is_bn_module(m))
        row = {"model": name, "bn": bn_total, "tools": {}}
        with tempfile.TemporaryDirectory() as tmp:
            for tool in TOOLS:
                try:
                    row["tools"][tool] = run_tool(tool, model, x, ref, Path(tmp))
                except Exception as e:  # noqa: BLE001 - a failing tool is a result
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
                    row["tools"][tool] = {"failed": f"{type(e).__name__}: {first}"}
        rows.append(row)
        print(name, {t: c.get("bn_left", "fail") for t, c in row["tools"].items()}, file=sys.stderr)
    return rows


# --------------------------------------------------------------------------- page


def cell(c: dict, key: str) -> str:
    if "failed" in c:
        return "failed"
    value = c[key]
    if key == "error":
        return ("**WRONG** " if c["wrong"] else "") + f"{value:.1e}"
    if key in ("seconds", "latency_ms"):
        return "-" if value is None else f"{value:.2f}"
    return str(value)


def page(rows: list[dict], seconds: float, command: str) -> str:
    lines = [
        "# bnfold against the tools people use today",
        "",
        f"Regenerate with `{command}` (this run: {seconds / 60:.1f} min on "
        f"{platform.machine()} with {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}; "
        f"{datetime.date.today()}).",
        "",
        "Models have random weights with BatchNorm statistics from two train-mode passes and "
        "randomised gamma/beta (no weights can be downloaded here). Error: max |output - "
        "float64 PyTorch reference| / max |reference| on the same seeded input; **WRONG** "
        f"above {WRONG:g}. torch.fx fuse is measured on its PyTorch output; every other tool "
        "on its ONNX file in onnxruntime with optimisations off. onnxsim and ORT basic "
        "optimisation start from an export that keeps every BatchNormalization "
        "(legacy exporter, `do_constant_folding=False, training=PRESERVE`).",
        "",
        "![BatchNorm left per model and tool](benchmarks.png)",
        "",
    ]
    better = [
        r["model"]
        for r in rows
        if "bn_left" in r["tools"]["bnfold"]
        and not r["tools"]["bnfold"]["wrong"]
        and r["tools"]["bnfold"]["bn_left"]
        < min(
            (
                c["bn_left"]
                for t, c in r["tools"].items()
                if t != "bnfold" and "bn_left" in c and not c["wrong"]
            ),
            default=10**9,
        )
    ]
    wrong = {t: [r["model"] for r in rows if r["tools"][t].get("wrong")] for t in TOOLS}
    lines += ["## Summary", ""]
    lines.append(
        f"- bnfold leaves fewer BatchNorm layers than every correct peer on: "
        f"{', '.join(better) if better else 'none'}."
    )
    for tool in TOOLS:
        lines.append(
            f"- wrong results from {tool}: {', '.join(wrong[tool]) if wrong[tool] else 'none'}."
        )
    for key, title in (
        ("bn_left", "BatchNorm left"),
        ("error", "Error against float64"),
        ("seconds", "Time taken by the tool (s)"),
        ("latency_ms", "onnxruntime latency of the output (ms, batch 1)"),
    ):
        lines += [
            "",
            f"## {title}",
            "",
            "| model | BN | " + " | ".join(TOOLS) + " |",
            "|---|---:|" + "---:|" * len(TOOLS),
        ]
        for r in rows:
            lines.append(
                f"| {r['model']} | {r['bn']} | "
                + " | ".join(cell(r["tools"][t], key) for t in TOOLS)
                + " |"
            )
    failures = [
        (r["model"], t, c["failed"]) for r in rows for t, c in r["tools"].items() if "failed" in c
    ]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- {t} on {m}: {why}" for m, t, why in failures]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(14, 6))
    width = 0.8 / len(TOOLS)
    for k, tool in enumerate(TOOLS):
        values = [r["tools"][tool].get("bn_left", np.nan) for r in rows]
        xs = [i + k * width for i in range(len(rows))]
        bars = ax.bar(xs, values, width, label=tool)
        for x, r, bar in zip(xs, rows, bars, strict=True):
            c = r["tools"][tool]
            if "failed" in c:
                ax.text(x, 0.3, "fail", rotation=90, fontsize=6, ha="center")
            elif c.get("wrong"):
                ax.text(x, bar.get_height() + 0.3, "✗", color="red", ha="center")
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(rows))],
        [r["model"] for r in rows],
        rotation=35,
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel("BatchNorm layers left (lower is better; ✗ = wrong result)")
    ax.set_yscale("symlog", linthresh=1)
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="hand-built cases and two models")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    rows = measure(args.quick)
    seconds = time.perf_counter() - start
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    command = "python bench/peers.py" + (" --quick" if args.quick else "")
    (docs / "BENCHMARKS.md").write_text(page(rows, seconds, command))
    chart(rows, docs / "benchmarks.png")
    print(f"wrote docs/BENCHMARKS.md and docs/benchmarks.png in {seconds:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Run every benchmark of bnfold against its peer, side by side, and write bench/results.json.

    python bench/run.py [--runs N]

1. inspect: ``bnfold inspect resnet50.pth`` vs ``python -c "import torch; torch.load(...)"``
   (target: at most 1.5x).
2. fuse end to end: ``bnfold fuse resnet50.pth --arch torchvision:resnet50 --out ...`` vs a
   bare ``torch.onnx.export(dynamo=True)`` of the same weights (target: at most 1.2x).
3. check: ``bnfold check`` on the folded ResNet-50 ONNX vs loading it in onnxruntime and
   running one inference (target: at most 1.3x).
4. the fold step alone on ResNet-50 (target: at most 50 ms): as ``bnfold fuse`` times it in
   each run of 2 (its report's ``timings.fold``), and in isolation beside a bare ``clone()``
   of the same weights, in one process, where every round gets fresh pages.
5. peak memory of fuse against the model's size (target: at most 3x).
6. onnxruntime latency of bnfold's ONNX vs the peers' exports, optimisations on and off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import Run, compare, run_once  # noqa: E402

DATA = HERE / "data"
PY = sys.executable


def bnfold(*args: str) -> list[str]:
    return [PY, "-m", "bnfold", *args]


def fold_step_ms(weights: Path, repeats: int = 9) -> dict[str, float]:
    """The fold pass alone, and beside it one bare pass over the same weights.

    The bare pass is ``clone()`` of the weight and bias of every layer the pass folds
    into: the least any fold that leaves the loaded model untouched must do (read the
    weights once, write new ones).  Both run in turn, in one process, and both free
    their output before the next round, so they see the same allocator state.
    """
    import torch

    from bnfold.fuse import fold_graph
    from bnfold.graph import capture, propagate_shapes
    from bnfold.loading import load_model

    torch.set_num_threads(2)
    model = load_model(weights, arch="torchvision:resnet50").module
    x = torch.randn(1, 3, 224, 224)
    gm = capture(model)
    propagate_shapes(gm, [x])
    outcome = fold_graph(gm, model, shapes_known=True)
    layers = [model.get_submodule(d.into) for d in outcome.decisions if d.into]
    tensors = [t for m in layers for t in (m.weight, m.bias) if t is not None]
    del gm, outcome
    fold_times, pass_times = [], []
    for _ in range(repeats):
        gm = capture(model)
        propagate_shapes(gm, [x])
        start = time.perf_counter()
        fold_graph(gm, model, shapes_known=True)
        fold_times.append((time.perf_counter() - start) * 1000)
        del gm
        start = time.perf_counter()
        copies = [t.detach().clone() for t in tensors]
        pass_times.append((time.perf_counter() - start) * 1000)
        del copies
    return {
        "median_ms": statistics.median(fold_times),
        "min_ms": min(fold_times),
        "max_ms": max(fold_times),
        "bare_pass_median_ms": statistics.median(pass_times),
        "bare_pass_min_ms": min(pass_times),
        "ratio_to_bare_pass": statistics.median(
            f / p for f, p in zip(fold_times, pass_times, strict=True)
        ),
        "folded_mb": sum(t.numel() * t.element_size() for t in tensors) / 2**20,
    }


def ort_latencies(
    paths: dict[str, Path], optimized: bool, rounds: int = 15, per_round: int = 10
) -> dict[str, float]:
    """Median latency (ms) of each model, batch 1, sessions run in turn round by round so
    that drift in the machine's speed hits every model alike."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.intra_op_num_threads = 2
    x = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    sessions = {}
    for name, path in paths.items():
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x}
        for _ in range(3):
            session.run(None, feed)
        sessions[name] = (session, feed)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, (session, feed) in sessions.items():
            for _ in range(per_round):
                start = time.perf_counter()
                session.run(None, feed)
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    subprocess.run([PY, str(HERE / "make_models.py")], check=True)
    weights = DATA / "resnet50.pth"
    out = DATA / "out"
    out.mkdir(exist_ok=True)
    results: dict[str, object] = {"model_mb": weights.stat().st_size / 2**20}

    results["inspect"] = compare(
        bnfold("inspect", str(weights), "--format", "json"),
        [PY, "-c", f"import torch; torch.load({str(weights)!r}, weights_only=True)"],
        runs=args.runs,
    )
    fuse_cmd = bnfold(
        "fuse",
        str(weights),
        "--arch",
        "torchvision:resnet50",
        "--input-shape",
        "1,3,224,224",
        "--out",
        str(out / "bnfold.onnx"),
        "--force",
        "--format",
        "json",
    )
    fuse_runs: list[Run] = []
    results["fuse"] = compare(
        fuse_cmd,
        [PY, str(HERE / "peer_export.py"), str(weights), str(out / "peer.onnx")],
        runs=args.runs,
        keep=fuse_runs,
    )
    in_command = [json.loads(r.stdout)["timings"]["fold"] * 1000 for r in fuse_runs]
    folded = out / "bnfold.onnx"
    ort_once = (
        "import numpy as np, onnxruntime as ort; "
        f"s = ort.InferenceSession({str(folded)!r}, providers=['CPUExecutionProvider']); "
        "s.run(None, {s.get_inputs()[0].name: np.random.default_rng(0)"
        ".standard_normal((1, 3, 224, 224)).astype(np.float32)})"
    )
    results["check"] = compare(
        bnfold("check", str(folded), "--format", "json"), [PY, "-c", ort_once], runs=args.runs
    )
    # the libraries' own memory, without the ~130 MB their teardown adds at exit, which
    # bnfold's CLI skips (bnfold/cli/__init__.py: _leave)
    baseline = run_once(
        [PY, "-c", "import os, torch, torchvision, onnx, onnxruntime, onnxscript; os._exit(0)"]
    )
    tiny = DATA / "tiny.pth"
    tiny_cmd = bnfold(
        "fuse", str(tiny), "--arch", "torchvision:mobilenet_v3_small", "--arch-kwargs",
        '{"width_mult": 0.1}', "--input-shape", "1,3,224,224", "--out", str(out / "tiny.onnx"),
        "--force", "--format", "json",
    )  # fmt: skip
    tiny_peak = min(run_once(tiny_cmd).peak_rss_mb for _ in range(3))
    fuse_peak = results["fuse"]["a_peak_mb"]  # type: ignore[index]
    model_mb = results["model_mb"]
    tiny_mb = tiny.stat().st_size / 2**20
    results["memory"] = {
        "fuse_peak_mb": fuse_peak,
        "imports_only_peak_mb": baseline.peak_rss_mb,
        "tiny_fuse_peak_mb": tiny_peak,
        "tiny_model_mb": tiny_mb,
        "peak_over_model": fuse_peak / model_mb,  # type: ignore[operator]
        "above_imports_over_model": (fuse_peak - baseline.peak_rss_mb) / model_mb,  # type: ignore[operator]
        # the same command on a ~100x smaller model: what the run costs besides the model
        "above_tiny_fuse_over_model": (fuse_peak - tiny_peak) / (model_mb - tiny_mb),  # type: ignore[operator]
    }
    results["fold_step"] = {
        "in_command_median_ms": statistics.median(in_command),
        "in_command_min_ms": min(in_command),
        "in_command_max_ms": max(in_command),
        "isolated": fold_step_ms(weights),
    }
    subprocess.run(
        [PY, str(HERE / "peer_export.py"), str(weights), str(out / "legacy.onnx"), "legacy"],
        check=True,
        capture_output=True,
    )
    paths = {
        "bnfold": out / "bnfold.onnx",
        "dynamo export": out / "peer.onnx",
        "legacy export": out / "legacy.onnx",
    }
    results["ort_latency_ms"] = {
        "optimized": ort_latencies(paths, True),
        "unoptimized": ort_latencies(paths, False),
    }
    (HERE / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

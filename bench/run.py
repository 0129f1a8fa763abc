"""Run every benchmark of bnfold against its peer, side by side, and write bench/results.json.

    python bench/run.py [--runs N]

1. inspect: ``bnfold inspect resnet50.pth`` vs ``python -c "import torch; torch.load(...)"``
   (target: at most 1.5x).
2. fuse end to end: ``bnfold fuse resnet50.pth --arch torchvision:resnet50 --out ...`` vs a
   bare ``torch.onnx.export(dynamo=True)`` of the same weights (target: at most 1.2x).
3. check: ``bnfold check`` on the folded ResNet-50 ONNX vs loading it in onnxruntime and
   running one inference (target: at most 1.3x).
4. the fold step as ``bnfold fuse`` times it (its report's ``timings.fold``; no target).
5. peak memory of fuse against the model's size (target: at most 3x).
6. onnxruntime latency of bnfold's ONNX vs the peers' exports, optimisations on and off,
   with a byte copy of bnfold's file as a control for the run's noise.
"""

from __future__ import annotations

import argparse
import json
import shutil
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


def ort_latencies(
    paths: dict[str, Path], optimized: bool, session_sets: int = 3, rounds: int = 5
) -> dict[str, float]:
    """Median latency (ms) of each model, batch 1.

    Sessions run in turn, round by round, so that drift in the machine's speed hits every
    model alike; and each model gets ``session_sets`` fresh sessions, created in a
    rotating order, so that where one session's buffers happen to land in memory (worth a
    few percent between two sessions of the very same file) does not decide the result.
    """
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
    names = list(paths)
    times: dict[str, list[float]] = {name: [] for name in names}
    for k in range(session_sets):
        order = names[k % len(names) :] + names[: k % len(names)]
        sessions = {}
        for name in order:
            session = ort.InferenceSession(
                str(paths[name]), opts, providers=["CPUExecutionProvider"]
            )
            feed = {session.get_inputs()[0].name: x}
            for _ in range(3):
                session.run(None, feed)
            sessions[name] = (session, feed)
        for _ in range(rounds):
            for name, (session, feed) in sessions.items():
                for _ in range(10):
                    start = time.perf_counter()
                    session.run(None, feed)
                    times[name].append((time.perf_counter() - start) * 1000)
        del sessions
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
    }
    subprocess.run(
        [PY, str(HERE / "peer_export.py"), str(weights), str(out / "legacy.onnx"), "legacy"],
        check=True,
        capture_output=True,
    )
    # a byte copy of bnfold's file, timed like the others: how far two sessions of the
    # very same model drift apart in this run, the noise floor for the comparison
    shutil.copyfile(out / "bnfold.onnx", out / "bnfold-copy.onnx")
    paths = {
        "bnfold": out / "bnfold.onnx",
        "dynamo export": out / "peer.onnx",
        "legacy export": out / "legacy.onnx",
        "bnfold, byte copy (noise control)": out / "bnfold-copy.onnx",
    }
    results["ort_latency_ms"] = {
        "optimized": ort_latencies(paths, True),
        "unoptimized": ort_latencies(paths, False),
    }
    (HERE / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

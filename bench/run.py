"""Run every benchmark of bnfold against its peer, side by side, and write bench/results.json.

    python bench/run.py [--runs N] [--only fuse check ...]

1. import: ``python -c "import bnfold"`` vs ``python -c "pass"`` (issue 16: under 0.3 s).
2. inspect: ``bnfold inspect resnet50.pth`` vs ``python -c "import torch; torch.load(...)"``
   (target: at most 1.5x).
3. fuse end to end: ``bnfold fuse MODEL --arch ... --out ...`` vs a bare
   ``torch.onnx.export(dynamo=True)`` of the same weights (``peer_export.py``), on ResNet-50,
   YOLOv8n and smp Unet (issue 14: at most 1.0x); the fuse report's step timings.
4. check: ``bnfold check`` on the folded ResNet-50 ONNX vs loading it in onnxruntime and
   running one inference (target: at most 1.3x).
5. peak memory of fuse (and of the bare export) against the model's size, above a process
   that only imports the libraries (target: at most 3x).
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
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import Run, compare, run_once  # noqa: E402
from make_models import SHIPPED  # noqa: E402

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


def fuse_command(name: str, weights: Path, out: Path) -> list[str]:
    arch, shape = ("torchvision:resnet50", (1, 3, 224, 224))
    if name in SHIPPED:
        arch, shape = SHIPPED[name]
    return bnfold(
        "fuse", str(weights), "--arch", arch, "--input-shape", ",".join(map(str, shape)),
        "--out", str(out), "--force", "--format", "json",
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--only",
        nargs="*",
        help="benchmarks to run (inspect, fuse, check, memory, import, latency); all by default",
    )
    args = parser.parse_args()
    wanted = set(args.only or ["inspect", "fuse", "check", "memory", "import", "latency"])
    subprocess.run([PY, str(HERE / "make_models.py")], check=True)
    weights = DATA / "resnet50.pth"
    out = DATA / "out"
    out.mkdir(exist_ok=True)
    path = HERE / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    results["model_mb"] = weights.stat().st_size / 2**20

    if "import" in wanted:
        # issue 16: import bnfold stays light (torch and onnx load when a function runs)
        results["import"] = compare(
            [PY, "-c", "import bnfold"], [PY, "-c", "pass"], runs=max(args.runs, 9)
        )
    if "inspect" in wanted:
        results["inspect"] = compare(
            bnfold("inspect", str(weights), "--format", "json"),
            [PY, "-c", f"import torch; torch.load({str(weights)!r}, weights_only=True)"],
            runs=args.runs,
        )
    if "fuse" in wanted:
        # issue 14: fuse end to end against a bare dynamo export of the same model, side by
        # side (A B A B ...), on ResNet-50, YOLOv8n and smp Unet
        for name in ("resnet50", *SHIPPED):
            model_weights = DATA / f"{name}.pth"
            runs: list[Run] = []
            results[f"fuse_{name}"] = compare(
                fuse_command(name, model_weights, out / f"{name}.onnx"),
                [
                    PY,
                    str(HERE / "peer_export.py"),
                    name,
                    str(model_weights),
                    str(out / f"{name}-peer.onnx"),
                ],
                runs=args.runs,
                keep=runs,
            )
            timings = [json.loads(r.stdout)["timings"] for r in runs if r.code == 0]
            results[f"fuse_{name}"]["steps_median_s"] = {
                k: statistics.median(t[k] for t in timings) for k in (timings[0] if timings else {})
            }
    folded = out / "resnet50.onnx"
    if "check" in wanted:
        if not folded.exists():
            run_once(fuse_command("resnet50", weights, folded))
        ort_once = (
            "import numpy as np, onnxruntime as ort; "
            f"s = ort.InferenceSession({str(folded)!r}, providers=['CPUExecutionProvider']); "
            "s.run(None, {s.get_inputs()[0].name: np.random.default_rng(0)"
            ".standard_normal((1, 3, 224, 224)).astype(np.float32)})"
        )
        results["check"] = compare(
            bnfold("check", str(folded), "--format", "json"), [PY, "-c", ort_once], runs=args.runs
        )
    if "memory" in wanted:
        # peak memory of fuse against the model's size above a process that imports the
        # libraries and nothing else (its own teardown skipped, as bnfold's CLI skips it)
        baseline = min(
            run_once(
                [PY, "-c",
                 "import os, torch, torchvision, onnx, onnxruntime, onnxscript; os._exit(0)"]
            ).peak_rss_mb
            for _ in range(3)
        )  # fmt: skip
        peaks = [run_once(fuse_command("resnet50", weights, folded)).peak_rss_mb for _ in range(3)]
        bare = [
            run_once(
                [
                    PY,
                    str(HERE / "peer_export.py"),
                    "resnet50",
                    str(weights),
                    str(out / "resnet50-peer.onnx"),
                ]
            ).peak_rss_mb
            for _ in range(3)
        ]
        model_mb = results["model_mb"]
        results["memory"] = {
            "imports_only_peak_mb": baseline,
            "fuse_peak_mb": min(peaks),
            "bare_export_peak_mb": min(bare),
            "fuse_above_imports_over_model": (min(peaks) - baseline) / model_mb,
            "bare_above_imports_over_model": (min(bare) - baseline) / model_mb,
        }
    if "latency" in wanted:
        if not folded.exists():
            run_once(fuse_command("resnet50", weights, folded))
        peer = out / "resnet50-peer.onnx"
        if not peer.exists():
            run_once([PY, str(HERE / "peer_export.py"), "resnet50", str(weights), str(peer)])
        subprocess.run(
            [PY, str(HERE / "peer_export.py"), "resnet50", str(weights), str(out / "legacy.onnx"),
             "legacy"],
            check=True,
            capture_output=True,
        )  # fmt: skip
        # a byte copy of bnfold's file, timed like the others: how far two sessions of the
        # very same model drift apart in this run, the noise floor for the comparison
        shutil.copyfile(folded, out / "bnfold-copy.onnx")
        paths = {
            "bnfold": folded,
            "dynamo export": peer,
            "legacy export": out / "legacy.onnx",
            "bnfold, byte copy (noise control)": out / "bnfold-copy.onnx",
        }
        results["ort_latency_ms"] = {
            "optimized": ort_latencies(paths, True),
            "unoptimized": ort_latencies(paths, False),
        }
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

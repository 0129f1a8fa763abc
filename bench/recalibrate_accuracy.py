"""Re-estimation on damaged models (issue 17, "Proof and benchmark"): does it give accuracy back?

    python bench/recalibrate_accuracy.py [--aimet-python PATH] [--retrain] [--no-docs]

1. **A model trained here.** ``Net`` (four conv+BN+ReLU blocks, 16-32-64-64 channels,
   global average pooling, a linear classifier) learns a synthetic 10-class task made
   deterministically by :func:`make_images`: 32x32 RGB images of one of five shapes
   (square, disk, ring, plus, triangle) filled with stripes that run either about
   horizontally or about vertically (5 x 2 classes); position, size, colour, stripe
   angle, frequency and phase, background and pixel noise are random. Splits from
   separate seeds: 6000 training images, 512 unlabelled calibration images, 2000 test
   images. Training (Adam, one-cycle schedule, 1 thread) takes about two minutes; the
   weights are cached in ``build/recalibrate_accuracy/`` under a hash of the code and
   settings that make them, so later runs skip it (``--retrain`` forces it).
2. **Damages.** *shift*: the test inputs become ``x * 1.5 + 0.3`` (another camera), the
   model is unchanged, the calibration images are shifted the same way; *prune50*: in
   every conv the 50% of weights smallest in magnitude are set to zero; *int8* (and, to
   show a stronger case, *int4*): every conv weight fake-quantised per output channel,
   symmetric (``round(w / s) * s``, ``s = max|w| / 127`` or ``/ 7``).
3. **Repair.** ``bnfold recalibrate`` (the real command line, in a subprocess, on a
   saved state_dict with ``--arch bench/recalibrate_accuracy.py:Net``, the 512
   calibration images as a ``.npz``, batches of 32), with ``--method cumulative`` (the
   default) and ``--method sequential``; AIMET's
   ``aimet_torch.bn_reestimation.reestimate_bn_stats`` on the same damaged weights and
   the same batches, in the interpreter given by ``--aimet-python`` (default
   ``/tmp/aimet-venv/bin/python``: ``python -m venv --system-site-packages
   /tmp/aimet-venv && /tmp/aimet-venv/bin/pip install aimet-torch``). Each is scored
   on the 2000 test images (shifted for *shift*).
4. **Detection.** ``bnfold inspect --data CALIBRATION --format json`` on the original
   model with clean data (nothing should be flagged), on each damaged model with the
   data it meets, and on bnfold's re-estimated model: the layers with a diagnostic
   whose code contains ``drift``.

Times: the whole ``bnfold recalibrate`` command as it runs by default (process start,
imports, load, the re-estimation pass, the two eval-mode passes that measure drift before
and after, write), and, in process on a loaded model, ``bnfold.data.recalibrate_module`` and AIMET's
function on the same batches, alternated in one process (AIMET's interpreter) so that the
load of a shared machine falls on both alike. Every process runs on one thread.

Writes ``bench/recalibrate_accuracy.json`` and the section "Re-estimation on damaged
models (issue 17)" of ``docs/BENCHMARKS.md``. Exits 1 when a run fails.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = ROOT / "build" / "recalibrate_accuracy"
ARCH = f"{Path(__file__).resolve()}:Net"
DOCS = ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## Re-estimation on damaged models (issue 17)"
# bench/peers.py regenerates the page above this line and keeps everything below it
MARKER = "<!-- written by other benchmarks: bench/peers.py keeps everything below -->"
AIMET_PYTHON = "/tmp/aimet-venv/bin/python"

TRAIN, CALIBRATION, TEST = 6000, 512, 2000
SEEDS = {"train": 1, "calibration": 2, "test": 3}
SHIFT = (1.5, 0.3)  # x * a + b
BATCH = 32
EPOCHS, LR, TRAIN_BATCH = 20, 3e-3, 64
DAMAGES = ("shift", "prune50", "int8", "int4")
REPEATS = 9  # timed runs of each in-process call (median); the command runs CLI_REPEATS times
CLI_REPEATS = 3
PAIRED_REPEATS = 15  # bnfold and AIMET alternated in one process, ratio per pair
ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NO_COLOR": "1",
}


# --------------------------------------------------------------------------- task


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 3, 32, 32)`` float32 images and ``(n,)`` int64 labels; 10 classes.

    Class ``y``: shape ``y % 5`` (square, disk, ring, plus, triangle) filled with stripes
    at 0 (``y < 5``) or 90 degrees, each +-26 degrees; everything else is random.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    shape, texture = y % 5, y // 5
    grid = np.arange(32, dtype=np.float32)
    yy, xx = grid.reshape(1, 32, 1), grid.reshape(1, 1, 32)
    cx = (9 + 14 * rng.random(n)).reshape(n, 1, 1)
    cy = (9 + 14 * rng.random(n)).reshape(n, 1, 1)
    r = (5 + 4 * rng.random(n)).reshape(n, 1, 1)
    dx, dy = xx - cx, yy - cy
    dist = np.sqrt(dx**2 + dy**2)
    ax, ay = np.abs(dx), np.abs(dy)
    masks = np.stack(
        [
            (ax < r) & (ay < r),
            dist < r,
            (dist < r) & (dist > r - 2.5),
            ((ax < r / 3.5) & (ay < r)) | ((ay < r / 3.5) & (ax < r)),
            (ay < r) & (ax < (dy + r) / 2),
        ],
        axis=1,
    )
    mask = masks[np.arange(n), shape][:, None].astype(np.float32)
    angle = (np.where(texture == 0, 0.0, np.pi / 2) + rng.uniform(-0.45, 0.45, n)).reshape(n, 1, 1)
    freq = rng.uniform(0.6, 1.1, n).reshape(n, 1, 1)
    phase = rng.uniform(0, 2 * np.pi, n).reshape(n, 1, 1)
    stripes = 0.5 + 0.5 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    fg = rng.uniform(0.3, 1.0, (n, 3, 1, 1)) * (0.4 + 0.6 * stripes[:, None])
    bg = rng.uniform(0.0, 0.5, (n, 3, 1, 1))
    img = mask * fg + (1 - mask) * bg + 0.15 * rng.standard_normal((n, 3, 32, 32))
    return ((img - 0.4) / 0.35).astype(np.float32), y.astype(np.int64)


def shifted(x: np.ndarray) -> np.ndarray:
    return (x * SHIFT[0] + SHIFT[1]).astype(np.float32)


class Net(nn.Module):
    """Four conv(3x3, no bias)+BN+ReLU blocks, max-pooling after the first three."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(widths):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def train(x: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
    """Adam with a one-cycle schedule; deterministic on one thread."""
    torch.manual_seed(0)
    model = Net()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps = EPOCHS * (len(x) // TRAIN_BATCH)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(len(x) // TRAIN_BATCH):
            idx = order[i * TRAIN_BATCH : (i + 1) * TRAIN_BATCH]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"  epoch {epoch + 1}/{EPOCHS}: loss {total / (i + 1):.3f}", file=sys.stderr)
    return {k: v.detach().clone() for k, v in model.eval().state_dict().items()}


def trained_weights(retrain: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """The trained state_dict, from the cache when the code that makes it is unchanged."""
    recipe = json.dumps([TRAIN, SEEDS["train"], EPOCHS, LR, TRAIN_BATCH, torch.__version__])
    for fn in (make_images, Net, train):
        recipe += inspect.getsource(fn)
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    path = WORK / f"net.{key}.state_dict.pt"
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file() and not retrain:
        info = {**json.loads(meta.read_text()), "weights": str(path.relative_to(ROOT))}
        return torch.load(path, weights_only=True), {**info, "cached": True}
    print(f"training Net on {TRAIN} images (cached in {path})", file=sys.stderr)
    start = time.perf_counter()
    state = train(*make_images(TRAIN, SEEDS["train"]))
    info = {"weights": str(path.relative_to(ROOT)), "train_seconds": time.perf_counter() - start}
    WORK.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    meta.write_text(json.dumps(info))
    return state, {**info, "cached": False}


def load(state: dict[str, torch.Tensor]) -> Net:
    model = Net()
    model.load_state_dict(state)
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat(
            [model(torch.from_numpy(x[i : i + 500])).argmax(1) for i in range(0, len(x), 500)]
        )
    return float((pred.numpy() == y).mean())


# --------------------------------------------------------------------------- damages


def _convs(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 4]


def prune(state: dict[str, torch.Tensor], fraction: float = 0.5) -> dict[str, torch.Tensor]:
    """Per conv, the ``fraction`` of weights smallest in magnitude set to zero."""
    out = {k: v.clone() for k, v in state.items()}
    for k in _convs(state):
        w = out[k].view(-1)
        w[w.abs().argsort()[: int(fraction * w.numel())]] = 0
    return out


def fake_quantize(state: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """Per output channel, symmetric: ``round(w / s) * s`` with ``s = max|w| / (2^(b-1) - 1)``."""
    out = {k: v.clone() for k, v in state.items()}
    levels = 2 ** (bits - 1) - 1
    for k in _convs(state):
        w = out[k]
        s = w.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12) / levels
        out[k] = (w / s).round().clamp(-levels, levels) * s
    return out


def damaged_weights(state: dict[str, torch.Tensor], damage: str) -> dict[str, torch.Tensor]:
    if damage == "shift":
        return state
    if damage == "prune50":
        return prune(state, 0.5)
    return fake_quantize(state, {"int8": 8, "int4": 4}[damage])


# --------------------------------------------------------------------------- runs


class Failures(list):
    def check(self, what: str, proc: subprocess.CompletedProcess) -> bool:
        if proc.returncode != 0:
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            self.append(f"{what}: exit {proc.returncode}: {' | '.join(tail)}")
            print(f"FAILED {what}: exit {proc.returncode}\n{proc.stderr}", file=sys.stderr)
            return False
        return True


def bnfold(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bnfold", *args], capture_output=True, text=True, env=ENV, cwd=ROOT
    )
    return proc, time.perf_counter() - start


def drift_flags(model: Path, data: Path, failures: Failures, what: str) -> dict | None:
    """Layers ``inspect --data`` flags with a code containing "drift", those codes, and the
    largest mean shift and the range of variance ratios over all channels of all layers."""
    proc, _ = bnfold("inspect", str(model), "--arch", ARCH, "--data", str(data), "--format", "json")
    if not failures.check(f"inspect {what}", proc):
        return None
    report = json.loads(proc.stdout)
    flagged: dict[str, list[str]] = {}
    for layer in report["layers"]:
        codes = set(layer.get("warnings", []))
        codes |= {d.get("code", "") for d in layer.get("diagnostics", []) if isinstance(d, dict)}
        drift = sorted(c for c in codes if "drift" in c)
        if drift:
            flagged[layer["name"]] = drift
    # the drift sizes as inspect's JSON names them today (None if they are renamed)
    shifts = [(layer.get("mean_shift") or {}).get("max") for layer in report["layers"]]
    ratios = [
        (layer.get("var_ratio") or {}).get(k) for layer in report["layers"] for k in ("min", "max")
    ]
    shifts, ratios = [v for v in shifts if v is not None], [v for v in ratios if v is not None]
    return {
        "layers": len(report["layers"]),
        "flagged": len(flagged),
        "codes": sorted({c for cs in flagged.values() for c in cs}),
        "by_layer": flagged,
        "max_mean_shift": max(shifts, default=None),
        "var_ratio_range": [min(ratios), max(ratios)] if ratios else None,
        "thresholds": {k: v for k, v in report["thresholds"].items() if "drift" in k},
    }


def batches(x: np.ndarray) -> list[torch.Tensor]:
    """The calibration batches every method gets: near-equal batches of about ``BATCH``."""
    return [torch.from_numpy(b) for b in np.array_split(x, len(x) // BATCH)]


def in_process_bnfold(state: dict, cal: np.ndarray, method: str) -> float:
    """Median seconds of ``bnfold.data.recalibrate_module`` on a loaded model."""
    from bnfold.data import recalibrate_module

    times = []
    for _ in range(REPEATS):
        model, data = load(state), [[b] for b in batches(cal)]
        start = time.perf_counter()
        recalibrate_module(model, data, method=method)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_damage(damage: str, state: dict, data: dict, failures: Failures) -> dict:
    work = WORK / damage
    work.mkdir(parents=True, exist_ok=True)
    bad = damaged_weights(state, damage)
    cal_x = shifted(data["cal_x"]) if damage == "shift" else data["cal_x"]
    test_x = shifted(data["test_x"]) if damage == "shift" else data["test_x"]
    test_y = data["test_y"]
    cal = work / "calibration.npz"
    np.savez(cal, input=cal_x)
    model_path = work / "damaged.state_dict.pt"
    torch.save(bad, model_path)
    row: dict = {
        "damage": damage,
        "original": accuracy(load(state), data["test_x"], test_y),  # before any damage
        "damaged": accuracy(load(bad), test_x, test_y),
        "flags_damaged": drift_flags(model_path, cal, failures, f"{damage} damaged"),
    }
    for method in ("cumulative", "sequential"):
        out = work / f"recalibrated.{method}.state_dict.pt"
        args = ["recalibrate", str(model_path), "--arch", ARCH, "--data", str(cal),
                "--out", str(out), "--method", method, "--batch-size", str(BATCH), "--force",
                "--format", "json"]  # fmt: skip
        runs = [bnfold(*args) for _ in range(CLI_REPEATS)]
        if not all(failures.check(f"recalibrate {damage} --method {method}", p) for p, _ in runs):
            continue
        seconds = statistics.median(t for _, t in runs)
        fixed = torch.load(out, weights_only=True)
        unchanged = all(
            torch.equal(fixed[k], bad[k])
            for k in bad
            if "running_" not in k and "num_batches" not in k
        )
        if not unchanged:
            failures.append(
                f"recalibrate {damage} --method {method}: changed more than BN statistics"
            )
        row[f"bnfold_{method}"] = {
            "accuracy": accuracy(load(fixed), test_x, test_y),
            "cli_seconds": seconds,
            "in_process_seconds": in_process_bnfold(bad, cal_x, method),
            "only_statistics_changed": unchanged,
        }
        if method == "cumulative":
            row["flags_after_bnfold"] = drift_flags(out, cal, failures, f"{damage} recalibrated")
    return row


# --------------------------------------------------------------------------- AIMET


def aimet_worker(job: Path) -> None:
    """In AIMET's interpreter: reestimate_bn_stats on each damaged model; JSON to stdout.

    Timed in pairs with bnfold's ``recalibrate_module`` on the same batches, alternated in
    this one process, so that the machine's changing load falls on both alike.
    """
    from aimet_torch.bn_reestimation import reestimate_bn_stats

    from bnfold.data import recalibrate_module

    def timed(fn, state: dict, data: list) -> tuple[float, nn.Module]:
        model = load(state)
        start = time.perf_counter()
        fn(model, data)
        return time.perf_counter() - start, model

    def aimet(model: nn.Module, data: list) -> None:
        # AIMET reads only len() of its "dataloader" and iterates it: the same batches
        reestimate_bn_stats(model, data, num_batches=len(data))

    def bnfold_cumulative(model: nn.Module, data: list) -> None:
        recalibrate_module(model, [[b] for b in data], method="cumulative")

    torch.set_num_threads(1)
    rows = []
    for item in json.loads(job.read_text()):
        state = torch.load(item["model"], weights_only=True)
        cal = batches(np.load(item["calibration"])["input"])
        test = np.load(item["test"])
        pairs = []
        for _ in range(PAIRED_REPEATS):
            b, ours = timed(bnfold_cumulative, state, cal)
            a, model = timed(aimet, state, cal)
            pairs.append((b, a))
        ratios = [b / a for b, a in pairs]
        # both average the per-batch means and unbiased variances: how far apart are the
        # statistics (the mean in running standard deviations, the variance relative)?
        mean_gap = var_gap = 0.0
        for m1, m2 in zip(ours.modules(), model.modules(), strict=True):
            if isinstance(m1, nn.modules.batchnorm._BatchNorm):
                scale = m2.running_var + m2.eps
                gap = (m1.running_mean - m2.running_mean).abs() / scale.sqrt()
                mean_gap = max(mean_gap, float(gap.max()))
                gap = (m1.running_var - m2.running_var).abs() / scale
                var_gap = max(var_gap, float(gap.max()))
        rows.append(
            {
                "damage": item["damage"],
                "accuracy": accuracy(model, test["x"], test["y"]),
                "in_process_seconds": statistics.median(a for _, a in pairs),
                "paired_bnfold_cumulative_seconds": statistics.median(b for b, _ in pairs),
                "stats_gap_to_bnfold_cumulative": {"mean": mean_gap, "var": var_gap},
                "ratio_bnfold_to_aimet": [
                    statistics.median(ratios),
                    min(ratios),
                    max(ratios),
                ],
            }
        )
    print(json.dumps(rows))


def run_aimet(python: str, data: dict, failures: Failures) -> tuple[dict, str]:
    """AIMET's rows by damage, and how it ran (or exactly why it did not)."""
    how = (
        "python -m venv --system-site-packages /tmp/aimet-venv && "
        "/tmp/aimet-venv/bin/pip install aimet-torch"
    )
    if not Path(python).is_file():
        return {}, f"not run: no interpreter at {python} (make one with `{how}`)"
    code = (
        "import importlib.metadata as m, aimet_torch.bn_reestimation, torch; "
        "print(m.version('aimet-torch'), torch.__version__)"
    )
    probe = subprocess.run([python, "-c", code], capture_output=True, text=True, env=ENV)
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["no message"])[-1]
        return {}, f"not run: aimet_torch does not import in {python}: {why}"
    version, torch_there = probe.stdout.split()
    jobs = []
    for damage in DAMAGES:
        work = WORK / damage
        test = work / "test.npz"
        test_x = shifted(data["test_x"]) if damage == "shift" else data["test_x"]
        np.savez(test, x=test_x, y=data["test_y"])
        jobs.append(
            {
                "damage": damage,
                "model": str(work / "damaged.state_dict.pt"),
                "calibration": str(work / "calibration.npz"),
                "test": str(test),
            }
        )
    job = WORK / "aimet_jobs.json"
    job.write_text(json.dumps(jobs))
    proc = subprocess.run(
        [python, str(Path(__file__).resolve()), "--aimet-worker", str(job)],
        capture_output=True, text=True, env=ENV, cwd=ROOT,
    )  # fmt: skip
    if not failures.check("AIMET reestimate_bn_stats", proc):
        return {}, f"aimet-torch {version} in {python} failed: see the failures"
    how = f"aimet-torch {version} from PyPI in {python} (torch {torch_there})"
    return {r["damage"]: r for r in json.loads(proc.stdout)}, how


# --------------------------------------------------------------------------- report


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _flags(f: dict | None) -> str:
    return "failed" if f is None else f"{f['flagged']}/{f['layers']}"


def _sec(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s" if v >= 1 else f"{1000 * v:.0f} ms"


def _shift(f: dict | None) -> str:
    return "-" if f is None or f["max_mean_shift"] is None else f"{f['max_mean_shift']:.2f}"


def _ratios(f: dict | None) -> str:
    return (
        "-"
        if f is None or not f["var_ratio_range"]
        else "{:.2f}–{:.2f}".format(*f["var_ratio_range"])
    )


def markdown(results: dict) -> str:
    train = results["training"]
    trained = f"trained in {train['train_seconds']:.0f} s" + (
        " (weights from the cache this time)" if train["cached"] else ""
    )
    codes = sorted(
        {c for r in results["rows"] for k in ("flags_damaged",) if r.get(k) for c in r[k]["codes"]}
    )
    lines = [
        MARKER,
        "",
        SECTION,
        "",
        "Generated by `python bench/recalibrate_accuracy.py` (results in "
        "`bench/recalibrate_accuracy.json`); this run: "
        f"{results['started']}, {results['machine']}, {trained}.",
        "",
        "**Method.** A small conv net (four conv+BN+ReLU blocks, 16-32-64-64 channels) is "
        "trained in the script on a synthetic 10-class task it generates deterministically "
        "(32x32 images: five shapes x two stripe orientations, random position, size, "
        f"colour, background and noise; {TRAIN} training, {CALIBRATION} unlabelled "
        f"calibration and {TEST} test images from separate seeds); its weights are cached "
        "in `build/recalibrate_accuracy/` under a hash of the code that makes them, so a "
        f"rerun skips training (this run took {results['run_seconds'] / 60:.1f} min). "
        "Each damage is "
        f"applied to the trained weights: *shift* changes the inputs to `x * {SHIFT[0]:g} + "
        f"{SHIFT[1]:g}` at test time (a new camera; the calibration images are shifted "
        "too), *prune50* zeroes the 50% smallest-magnitude weights of every conv, *int8* "
        "fake-quantises every conv weight per output channel, symmetric, and *int4* does "
        "the same with 4 bits (not in the issue: a quantisation that does cost accuracy "
        "here). The "
        "damaged state_dict is repaired by the real `bnfold recalibrate` command (`--arch "
        "bench/recalibrate_accuracy.py:Net`, the calibration images as a `.npz`, batches "
        f"of {BATCH}) and by AIMET's `reestimate_bn_stats` on the same weights and batches; "
        "accuracy is measured on the test images (shifted for *shift*). `bnfold inspect "
        "--data` runs on the calibration images: *flagged* counts the BN layers with a "
        "diagnostic whose code contains `drift`"
        + (f" (this run: {', '.join(f'`{c}`' for c in codes)})" if codes else "")
        + ". Times: the whole `bnfold recalibrate` command in a fresh process (as it runs "
        "by default: the re-estimation pass and the two eval-mode passes that measure drift "
        "before and after), and in process (model loaded) `bnfold.data.recalibrate_module` "
        "and AIMET's function; "
        f"one thread each. AIMET: {results['aimet']}; the script looks for it in a "
        "virtualenv made with `python -m venv --system-site-packages /tmp/aimet-venv && "
        "/tmp/aimet-venv/bin/pip install aimet-torch`, so that AIMET and bnfold run the "
        "same torch (`--aimet-python` names another interpreter).",
        "",
        "| damage | original | damaged | bnfold `cumulative` | bnfold `sequential` | AIMET |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    aimet = results["aimet_rows"]
    for r in results["rows"]:
        d = r["damage"]
        lines.append(
            f"| {d} | {_pct(r['original'])} | {_pct(r['damaged'])} | "
            f"{_pct(r.get('bnfold_cumulative', {}).get('accuracy'))} | "
            f"{_pct(r.get('bnfold_sequential', {}).get('accuracy'))} | "
            f"{_pct(aimet.get(d, {}).get('accuracy'))} |"
        )
    clean = results["flags_original"]
    lines += [
        "",
        f"Held-out accuracy (%, {TEST} test images; *original* is the trained model on clean "
        "test images).",
        "",
        "| model, data | BN layers flagged | largest mean shift | variance ratios | "
        "flagged after bnfold `cumulative` |",
        "|---|---:|---:|---|---:|",
        f"| original, clean data | {_flags(clean)} | {_shift(clean)} | {_ratios(clean)} | |",
    ]
    for r in results["rows"]:
        f = r["flags_damaged"]
        lines.append(
            f"| {r['damage']} | {_flags(f)} | {_shift(f)} | {_ratios(f)} | "
            f"{_flags(r.get('flags_after_bnfold'))} |"
        )
    th = (clean or {}).get("thresholds", {})
    lines += [
        "",
        "`bnfold inspect --data` on the calibration images (shifted for *shift*): BN layers "
        "with a drift diagnostic / BN layers; over all channels of all layers, the largest "
        "`|data mean - running_mean| / sqrt(running_var + eps)` and the range of "
        "`(data var + eps) / (running_var + eps)` (thresholds: "
        + ", ".join(f"`{k}={v:g}`" for k, v in th.items())
        + ").",
        "",
        "| damage | `bnfold recalibrate` command | bnfold `sequential` | bnfold `cumulative` | "
        "AIMET | bnfold `cumulative` / AIMET (median of pairs, min–max) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in results["rows"]:
        b, q = r.get("bnfold_cumulative", {}), r.get("bnfold_sequential", {})
        a = aimet.get(r["damage"], {})
        cumulative = a.get("paired_bnfold_cumulative_seconds", b.get("in_process_seconds"))
        ratio = "{:.2f}x ({:.2f}–{:.2f})".format(*a["ratio_bnfold_to_aimet"]) if a else "-"
        lines.append(
            f"| {r['damage']} | {_sec(b.get('cli_seconds'))} | "
            f"{_sec(q.get('in_process_seconds'))} | {_sec(cumulative)} | "
            f"{_sec(a.get('in_process_seconds'))} | {ratio} |"
        )
    lines += [
        "",
        f"Time to re-estimate on {CALIBRATION} images in batches of {BATCH}: the whole "
        f"command (median of {CLI_REPEATS} runs: process start, imports, load, the three "
        "passes, write), "
        f"then the library calls alone on a loaded model: `sequential` median of {REPEATS} "
        f"runs; bnfold `cumulative` and AIMET alternated in one process, {PAIRED_REPEATS} pairs "
        f"(AIMET's interpreter, bnfold imported from this tree). Load average of the "
        f"2-core machine when the run started: {results['load_average']}.",
        "",
    ]
    for r in results["rows"]:
        lines.append(reading(r, aimet.get(r["damage"], {}), th))
    lines += ["", comparison(results)]
    p = results["rows"][0]["original"]
    lines += [
        "",
        f"One standard error of an accuracy near {100 * p:.0f}% over {TEST} images is "
        f"{100 * (p * (1 - p) / TEST) ** 0.5:.1f} points: differences below a point are noise.",
    ]
    if results["failures"]:
        lines += ["", "Failed in this run: " + "; ".join(results["failures"])]
    return "\n".join(lines).rstrip() + "\n"


def reading(r: dict, aimet: dict, thresholds: dict) -> str:
    """One line per damage: the accuracy path, and what ``inspect --data`` saw."""
    o, d = round(100 * r["original"], 1), round(100 * r["damaged"], 1)
    text = f"- *{r['damage']}*: {o:.1f} → {d:.1f} damaged ({d - o:+.1f})"
    if "bnfold_cumulative" in r:
        b = round(100 * r["bnfold_cumulative"]["accuracy"], 1)
        text += f" → {b:.1f} after `bnfold recalibrate` ({b - o:+.1f} from the original"
        text += f"; AIMET {100 * aimet['accuracy']:.1f})" if aimet else ")"
    f = r["flags_damaged"]
    if f is not None:
        text += f"; `inspect --data` flags {f['flagged']} of {f['layers']} BN layers"
        if not f["flagged"] and "drift_mean" in thresholds and f["max_mean_shift"] is not None:
            text += (
                f" (largest mean shift {f['max_mean_shift']:.2f}, under "
                f"`drift_mean={thresholds['drift_mean']:g}`)"
            )
    return text + "."


def comparison(results: dict) -> str:
    """bnfold's two methods against AIMET: accuracy gap, statistics gap, time ratio."""
    gaps, ratios, same = [], [], []
    for r in results["rows"]:
        a = results["aimet_rows"].get(r["damage"])
        methods = [r[k]["accuracy"] for k in ("bnfold_cumulative", "bnfold_sequential") if k in r]
        if a:
            methods.append(a["accuracy"])
            ratios.append(a["ratio_bnfold_to_aimet"][0])
            if "stats_gap_to_bnfold_cumulative" in a:
                same.append(a["stats_gap_to_bnfold_cumulative"])
        if len(methods) > 1:
            gaps.append(100 * (max(methods) - min(methods)))
    text = (
        "bnfold's `cumulative` method and AIMET compute the same statistics (the average "
        "of the per-batch means and of the unbiased per-batch variances, what PyTorch's "
        "`momentum=None` gives)"
    )
    if same:
        text += (
            " and, on the same batches, they differ by at most "
            f"{max(g['mean'] for g in same):.1g} running standard deviations in a mean and "
            f"{max(g['var'] for g in same):.1g} of a variance (float rounding)"
        )
    text += (
        "; `sequential` measures what each BN receives in eval mode, layer after layer, "
        "pooled over all the data."
    )
    if gaps:
        text += f" The three accuracies are at most {max(gaps):.1f} points apart on any damage."
    if ratios:
        text += (
            f" In process, bnfold's `cumulative` call takes {min(ratios):.2f}x to "
            f"{max(ratios):.2f}x AIMET's time on the same batches (median ratio of "
            f"alternated pairs, per damage)."
        )
    return text


def write_docs(text: str) -> None:
    """Replace this section of docs/BENCHMARKS.md (or append it), after the marker."""
    page = DOCS.read_text()
    head = page.split(MARKER)[0].rstrip() + "\n\n"
    tail = page.split(MARKER, 1)[1] if MARKER in page else ""
    others = []  # sections written by other benchmarks below the marker stay
    for part in tail.split("\n## ")[1:]:
        if not ("## " + part).startswith(SECTION):
            others.append("## " + part.rstrip() + "\n")
    DOCS.write_text(head + text + "".join("\n" + o for o in others))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aimet-python", default=AIMET_PYTHON)
    parser.add_argument("--retrain", action="store_true", help="ignore the cached weights")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/BENCHMARKS.md")
    parser.add_argument("--aimet-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.aimet_worker:
        aimet_worker(args.aimet_worker)
        return
    torch.use_deterministic_algorithms(True)
    begin = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_average = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    state, training = trained_weights(args.retrain)
    cal_x, _ = make_images(CALIBRATION, SEEDS["calibration"])
    test_x, test_y = make_images(TEST, SEEDS["test"])
    data = {"cal_x": cal_x, "test_x": test_x, "test_y": test_y}
    failures = Failures()

    WORK.mkdir(parents=True, exist_ok=True)
    original = WORK / "original.state_dict.pt"
    torch.save(state, original)
    np.savez(WORK / "calibration.npz", input=cal_x)
    flags_original = drift_flags(original, WORK / "calibration.npz", failures, "original")
    rows = []
    for damage in DAMAGES:
        print(f"{damage} ...", file=sys.stderr)
        rows.append(run_damage(damage, state, data, failures))
    aimet_rows, aimet = run_aimet(args.aimet_python, data, failures)
    print(f"AIMET: {aimet}", file=sys.stderr)

    results = {
        "started": started,
        "machine": f"{platform.machine()}, 1 thread, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        "training": training,
        "load_average": load_average,
        "aimet": aimet,
        "flags_original": flags_original,
        "rows": rows,
        "aimet_rows": aimet_rows,
        "failures": list(failures),
        "run_seconds": time.perf_counter() - begin,
    }
    (HERE / "recalibrate_accuracy.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    if not args.no_docs:
        write_docs(text)
    print(text)
    if failures:
        print("failures:\n  " + "\n  ".join(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

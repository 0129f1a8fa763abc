"""Benchmarks of ``--data`` (issue 17): what it costs, and how well re-estimation works.

    python bench/recalibrate.py [--runs N] [--threads N] [--aimet-python PATH]
                                [--skip-cost] [--skip-quality] [--with-drift]

1. **Cost.** ``bnfold inspect resnet50.pth --arch torchvision:resnet50 --data IMAGES``
   (512 JPEG images, 224x224, ImageNet mean/std) against ``bench/bare_forward.py``, a bare
   PyTorch loop of the same forward passes on the same images decoded the same way
   (target: at most 1.3x), and ``bnfold recalibrate --method cumulative --no-drift`` (one
   pass, BN layers in training mode) against the same loop; ``--with-drift`` also times
   the command as it runs by default, with the two eval-mode passes that measure drift
   before and after (three passes in all). Whole commands, side by side
   (``harness.compare``: A B A B ..., ratios per pair).
2. **Quality.** The shipped sample models (really trained by ``sample_models/train.py``)
   with their statistics made wrong in two common ways, re-estimated on 512 unlabelled
   samples from train.py's own generators, then scored on 2000 fresh labelled samples:

   - *reset*: every running_mean 0, running_var 1 (what re-initialised buffers or a
     weight average leave behind; ``stale_stats`` fires);
   - *shifted*: the inputs change (contrast and offset, as another camera or
     preprocessing would), the statistics are re-estimated on unlabelled shifted data
     (AdaBN), and the model is scored on shifted data.

   Methods: bnfold ``cumulative`` and ``sequential``, ``torch.optim.swa_utils.update_bn``,
   and AIMET's ``aimet_torch.bn_reestimation.reestimate_bn_stats`` (in this interpreter
   when it imports, else in ``--aimet-python``, e.g. a virtualenv made with
   ``--system-site-packages`` and ``pip install aimet-torch``).

``--threads`` (default 1) sets torch's threads here and ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` for every command timed. Writes ``bench/recalibrate.json`` after each
part (quality, then each timed command, so an interrupted run keeps what finished) and
prints the markdown for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "sample_models"))

DATA = HERE / "data"
PY = sys.executable
CALIBRATION, TEST = 512, 2000
SHIFTS = {"convnet": (0.6, 0.8), "mlp": (1.6, 0.5), "tokennet": (1.5, 0.4)}  # x * a + b


# --------------------------------------------------------------------------- quality


def _task(name: str):
    import torch
    from archs import ARCHS
    from train import make_shapes, make_tabular, make_tokens

    maker = {"convnet": make_shapes, "mlp": make_tabular, "tokennet": make_tokens}[name]
    calibration, _ = maker(CALIBRATION, torch.Generator().manual_seed(1000))
    test_x, test_y = maker(TEST, torch.Generator().manual_seed(2000))
    model = ARCHS[name]()
    model.load_state_dict(
        torch.load(ROOT / f"sample_models/{name}.state_dict.pt", weights_only=True)
    )
    return model.eval(), calibration, test_x, test_y


def _broken(model, scenario: str):
    import torch

    model = copy.deepcopy(model)
    if scenario == "reset":
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
    return model


def _shift(name: str, x, scenario: str):
    if scenario != "shifted":
        return x
    a, b = SHIFTS[name]
    return x * a + b


def _accuracy(model, x, y) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum())
            for i in range(0, len(x), 500)
        )
    return correct / len(x)


def _batches(x, size: int):
    from bnfold.data import _split

    return [[x[a:b]] for a, b in _split(len(x), size)]


def _methods(include_aimet: bool):
    import torch

    def bnfold_cumulative(model, batches):
        from bnfold.data import recalibrate_module

        recalibrate_module(model, batches, method="cumulative")

    def bnfold_sequential(model, batches):
        from bnfold.data import recalibrate_module

        recalibrate_module(model, batches, method="sequential")

    def update_bn(model, batches):
        torch.optim.swa_utils.update_bn([b[0] for b in batches], model)
        model.eval()

    def aimet(model, batches):
        from aimet_torch.bn_reestimation import reestimate_bn_stats

        reestimate_bn_stats(model, [b[0] for b in batches], num_batches=len(batches))

    methods = {}
    if not include_aimet:
        methods.update(
            {
                "bnfold cumulative": bnfold_cumulative,
                "bnfold sequential": bnfold_sequential,
                "torch update_bn": update_bn,
            }
        )
    else:
        methods["AIMET reestimate_bn_stats"] = aimet
    return methods


def quality(include_aimet: bool = False, batch_sizes: tuple[int, ...] = (32, 8)) -> list[dict]:
    """Accuracy rows: one per model, scenario, batch size and method."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = []
    for name in ("convnet", "mlp", "tokennet"):
        model, calibration, test_x, test_y = _task(name)
        for scenario in ("reset", "shifted"):
            cal = _shift(name, calibration, scenario)
            tx = _shift(name, test_x, scenario)
            base = {"model": name, "scenario": scenario}
            if not include_aimet:
                rows.append(
                    {
                        **base,
                        "method": "trained statistics",
                        "accuracy": _accuracy(model, tx, test_y),
                    }
                )
                if scenario == "reset":
                    rows.append(
                        {
                            **base,
                            "method": "reset statistics",
                            "accuracy": _accuracy(_broken(model, scenario), tx, test_y),
                        }
                    )
            for size in batch_sizes:
                for label, method in _methods(include_aimet).items():
                    work = _broken(model, scenario)
                    start = time.perf_counter()
                    method(work, _batches(cal, size))
                    seconds = time.perf_counter() - start
                    rows.append({**base, "method": label, "batch_size": size, "seconds": seconds,
                                 "accuracy": _accuracy(work, tx, test_y)})  # fmt: skip
    return rows


def aimet_rows(aimet_python: str | None) -> tuple[list[dict], str]:
    """AIMET's rows, here or in another interpreter; (rows, how it ran or why not)."""
    try:
        import aimet_torch  # noqa: F401

        return quality(include_aimet=True), f"aimet-torch in {PY}"
    except ImportError as e:
        here = f"aimet_torch does not import here ({e})"
    if not aimet_python:
        return [], here
    proc = subprocess.run(
        [aimet_python, str(Path(__file__).resolve()), "--aimet-worker"],
        capture_output=True,
        text=True,
        env={
            "PYTHONPATH": str(ROOT),
            "PATH": "/usr/bin:/bin",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        },
    )
    if proc.returncode != 0:
        return [], f"{here}; {aimet_python} failed: {proc.stderr.strip().splitlines()[-1:]}"
    version = subprocess.run(
        [aimet_python, "-c", "import importlib.metadata as m; print(m.version('aimet-torch'))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return json.loads(proc.stdout), f"aimet-torch {version} in {aimet_python}"


# --------------------------------------------------------------------------- cost


def make_images(folder: Path, count: int = 512, size: int = 224) -> Path:
    """``count`` JPEGs: train.py's shapes upsampled to ``size`` with fresh noise."""
    import numpy as np
    import torch
    from PIL import Image
    from train import make_shapes

    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    x, _ = make_shapes(count, torch.Generator().manual_seed(7))
    rng = np.random.default_rng(7)
    for i, img in enumerate(x):
        pixels = ((img.numpy() * 0.3 + 0.4).clip(0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
        big = np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))
        noisy = (big + rng.normal(0, 8, big.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i:04d}.jpg", quality=90)
    return folder


COMMANDS = ("inspect", "recalibrate", "recalibrate_with_drift")


def cost(runs: int, keys: list[str], save: Callable[[dict], None], out: dict) -> dict:
    """The timed commands named by ``keys`` (of ``COMMANDS``), into ``out``; ``save(out)``
    after each one."""
    from harness import compare

    subprocess.run([PY, str(HERE / "make_models.py")], check=True, capture_output=True)
    weights = DATA / "resnet50.pth"
    images = make_images(DATA / "images224")
    norm = ["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--batch-size", "32"]
    bare = [PY, str(HERE / "bare_forward.py"), str(weights), str(images), "32"]
    bnfold = [PY, "-m", "bnfold"]
    if "inspect" in keys:
        out["inspect"] = compare(
            [*bnfold, "inspect", str(weights), "--arch", "torchvision:resnet50", "--data",
             str(images), *norm, "--format", "json"],
            bare,
            runs=runs,
        )  # fmt: skip
        out["inspect"]["started"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        save(out)
    variants = [("recalibrate", ["--no-drift"]), ("recalibrate_with_drift", [])]
    for key, drift in variants:
        if key not in keys:
            continue
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        out[key] = compare(
            [*bnfold, "recalibrate", str(weights), "--arch", "torchvision:resnet50", "--data",
             str(images), *norm, "--out", str(DATA / "resnet50.recalibrated.pth"), "--force",
             "--method", "cumulative", *drift, "--format", "json"],
            bare,
            runs=runs,
        )  # fmt: skip
        out[key]["args"] = ["--method", "cumulative", *drift]
        out[key]["started"] = started
        save(out)
    return out


# --------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    lines = ["## Real inputs: `inspect --data` and `recalibrate` (issue 17)", ""]
    lines.append(
        f"`{results.get('command', 'python bench/recalibrate.py')}` "
        f"({results.get('started', '')}, load average {results.get('load_average', '?')}) "
        f"on {results['machine']}; "
        f"{results['aimet']}."
    )
    if "cost" in results:
        c = results["cost"]
        lines += [
            "",
            "ResNet-50 (random weights, real BN statistics), 512 JPEG images 224x224 decoded "
            "with Pillow and normalised with the ImageNet mean/std, batches of 32. The peer is "
            "`bench/bare_forward.py`: the same model, images and forward passes in a bare "
            "PyTorch loop. Whole commands, alternated, ratio per pair:",
            "",
            "| command | bnfold | bare loop | ratio (median, min–max) | target |",
            "|---|---:|---:|---|---|",
        ]
        for key, label, target in (
            ("inspect", "`bnfold inspect --data`", "≤ 1.3x"),
            ("recalibrate", "`bnfold recalibrate --method cumulative --no-drift`", ""),
            ("recalibrate_with_drift", "`bnfold recalibrate --method cumulative`", ""),
        ):
            if key not in c:
                if key != "recalibrate_with_drift":
                    lines.append(f"| {label} | not run | | | |")
                continue
            r = c[key]
            ok = " ✅" if target and r["ratio_median"] <= 1.3 else (" ❌" if target else "")
            if r.get("failures"):
                ok += f" ({r['failures']} failed runs)"
            lines.append(
                f"| {label} | {r['a_wall_median']:.1f} s | {r['b_wall_median']:.1f} s | "
                f"**{r['ratio_median']:.2f}x** ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) | "
                f"{target}{ok} |"
            )
        for key, how in results.get("rerun", {}).items():
            lines.append(
                f"\n`{key}` rerun alone ({c.get(key, {}).get('started', '?')}, load average "
                f"{how['load_average']}): `{how['command']}`."
            )
    if "quality" in results:
        rows = results["quality"]
        methods = [
            "bnfold cumulative",
            "bnfold sequential",
            "torch update_bn",
            "AIMET reestimate_bn_stats",
        ]
        methods = [m for m in methods if any(r["method"] == m for r in rows)]
        lines += [
            "",
            f"Held-out accuracy ({TEST} fresh samples) of the shipped sample models after "
            f"re-estimating their statistics on {CALIBRATION} unlabelled samples. *reset*: "
            "running statistics reset to 0/1; *shifted*: inputs `x * a + b` "
            f"({', '.join(f'{k} {a:g}, {b:g}' for k, (a, b) in SHIFTS.items())}), statistics "
            "re-estimated on shifted data, scored on shifted data.",
            "",
            "| model | scenario | batch | trained stats | before | " + " | ".join(methods) + " |",
            "|---|---|---:|---:|---:|" + "---:|" * len(methods),
        ]
        table = {}
        for r in rows:
            table[(r["model"], r["scenario"], r["method"], r.get("batch_size"))] = (
                f"{100 * r['accuracy']:.1f}"
            )
        sized = {(r["model"], r["scenario"], r["batch_size"]) for r in rows if "batch_size" in r}
        for model, scenario, size in sorted(sized, key=lambda k: (k[0], k[1], -k[2])):
            trained = table.get((model, scenario, "trained statistics", None), "-")
            before = (
                table.get((model, scenario, "reset statistics", None), "-")
                if scenario == "reset"
                else trained
            )
            cells = [table.get((model, scenario, m, size), "-") for m in methods]
            lines.append(
                f"| {model} | {scenario} | {size} | {trained} | {before} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and timed")
    parser.add_argument(
        "--with-drift",
        action="store_true",
        help="also time recalibrate as it runs by default (with the two drift passes)",
    )
    parser.add_argument("--aimet-python", default=None)
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument(
        "--only",
        action="append",
        choices=COMMANDS,
        help="rerun only this timed command (repeatable); the rest of bench/recalibrate.json "
        "(quality, other commands) is kept from the last run",
    )
    parser.add_argument("--aimet-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.aimet_worker:
        print(json.dumps(quality(include_aimet=True)))
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # inherited by every command timed
    import torch

    torch.set_num_threads(args.threads)
    results: dict = {
        "command": " ".join(["python bench/recalibrate.py", *sys.argv[1:]]),
        "runs": args.runs,
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": " / ".join(f"{v:.1f}" for v in os.getloadavg()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), "
        f"torch {torch.__version__}",
    }

    def save(cost: dict | None = None) -> None:
        if cost is not None:
            results["cost"] = cost
        (HERE / "recalibrate.json").write_text(json.dumps(results, indent=2) + "\n")

    if args.only:
        previous = json.loads((HERE / "recalibrate.json").read_text())
        results = {**previous, "rerun": {**previous.get("rerun", {})}}
        for key in args.only:  # the timed entry gets its own "started"
            results["rerun"][key] = {
                "command": " ".join(["python bench/recalibrate.py", *sys.argv[1:]]),
                "load_average": " / ".join(f"{v:.1f}" for v in os.getloadavg()),
            }
        cost(args.runs, args.only, save, results.setdefault("cost", {}))
        print(markdown(results))
        return
    if not args.skip_quality:
        rows = quality()
        extra, how = aimet_rows(args.aimet_python)
        results["quality"] = rows + extra
        results["aimet"] = how
    else:
        results["aimet"] = "AIMET not run"
    save()
    if not args.skip_cost:
        keys = list(COMMANDS) if args.with_drift else list(COMMANDS[:2])
        cost(args.runs, keys, save, {})
    print(markdown(results))


if __name__ == "__main__":
    main()

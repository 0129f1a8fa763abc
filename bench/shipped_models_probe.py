"""What torch and bnfold do today with the architectures people ship: issue 14's failure catalog.

    python bench/shipped_models_probe.py                 # every model (about an hour here)
    python bench/shipped_models_probe.py --only yolov8n  # models whose name contains a word
    python bench/shipped_models_probe.py --no-fuse       # torch and the peers only
    python bench/shipped_models_probe.py --render        # the tables again, from the JSON

The models are those of tests/shipped.py (random weights, statistics from two train-mode
passes, nothing downloaded). Each one runs in its own process, which records:

- the build time, the output's structure (tensor / tuple / dict / dataclass, nested) and
  its number of tensors;
- ``torch.fx.symbolic_trace``: works, or the first line of its error;
- ``torch.export.export`` non-strict and strict, with a dynamic batch ``Dim`` on an
  example of batch 1 (what a user gives) and of batch 2, and with a static batch 1;
- ``torch.onnx.export(model, (x,), dynamo=True)`` as is (static batch 1): works, time,
  BatchNormalization nodes left, its error against a float64 run; the same with a dynamic
  batch (example batch 2), checked at batch 3;
- the peers' BatchNorm counts: the legacy exporter, onnxsim on an export that keeps every
  BN (as in bench/peers.py), torch.fx's ``fuse`` (counted in its graph);
- ``python -m bnfold fuse`` as a subprocess: a trusted pickle (``torch.save(model)``,
  ``--trust-pickle --input-shape``), a ``.pt2`` (``torch.export.save`` of the default
  ``torch.export.export(model, (x,))``) with and without ``--static-batch``, and a
  state_dict with ``--arch`` (plus the ``--arch`` a user would try first where it
  differs). Per run: exit code, wall time, the ``error:`` line, the stderr line count,
  whether stderr has a traceback or ANSI colour codes, the report's fold counts and
  verification, and whether its ONNX has a dynamic batch; where it does, the ONNX is run
  in onnxruntime at batch 3 against a float64 run of the original, every output compared
  (error in units of the tolerance ``1e-6 + 1e-5 * max|reference|``: <= 1 passes).

Results go to bench/shipped_models_probe.json (merged by model, so partial runs add up)
and the tables to stdout (markdown).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "shipped_models_probe.json"
TABLES = HERE / "shipped_models_probe.md"
FUSE_TIMEOUT = 1500  # seconds per bnfold run
ATOL, RTOL = 1e-6, 1e-5  # bnfold's float32 defaults
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# --------------------------------------------------------------------------- small helpers


def first_line(e: BaseException | str) -> str:
    text = e if isinstance(e, str) else str(e)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    head = lines[0][:220] if lines else ""
    return head if isinstance(e, str) else f"{type(e).__name__}: {head}"


@contextlib.contextmanager
def hushed():
    """The exporters' progress prints and warnings swallowed (stderr logging still goes to
    this process's stderr, which the parent discards)."""
    saved = sys.stdout
    sys.stdout = io.StringIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stdout = saved


def timed(fn, *args, **kwargs) -> dict[str, Any]:
    """{ok, seconds, error, value}: fn's result, or the first line of what it raised."""
    start = time.perf_counter()
    try:
        with hushed():
            value = fn(*args, **kwargs)
        return {"ok": True, "seconds": round(time.perf_counter() - start, 2), "value": value}
    except Exception as e:  # noqa: BLE001 - every failure is a catalog entry
        return {
            "ok": False,
            "seconds": round(time.perf_counter() - start, 2),
            "error": first_line(e),
        }


def structure(o: Any) -> str:
    """The output's structure, e.g. ``tuple[T, dict{boxes: T, feats: list[T, T, T]}]``."""
    import torch

    if isinstance(o, torch.Tensor):
        return "T"
    if hasattr(o, "to_tuple") and hasattr(o, "keys"):  # transformers' ModelOutput
        return (
            f"{type(o).__name__}(dataclass){{"
            + ", ".join(f"{k}: {structure(v)}" for k, v in o.items())
            + "}"
        )
    if isinstance(o, dict):
        return "dict{" + ", ".join(f"{k}: {structure(v)}" for k, v in o.items()) + "}"
    if isinstance(o, (list, tuple)):
        return f"{type(o).__name__}[" + ", ".join(structure(v) for v in o) + "]"
    return type(o).__name__


def leaves(o: Any) -> list:
    """The output's tensors in pytree order (the order torch.export flattens outputs in)."""
    import torch
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(o) if isinstance(t, torch.Tensor)]


def bn_in_onnx(path: Path) -> int:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(n.op_type == "BatchNormalization" for n in graph.node)


def float64_reference(model, x) -> list:
    import torch

    with torch.no_grad():
        return [t.numpy() for t in leaves(copy.deepcopy(model).double()(x.double()))]


def onnx_check(path: Path, x, refs: list) -> dict[str, Any]:
    """The ONNX file at ``x`` in onnxruntime (optimisations off) against ``refs``."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    first = s.get_inputs()[0]
    out: dict[str, Any] = {
        "input_shape": [d if isinstance(d, int) else str(d) for d in first.shape]
    }
    out["dynamic_batch"] = not isinstance(first.shape[0], int)
    if not out["dynamic_batch"] and first.shape[0] != x.shape[0]:
        return out
    got = s.run(None, {first.name: x.numpy()})
    out["outputs"] = f"{len(got)} vs {len(refs)} in the model"
    if len(got) != len(refs):
        return out
    ratios = []
    for g, r in zip(got, refs, strict=True):
        if g.shape != r.shape:
            ratios.append(float("inf"))
            continue
        allowed = ATOL + RTOL * float(np.abs(r).max())
        ratios.append(float(np.abs(g.astype(np.float64) - r).max()) / allowed)
    out["error_in_tolerances"] = max(ratios)
    out["batch"] = int(x.shape[0])
    return out


# --------------------------------------------------------------------------- one model


def probe_torch(case, model, x, work: Path) -> dict[str, Any]:
    """fx, torch.export, torch.onnx.export and the peers on one model (deep copies only)."""
    import torch

    rec: dict[str, Any] = {}
    fx = timed(torch.fx.symbolic_trace, copy.deepcopy(model))
    rec["fx"] = {k: v for k, v in fx.items() if k != "value"}

    x2 = torch.cat([x, torch.randn_like(x)])
    exports: dict[str, Any] = {}
    for strict in (False, True):
        for label, example, dyn in (
            ("dynamic b1", x, True),
            ("dynamic b2", x2, True),
            ("static b1", x, False),
        ):
            shapes = ({0: torch.export.Dim("batch")},) if dyn else None
            # a fresh tensor each time: a failed dynamic export leaves torch._dynamo's marks
            # in the input's __dict__, and a .pt2 saved with that input then pickles
            # torch.Tensor (which bnfold's scanner refuses)
            r = timed(
                torch.export.export,
                copy.deepcopy(model),
                (example.clone(),),
                dynamic_shapes=shapes,
                strict=strict,
            )
            r.pop("value", None)
            exports[f"{'strict' if strict else 'non-strict'} {label}"] = r
    rec["export"] = exports

    x3 = torch.randn((3, *x.shape[1:]), generator=torch.Generator().manual_seed(3))
    ref1 = float64_reference(model, x)
    ref3 = float64_reference(model, x3)

    path = work / "dynamo.onnx"
    r = timed(torch.onnx.export, copy.deepcopy(model), (x.clone(),), str(path), dynamo=True)
    r.pop("value", None)
    if r["ok"]:
        r["bn"] = bn_in_onnx(path)
        r.update(onnx_check(path, x, ref1))
    rec["dynamo"] = r

    path = work / "dynamo_dyn.onnx"
    r = timed(
        torch.onnx.export,
        copy.deepcopy(model),
        (x2.clone(),),
        str(path),
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    r.pop("value", None)
    if r["ok"]:
        r["bn"] = bn_in_onnx(path)
        r.update(onnx_check(path, x3, ref3))
    rec["dynamo dynamic (example b2)"] = r

    path = work / "legacy.onnx"
    r = timed(torch.onnx.export, copy.deepcopy(model), (x,), str(path), dynamo=False)
    r.pop("value", None)
    if r["ok"]:
        r["bn"] = bn_in_onnx(path)
    rec["legacy"] = r

    raw = work / "unfolded.onnx"
    r = timed(
        torch.onnx.export,
        copy.deepcopy(model),
        (x,),
        str(raw),
        dynamo=False,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
    )
    if r["ok"]:
        rec["unfolded export bn"] = bn_in_onnx(raw)
        try:
            import onnx
            import onnxsim

            def simplify():
                simplified, ok = onnxsim.simplify(onnx.load(str(raw)))
                if not ok:
                    raise RuntimeError("onnxsim could not validate its result")
                onnx.save(simplified, str(work / "onnxsim.onnx"))

            s = timed(simplify)
            s.pop("value", None)
            if s["ok"]:
                s["bn"] = bn_in_onnx(work / "onnxsim.onnx")
            rec["onnxsim"] = s
        except ImportError:
            rec["onnxsim"] = {"ok": False, "error": "onnxsim not installed"}
    else:
        rec["onnxsim"] = {"ok": False, "error": "its unfolded input export failed: " + r["error"]}

    if fx["ok"]:
        from torch.fx.experimental.optimization import fuse

        f = timed(fuse, copy.deepcopy(model))
        fused = f.pop("value", None)
        if f["ok"]:
            f["bn"] = sum(
                isinstance(fused.get_submodule(n.target), torch.nn.modules.batchnorm._BatchNorm)
                for n in fused.graph.nodes
                if n.op == "call_module"
            )
        rec["fx fuse"] = f
    else:
        rec["fx fuse"] = {"ok": False, "error": "torch.fx cannot trace it"}
    return rec


def fuse_runs(case, model, x, work: Path) -> dict[str, Any]:
    """``python -m bnfold fuse`` on the model saved in each way a user saves it."""
    import torch

    shape = ",".join(map(str, case.shape))
    x3 = torch.randn((3, *x.shape[1:]), generator=torch.Generator().manual_seed(3))
    refs = {1: float64_reference(model, x), 3: float64_reference(model, x3)}
    runs: dict[str, list[str]] = {}

    pickle_path = work / "model.pkl"
    torch.save(model, pickle_path)
    runs["pickle"] = [str(pickle_path), "--trust-pickle", "--input-shape", shape]

    pt2 = work / "model.pt2"
    for strict in (False, True):
        try:
            with hushed():
                ep = torch.export.export(copy.deepcopy(model), (x.clone(),), strict=strict)
                torch.export.save(ep, pt2)
            break
        except Exception:  # noqa: BLE001 - no .pt2 to try then
            continue
    if pt2.exists():
        runs["pt2"] = [str(pt2)]
        runs["pt2 --static-batch"] = [str(pt2), "--static-batch"]

    sd = work / "model.state_dict.pt"
    torch.save(model.state_dict(), sd)
    if case.arch:
        args = [str(sd), "--arch", case.arch, "--input-shape", shape]
        if case.arch_kwargs:
            args += ["--arch-kwargs", json.dumps(case.arch_kwargs)]
        runs["arch"] = args
    # what a user would type first, where it differs from the above
    if case.arch and case.arch.startswith("segmentation_models_pytorch"):
        kwargs = {"encoder_name": case.arch_kwargs["encoder_name"]}  # smp's default weights
        runs["arch, builder defaults"] = [
            str(sd),
            "--arch",
            case.arch,
            "--arch-kwargs",
            json.dumps(kwargs),
            "--input-shape",
            shape,
        ]
    if case.arch and case.arch.startswith("torchvision:"):
        runs["arch + weights_backbone null"] = [
            *runs["arch"],
            "--arch-kwargs",
            json.dumps({"weights_backbone": None}),
        ]
    if "fasterrcnn" in case.name:
        runs["arch torchvision:"] = [
            str(sd),
            "--arch",
            "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",
            "--input-shape",
            shape,
        ]

    results = {}
    for label, args in runs.items():
        out = work / f"{label.replace(' ', '_').replace(':', '').replace(',', '')}.onnx"
        results[label] = run_fuse(args, out, x, refs)
    return results


def run_fuse(args: list[str], out: Path, x, refs: dict[int, list]) -> dict[str, Any]:
    import torch

    cmd = [sys.executable, "-m", "bnfold", "fuse", *args, "--out", str(out), "--format", "json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    start = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=FUSE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"exit": None, "seconds": FUSE_TIMEOUT, "error": f"timeout after {FUSE_TIMEOUT} s"}
    rec: dict[str, Any] = {"exit": p.returncode, "seconds": round(time.perf_counter() - start, 1)}
    err_lines = p.stderr.splitlines()
    rec["stderr_lines"] = len(err_lines)
    rec["traceback"] = "Traceback" in p.stderr
    rec["ansi"] = bool(ANSI.search(p.stderr))
    errors = [ANSI.sub("", ln) for ln in err_lines if ANSI.sub("", ln).startswith("error:")]
    if errors:
        rec["error"] = errors[0][:400]
    elif p.returncode != 0:
        rec["error"] = (ANSI.sub("", err_lines[-1]) if err_lines else "")[:400]
    try:
        report = json.loads(p.stdout)
    except ValueError:
        report = None
    if report:
        rec["folded"] = len(report.get("folded", []))
        reasons: dict[str, int] = {}
        for s in report.get("skipped", []):
            reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
        rec["kept"] = reasons
        rec["onnx_bn_nodes"] = report.get("onnx_bn_nodes")
        v = report.get("verification") or {}
        rec["verified"] = v.get("passed")
        rec["notes"] = report.get("notes", [])
        rec["timings"] = report.get("timings", {})
    if p.returncode in (0, 1) and out.exists():
        x3 = torch.randn((3, *x.shape[1:]), generator=torch.Generator().manual_seed(3))
        try:
            check = onnx_check(out, x3, refs[3])
            if not check["dynamic_batch"]:
                check.update(onnx_check(out, x, refs[1]))
            rec["onnx"] = check
        except Exception as e:  # noqa: BLE001 - recorded
            rec["onnx"] = {"error": first_line(e)}
    return rec


def probe_one(name: str, do_fuse: bool) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.shipped import BY_NAME

    torch.set_num_threads(2)
    case = BY_NAME[name]
    rec: dict[str, Any] = {"name": name, "shape": list(case.shape), "arch": case.arch}
    rec["load_average"] = [round(v, 2) for v in os.getloadavg()]  # the machine is shared
    start = time.perf_counter()
    with hushed():
        model = case.build()
    rec["build_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    with hushed():
        model = case.finish(model)
    rec["populate_s"] = round(time.perf_counter() - start, 2)
    rec["bn_modules"] = sum(
        type(m).__name__ in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "FrozenBatchNorm2d")
        for m in model.modules()
    )
    rec["bn_kinds"] = sorted(
        {type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__}
    )
    rec["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    x = torch.randn(case.shape, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    with torch.no_grad(), hushed():
        out = model(x)  # as a user's validation run would, before saving
    rec["eager_s"] = round(time.perf_counter() - start, 2)
    rec["output"] = structure(out)
    rec["output_tensors"] = len(leaves(out))
    with tempfile.TemporaryDirectory(prefix="shipped_probe_") as tmp:
        work = Path(tmp)
        rec.update(probe_torch(case, model, x, work))
        if do_fuse:
            rec["fuse"] = fuse_runs(case, model, x, work)
    return rec


# --------------------------------------------------------------------------- rendering


def cell(r: dict[str, Any] | None, what: str = "") -> str:
    if r is None:
        return "–"
    if r.get("ok"):
        extra = f", {r['bn']} BN" if "bn" in r else ""
        return f"ok ({r.get('seconds', '?')} s{extra})"
    return "FAIL: " + _md(r.get("error", "?"))


def _md(text: str, n: int = 150) -> str:
    text = ANSI.sub("", text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


def fuse_cell(r: dict[str, Any]) -> str:
    if r.get("exit") is None:
        return "TIMEOUT"
    parts = [f"exit {r['exit']}", f"{r['seconds']} s"]
    if "folded" in r:
        parts.append(f"folded {r['folded']}, {r.get('onnx_bn_nodes')} BN left")
    if r.get("kept"):
        parts.append("kept " + ", ".join(f"{k}×{v}" for k, v in r["kept"].items()))
    o = r.get("onnx") or {}
    if o:
        batch = "dynamic batch" if o.get("dynamic_batch") else "static batch"
        err = o.get("error_in_tolerances")
        parts.append(
            f"{batch}, {o.get('outputs', '?')} outputs"
            + (f", err {err:.2g} tol at b{o.get('batch')}" if err is not None else "")
        )
    noise = []
    if r.get("traceback"):
        noise.append("traceback")
    if r.get("ansi"):
        noise.append("ANSI")
    if r.get("stderr_lines", 0) > 1 and r.get("exit") != 0:
        noise.append(f"{r['stderr_lines']} stderr lines")
    if noise:
        parts.append("stderr: " + ", ".join(noise))
    text = "; ".join(parts)
    if r.get("error"):
        text += " — `" + _md(r["error"], 260) + "`"
    return text


HEADER = """# What torch and bnfold do with the architectures people ship (issue 14)

Generated by `python bench/shipped_models_probe.py` from `shipped_models_probe.json`; do not
edit by hand. Models from tests/shipped.py (random weights, statistics from two train-mode
passes), input batch 1. "err (tol)" is the largest error over the outputs against a float64
run, in units of bnfold's tolerance `1e-6 + 1e-5 * max|reference|` (<= 1 passes). Times are
from a shared 2-core machine under load (load averages are in the JSON).

"""


def render(results: dict[str, Any]) -> str:
    from tests.shipped import CASES

    order = [c.name for c in CASES if c.name in results]
    out = [
        "## Models",
        "",
        "| model | params (M) | BN | kinds | build + stats (s) | output |",
        "|---|---:|---:|---|---:|---|",
    ]
    for n in order:
        r = results[n]
        out.append(
            f"| {n} | {r['params_m']} | {r['bn_modules']} | {', '.join(r['bn_kinds'])} | "
            f"{r['build_s']} + {r['populate_s']} | {_md(r['output'], 300)} "
            f"({r['output_tensors']} tensors) |"
        )
    out += ["", "## torch.fx and torch.export", ""]
    keys = [
        f"{s} {v}"
        for s in ("non-strict", "strict")
        for v in ("dynamic b1", "dynamic b2", "static b1")
    ]
    out.append("| model | fx.symbolic_trace | " + " | ".join(keys) + " |")
    out.append("|---|" + "---|" * (1 + len(keys)))
    for n in order:
        r = results[n]
        out.append(
            f"| {n} | {cell(r['fx'])} | "
            + " | ".join(cell(r["export"].get(k)) for k in keys)
            + " |"
        )
    out += ["", "## The exporters and the peers (BatchNormalization nodes left)", ""]
    out.append(
        "| model | BN | dynamo (static b1) | dynamo error (tol) | dynamo dynamic (ex. b2) | "
        "its error at b3 (tol) | legacy | onnxsim | fx fuse |"
    )
    out.append("|---|---:|---|---:|---|---:|---|---|---|")
    for n in order:
        r = results[n]
        d, dd = r["dynamo"], r["dynamo dynamic (example b2)"]
        out.append(
            f"| {n} | {r['bn_modules']} | {cell(d)} | {_tol(d)} | {cell(dd)} | {_tol(dd)} | "
            f"{cell(r['legacy'])} | {cell(r.get('onnxsim'))} | {cell(r.get('fx fuse'))} |"
        )
    if any("fuse" in results[n] for n in order):
        out += ["", "## bnfold fuse today", ""]
        out.append("| model | route | result |")
        out.append("|---|---|---|")
        for n in order:
            for route, fr in results[n].get("fuse", {}).items():
                out.append(f"| {n} | {route} | {fuse_cell(fr)} |")
    return "\n".join(out) + "\n"


def _tol(r: dict[str, Any]) -> str:
    e = r.get("error_in_tolerances")
    return "–" if e is None else f"{e:.2g}"


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="names containing these words")
    parser.add_argument("--no-fuse", action="store_true", help="torch and the peers only")
    parser.add_argument("--render", action="store_true", help="print the tables from the JSON")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--to", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    if args.one:
        try:
            rec = probe_one(args.one, not args.no_fuse)
        except Exception as e:  # noqa: BLE001 - the model's whole probe failed
            rec = {"name": args.one, "crashed": first_line(e), "traceback": traceback.format_exc()}
        Path(args.to).write_text(json.dumps(rec, indent=1))
        return

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.render:
        from tests.shipped import CASES

        chosen = [
            c for c in CASES if not args.only or any(w.lower() in c.name.lower() for w in args.only)
        ]
        for case in chosen:
            start = time.perf_counter()
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                to = Path(f.name)
            cmd = [sys.executable, __file__, "--one", case.name, "--to", str(to)]
            if args.no_fuse:
                cmd.append("--no-fuse")
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            try:
                rec = json.loads(to.read_text())
            except ValueError:
                rec = {"name": case.name, "crashed": "the probe process died"}
            to.unlink(missing_ok=True)
            rec["probe_s"] = round(time.perf_counter() - start, 1)
            previous = results.get(case.name, {})
            if args.no_fuse and "fuse" in previous:
                rec["fuse"] = previous["fuse"]
            results[case.name] = rec
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
            print(
                f"{case.name}: {rec.get('crashed') or 'done'} in {rec['probe_s']} s",
                file=sys.stderr,
            )
    crashed = {n: r for n, r in results.items() if "crashed" in r}
    text = HEADER + render({n: r for n, r in results.items() if n not in crashed})
    text += "".join(f"- {n}: the probe crashed: {r['crashed']}\n" for n, r in crashed.items())
    if not args.render:
        TABLES.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

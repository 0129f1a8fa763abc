"""Self-contained HTML reports (``--html``): summary, tables, pictures, explanations.

One file that opens without a network: inline CSS, no scripts, no fonts, the picture
embedded as a base64 PNG (``data:`` URI). Every string that comes from the model or
the command line (paths, layer names, reason details, notes) goes through
``html.escape``. No timestamps: the same report gives the same bytes.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable
from html import escape
from pathlib import Path

from bnfold import __version__
from bnfold.errors import OutputError
from bnfold.reports import BNLayerReport, FuseReport, InspectReport, Spread

_ARROWS = {"backward": "→", "forward": "←", "merge": "⇉"}

__all__ = ["EXTENSIONS", "check_html_path", "explanations", "fuse_html", "inspect_html"]

EXTENSIONS = (".html", ".htm")


def check_html_path(path: Path, model: Path, taken: Iterable[Path | None] = ()) -> None:
    """Refuse ``--html`` paths without an .html extension (a typo must not hit a model)."""
    from bnfold.cli.plot import check_output_path

    if path.suffix.lower() not in EXTENSIONS:
        raise OutputError(
            f"--html {path}: unsupported extension {path.suffix or '(none)'!r}; "
            "use a .html file name"
        )
    check_output_path(path, "--html", model, taken)


def explanations(thresholds: dict[str, float]) -> dict[str, str]:
    """What each diagnostic code means, with the thresholds this report used."""
    dead = thresholds.get("dead_gamma", 1e-3)
    tiny = thresholds.get("tiny_variance", 1e-4)
    spread = thresholds.get("scale_spread", 100.0)
    shift = thresholds.get("drift_mean", 0.5)
    factor = thresholds.get("drift_var", 2.0)
    return {
        "stale_stats": "num_batches_tracked is 0, or running_mean is all 0 and running_var "
        "all 1: the statistics were never updated, so folding bakes in meaningless values. "
        "Calibrate the BatchNorm layers on real data before folding.",
        "dead_channels": f"|gamma| < dead_gamma ({dead:g}) in some channel: the channel "
        "outputs (almost) a constant beta; it can usually be pruned.",
        "tiny_variance": f"running_var + eps < tiny_variance ({tiny:g}) in some channel: "
        f"folding multiplies that channel's weights by more than {1 / math.sqrt(tiny):.4g}"
        "·|gamma|, which low-precision (float16, int8) inference may not survive.",
        "large_scale_spread": "the largest |fold scale| over live channels is more than "
        f"scale_spread ({spread:g}) times the smallest: per-tensor quantisation of the "
        "folded weights loses the small channels (use per-channel quantisation).",
        "nonfinite": "NaN or Inf in a parameter or statistic: the layer cannot be folded and "
        "its outputs are not meaningful.",
        "negative_variance": "running_var < 0 in some channel: the statistics are corrupt.",
        "train_mode": "the module is in training mode: it normalises with the statistics "
        "of each batch, not its running statistics; call model.eval() before saving.",
        "no_running_stats": "track_running_stats=False or no running buffers: the layer "
        "always normalises with batch statistics, so there is nothing to fold.",
        "stats_drift": "on the data (--data, the model in eval mode), the layer's inputs "
        "do not match its running statistics in some channel: the mean is more than "
        f"drift_mean ({shift:g}) running standard deviations from running_mean "
        "(|mean - running_mean| / sqrt(running_var + eps)), or (variance + eps) / "
        f"(running_var + eps) is above drift_var ({factor:g}) or below 1/{factor:g}. The "
        "worst channel of each measure is named. Stale statistics, other preprocessing or "
        "a domain shift; re-estimate them with bnfold recalibrate if the data is what the "
        "model will see.",
    }


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em 2em;color:#222;
 line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.6em;
 border-bottom:1px solid #ddd} h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}
th,td{border:1px solid #d0d0d0;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f2f2f2;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr:nth-child(even) td{background:#fafafa}
.scroll{overflow-x:auto;max-width:100%}
.picture img{max-width:none;display:block}
.bad{color:#b00020;font-weight:600} .ok{color:#1b7a1b;font-weight:600}
.warn{color:#9a5b00} .muted{color:#666}
code{background:#f4f4f4;padding:0 3px;border-radius:3px}
dl.summary{display:grid;grid-template-columns:max-content auto;gap:2px 14px}
dl.summary dt{color:#555} dl.summary dd{margin:0}
footer{margin-top:2em;color:#888;font-size:12px}
"""


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _spread(s: Spread | None) -> str:
    return "-" if s is None else f"{_g(s.min)} / {_g(s.median)} / {_g(s.max)}"


def _summary(items: list[tuple[str, str]]) -> str:
    """A definition list; values are already-escaped HTML."""
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items)
    return f'<dl class="summary">{rows}</dl>'


def _table(head: list[str], rows: list[str]) -> str:
    cells = "".join(f"<th>{_e(h)}</th>" for h in head)
    return f'<div class="scroll"><table><tr>{cells}</tr>\n' + "\n".join(rows) + "</table></div>"


def _page(title: str, body: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + f"\n<footer>Written by bnfold {_e(__version__)}.</footer>\n</body></html>\n"
    )


def _picture(png: bytes | None, missing: str | None) -> list[str]:
    if png is None:
        why = missing or "no picture"
        return [f'<p class="muted"><em>{_e(why)}</em></p>']
    data = base64.b64encode(png).decode("ascii")
    return [
        '<div class="scroll picture"><img alt="BatchNorm statistics per layer: fold scale, '
        f'running variance, |gamma| and warnings" src="data:image/png;base64,{data}"></div>',
        '<p class="muted">Bars: min…max over the channels (log scale), dots: median. Red '
        "bars: the layer has the warning the panel shows; ✕: the values change sign across "
        "channels (the smallest magnitude is then unknown); ▼: dead channels; dashed: the "
        "threshold.</p>",
    ]


def _fold_cell(layer: BNLayerReport) -> str:
    if layer.fold_into:
        arrow = {"backward": "→", "forward": "←"}.get(layer.fold_direction or "", "⇉")
        return (
            f'<span class="ok">{arrow}</span> {_e(layer.fold_into)} '
            f'<span class="muted">({_e(layer.fold_direction)})</span>'
        )
    if layer.reason:
        detail = f" {_e(layer.reason_detail)}" if layer.reason_detail else ""
        return f'<span class="warn">stays: <code>{_e(layer.reason)}</code></span>{detail}'
    return "-"


_DATA_HEAD = ["values/ch", "data mean", "data var", "mean shift", "var ratio"]


def _data_cells(layer: BNLayerReport) -> list[str]:
    values = "-" if layer.data_values is None else str(layer.data_values)
    return [
        f'<td class="num">{values}</td>',
        f'<td class="num">{_spread(layer.data_mean)}</td>',
        f'<td class="num">{_spread(layer.data_var)}</td>',
        f'<td class="num">{_spread(layer.mean_shift)}{_channel(layer.mean_shift_channel)}</td>',
        f'<td class="num">{_spread(layer.var_ratio)}{_channel(layer.var_ratio_channel)}</td>',
    ]


def _channel(channel: int | None) -> str:
    return "" if channel is None else f' <span class="muted">(worst: channel {channel})</span>'


def _layer_row(i: int, layer: BNLayerReport, data: bool = False) -> str:
    eps = _g(layer.eps) + ("" if layer.eps_known else ' <span class="muted">(assumed)</span>')
    warnings = ", ".join(f"<code>{_e(w)}</code>" for w in layer.warnings)
    cells = [
        f'<td class="num">{i}</td>',
        f"<td>{_e(layer.name)}</td>",
        f"<td>{_e(layer.kind)}</td>",
        f'<td class="num">{layer.channels}</td>',
        f"<td>{_fold_cell(layer)}</td>",
        f'<td class="num">{_spread(layer.fold_scale)}</td>',
        f'<td class="num">{_spread(layer.running_var)}</td>',
        f'<td class="num">{_spread(layer.running_mean)}</td>',
        f'<td class="num">{_spread(layer.gamma)}</td>',
        f'<td class="num">{_spread(layer.beta)}</td>',
        f'<td class="num">{eps}</td>',
        f'<td class="num">{_g(layer.momentum)}</td>',
        f'<td class="num">{_e(_opt(layer.num_batches_tracked))}</td>',
        f"<td>{_e(_opt(layer.training))}</td>",
        *(_data_cells(layer) if data else []),
        f'<td class="{"bad" if layer.warnings else "ok"}">{warnings or "-"}</td>',
    ]
    return "<tr>" + "".join(cells) + "</tr>"


def _opt(value: object) -> str:
    return "-" if value is None else str(value)


def inspect_sections(
    r: InspectReport, png: bytes | None, missing: str | None = None, heading: str | None = None
) -> list[str]:
    """The inspect report as HTML sections (also the second half of the fuse report)."""
    s = r.summary
    foldable = (
        "unknown (no architecture)" if s.foldable is None else f"{s.foldable} of {s.bn_layers}"
    )
    warn = ", ".join(f"<code>{_e(k)}</code> ×{v}" for k, v in s.warnings_by_code.items())
    thresholds = ", ".join(f"{_e(k)}={v:g}" for k, v in r.thresholds.items())
    out = [
        f"<h2>{_e(heading or 'Summary')}</h2>",
        _summary(
            [
                ("model", f"<code>{_e(r.model)}</code>"),
                ("format", _e(r.format)),
                ("layer order", _e(r.order)),
                ("BatchNorm layers", str(s.bn_layers)),
                ("foldable", _e(foldable)),
                (
                    "folding removes",
                    f"{s.params_removed} parameters and {s.buffers_removed} buffer values"
                    + (f"; adds {s.bias_params_added} bias values" if s.bias_params_added else ""),
                ),
                ("warnings", warn or '<span class="ok">none</span>'),
                ("thresholds", thresholds or "-"),
                *_data_items(r),
            ]
        ),
        "<h2>Pictures</h2>",
        *_picture(png, missing),
        "<h2>Layers</h2>",
        f'<p class="muted">In {_e(r.order)} order. Spreads are min / median / max over the '
        "channels; the fold scale is gamma / sqrt(running_var + eps). → folds backward into "
        "the layer before, ← forward into the layer after."
        + (
            " On the data: each BN's inputs with the model in eval mode, over every sample "
            "and position; mean shift = |data mean − running_mean| / sqrt(running_var + eps), "
            "var ratio = (data var + eps) / (running_var + eps)."
            if r.data is not None
            else ""
        )
        + "</p>",
        _table(
            [
                "#",
                "layer",
                "kind",
                "C",
                "folds into",
                "fold scale",
                "running_var",
                "running_mean",
                "gamma",
                "beta",
                "eps",
                "momentum",
                "batches tracked",
                "training",
                *(_DATA_HEAD if r.data is not None else []),
                "warnings",
            ],
            [_layer_row(i, layer, r.data is not None) for i, layer in enumerate(r.layers)],
        ),
    ]
    explain = explanations(r.thresholds)
    codes = list(s.warnings_by_code)
    if codes:
        out.append("<h2>Diagnostics</h2>")
        for code in codes:
            hits = [
                (layer.name, d.message)
                for layer in r.layers
                for d in layer.diagnostics
                if d.code == code
            ]
            layers = "".join(f"<li>{_e(name)}: {_e(message)}</li>" for name, message in hits)
            out.append(
                f'<h3 id="{_e(code)}"><code>{_e(code)}</code> '
                f'<span class="muted">({s.warnings_by_code[code]} layers)</span></h3>'
                f"<p>{_e(explain.get(code, 'see the bnfold README'))}</p><ul>{layers}</ul>"
            )
    if r.notes:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in r.notes) + "</ul>")
    return out


def _data_items(r: InspectReport) -> list[tuple[str, str]]:
    """--data: where the inputs came from and how they were prepared."""
    d = r.data
    if d is None:
        return []
    shapes = " + ".join("×".join(str(n) for n in s) for s in d.input_shapes)
    return [
        ("data", f"<code>{_e(d.source)}</code> ({_e(d.kind)})"),
        (
            "samples",
            f"{d.samples} of {_e(shapes)}, in {d.batches} batches of at most {d.batch_size}",
        ),
        ("preprocessing", _e(d.preprocessing)),
    ]


def inspect_html(r: InspectReport, png: bytes | None, missing: str | None = None) -> str:
    """The whole ``inspect --html`` page; ``missing`` says why ``png`` is None."""
    return _page(
        f"bnfold inspect {r.model}",
        [
            f"<h1>bnfold inspect: <code>{_e(Path(r.model).name)}</code></h1>",
            *inspect_sections(r, png, missing),
        ],
    )


def _verification(r: FuseReport) -> list[str]:
    v = r.verification
    if v is None:
        return ["<h2>Verification</h2><p>not run.</p>"]
    verdict = '<span class="ok">passed</span>' if v.passed else '<span class="bad">FAILED</span>'
    items = [
        ("inputs", f"{v.inputs} batches ({_e(v.input_source)})"),
        (
            "how",
            "the ONNX file in onnxruntime (CPU, graph optimisations off) against a float64 "
            "run of the original model",
        ),
        (
            "passes when",
            f"max abs error ≤ atol + rtol · max|reference|, atol {v.atol:g}, rtol {v.rtol:g}",
        ),
        ("max abs error", _g(v.max_abs_error)),
        ("max rel error", _g(v.max_rel_error) + " (relative to the output's largest magnitude)"),
    ]
    if v.folded_torch_max_abs_error is not None:
        items.append(("folded PyTorch model, max abs error", _g(v.folded_torch_max_abs_error)))
    if v.baseline_max_abs_error is not None:
        items.append(("float32 noise of the original (max abs)", _g(v.baseline_max_abs_error)))
    rows = []
    for o in v.outputs:
        allowed = v.atol + v.rtol * o.reference_max_abs
        rows.append(
            f"<tr><td>{_e(o.name)}</td><td>{_e(list(o.shape))}</td>"
            f'<td class="num">{_g(o.max_abs_error)}</td><td class="num">{_g(allowed)}</td>'
            f'<td class="num">{_g(o.max_rel_error)}</td>'
            f'<td class="num">{_g(o.reference_max_abs)}</td>'
            f'<td class="{"ok" if o.passed else "bad"}">{"ok" if o.passed else "FAIL"}</td></tr>'
        )
    return [
        f"<h2>Verification: {verdict}</h2>",
        _summary(items),
        _table(
            [
                "output",
                "shape",
                "max abs error",
                "allowed",
                "max rel error",
                "max |reference|",
                "result",
            ],
            rows,
        ),
    ]


def fuse_html(
    r: FuseReport, stats: InspectReport | None, png: bytes | None, missing: str | None = None
) -> str:
    """The whole ``fuse --html`` page: folds, kept layers, verification, then statistics."""
    items = [
        ("model", f"<code>{_e(r.model)}</code> ({_e(r.format)})"),
        ("output", f"<code>{_e(r.output or '-')}</code>"),
        ("exporter", f"{_e(r.exporter)}, opset {_e(_opt(r.opset))}"),
        ("folded", f"{len(r.folded)} BatchNorm layers"),
        ("kept", f"{len(r.skipped)} BatchNorm layers"),
        ("stored values", f"{r.params_before} → {r.params_after}"),
    ]
    if r.ops_before is not None:
        items.append(("graph operations", f"{r.ops_before} → {_e(_opt(r.ops_after))}"))
    if r.onnx_nodes is not None:
        items.append(
            ("ONNX nodes", f"{r.onnx_nodes}, BatchNormalization left: {_e(_opt(r.onnx_bn_nodes))}")
        )
    if r.torch_output:
        items.append(("folded PyTorch model", f"<code>{_e(r.torch_output)}</code>"))
    if r.recalibration is not None:
        from bnfold.cli.render import recalibration_line

        items.append(("statistics", _e(recalibration_line(r.recalibration))))
    if r.timings:
        items.append(("timings", ", ".join(f"{_e(k)} {v:.2f} s" for k, v in r.timings.items())))
    folded = [
        f"<tr><td>{_e(f.bn)}</td><td>{_e(f.bn_kind)}</td><td>{_e(f.into)}</td>"
        f"<td>{_ARROWS.get(f.direction, '')} {_e(f.direction)}</td>"
        f"<td><code>{_e(f.rule)}</code></td></tr>"
        for f in r.folded
    ]
    kept = [
        f"<tr><td>{_e(k.bn)}</td><td><code>{_e(k.reason)}</code></td><td>{_e(k.detail)}</td></tr>"
        for k in r.skipped
    ]
    merged = [
        f"<tr><td>{_e(m.into)}</td><td><code>{_e(m.rule)}</code></td>"
        f"<td>{_e(', '.join(m.convs))}</td><td>{_e(', '.join(m.identity_bns))}</td>"
        f"<td>{m.skips}</td></tr>"
        for m in r.merged
    ]
    output = Path(r.output).name if r.output else "(no output)"
    body = [
        f"<h1>bnfold fuse: <code>{_e(Path(r.model).name)}</code> → <code>{_e(output)}</code></h1>",
        _summary(items),
        *_verification(r),
        f"<h2>Folded ({len(r.folded)})</h2>",
        '<p class="muted">backward: into the layer that produces the BatchNorm\'s input; '
        "forward: into the layer that consumes its output; merge: an identity branch merged "
        "with the conv branches it is summed with.</p>",
        _table(["BN", "kind", "folded into", "direction", "rule"], folded)
        if folded
        else "<p>none</p>",
        *(
            [
                f"<h2>Branches merged ({len(r.merged)})</h2>",
                _table(["merged into", "rule", "conv branches", "identity BNs", "skips"], merged),
            ]
            if merged
            else []
        ),
        f"<h2>Kept, and why ({len(r.skipped)})</h2>",
        _table(["BN", "reason", "detail"], kept) if kept else "<p>none: every BatchNorm folded</p>",
    ]
    if r.merged:
        from bnfold.cli.render import merge_line

        lines = "".join(f"<li>{_e(merge_line(m))}</li>" for m in r.merged)
        body.insert(-2, f"<h2>Branches merged ({len(r.merged)})</h2><ul>{lines}</ul>")
    if r.notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in r.notes) + "</ul>")
    if stats is not None:
        body += inspect_sections(
            stats, png, missing, heading="BatchNorm statistics of the original model"
        )
    return _page(f"bnfold fuse {r.model}", body)

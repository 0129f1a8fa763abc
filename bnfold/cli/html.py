"""Self-contained HTML reports (``--html``): summary, tables, pictures, explanations.

One file with inline CSS and the picture embedded as base64 PNG: it opens without a
network. Every string from the model is escaped.
"""

from __future__ import annotations

import base64
from html import escape

from bnfold.reports import FuseReport, InspectReport

# what each diagnostic means (thresholds: bnfold/stats.py, README)
EXPLANATIONS = {
    "stale_stats": "num_batches_tracked is 0, or running_mean is all 0 and running_var all 1: "
    "the statistics were never updated, so folding bakes in meaningless values.",
    "dead_channels": "|gamma| below dead_gamma (1e-3) in some channels: those channels "
    "output a constant; they can usually be pruned.",
    "tiny_variance": "running_var + eps below tiny_variance (1e-4): folding multiplies the "
    "channel's weights by over 100x|gamma|, which hurts low-precision inference.",
    "large_scale_spread": "the largest fold scale is over scale_spread (100) times the "
    "smallest: per-tensor quantisation of the folded weights loses the small channels.",
    "nonfinite": "NaN or Inf in a parameter or statistic.",
    "negative_variance": "a running variance below zero: the statistics are corrupt.",
    "train_mode": "the module is in training mode and normalises with batch statistics.",
    "no_running_stats": "track_running_stats=False or no running buffers: nothing to fold.",
}

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f2f2f2} .bad{color:#b00} .ok{color:#070} img{max-width:100%}
code{background:#f6f6f6;padding:0 3px}
"""


def _page(title: str, body: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _picture(png: bytes | None) -> list[str]:
    if png is None:
        return [
            "<p><em>No pictures: matplotlib is not installed (pip install 'bnfold[plot]').</em></p>"
        ]
    data = base64.b64encode(png).decode("ascii")
    return [f'<img alt="BatchNorm statistics per layer" src="data:image/png;base64,{data}">']


def inspect_sections(r: InspectReport, png: bytes | None) -> list[str]:
    s = r.summary
    foldable = "unknown (no architecture)" if s.foldable is None else f"{s.foldable}/{s.bn_layers}"
    out = [
        f"<h2>BatchNorm layers of <code>{escape(r.model)}</code></h2>",
        f"<p>{s.bn_layers} layers ({escape(r.format)}, {escape(r.order)} order); foldable: "
        f"{foldable}; folding removes {s.params_removed} parameters and {s.buffers_removed} "
        "buffer values.</p>",
        *_picture(png),
        "<table><tr><th>#</th><th>layer</th><th>kind</th><th>C</th><th>folds into</th>"
        "<th>fold scale min / median / max</th><th>var min</th><th>warnings</th></tr>",
    ]
    for i, layer in enumerate(r.layers):
        fs = layer.fold_scale
        scale = "-" if fs is None else f"{_g(fs.min)} / {_g(fs.median)} / {_g(fs.max)}"
        fold = (
            f"{escape(layer.fold_into)} ({layer.fold_direction})"
            if layer.fold_into
            else f"stays: <code>{escape(layer.reason or '-')}</code> "
            f"{escape(layer.reason_detail or '')}"
        )
        warn = ", ".join(escape(w) for w in layer.warnings) or "-"
        out.append(
            f"<tr><td>{i}</td><td>{escape(layer.name)}</td><td>{escape(layer.kind)}</td>"
            f"<td>{layer.channels}</td><td>{fold}</td><td>{scale}</td>"
            f"<td>{_g(layer.running_var.min if layer.running_var else None)}</td>"
            f'<td class="{"bad" if layer.warnings else "ok"}">{warn}</td></tr>'
        )
    out.append("</table>")
    codes = [c for c in EXPLANATIONS if c in s.warnings_by_code]
    if codes:
        out.append("<h3>Diagnostics</h3><ul>")
        out += [
            f"<li><code>{c}</code> ({s.warnings_by_code[c]} layers): {escape(EXPLANATIONS[c])}</li>"
            for c in codes
        ]
        out.append("</ul>")
    out += [f"<p><em>Note: {escape(n)}</em></p>" for n in r.notes]
    return out


def inspect_html(r: InspectReport, png: bytes | None) -> str:
    return _page(
        f"bnfold inspect {r.model}", ["<h1>bnfold inspect</h1>", *inspect_sections(r, png)]
    )


def fuse_html(r: FuseReport, inspect: InspectReport | None, png: bytes | None) -> str:
    body = [
        "<h1>bnfold fuse</h1>",
        f"<p><code>{escape(r.model)}</code> → <code>{escape(r.output or '-')}</code> "
        f"with {escape(r.exporter)}. Folded {len(r.folded)}, kept {len(r.skipped)}; stored "
        f"values {r.params_before} → {r.params_after}; BatchNormalization left in the ONNX "
        f"file: {r.onnx_bn_nodes if r.onnx_bn_nodes is not None else '-'}.</p>",
        "<h2>Folded</h2><table><tr><th>BN</th><th>into</th><th>direction</th><th>rule</th></tr>",
        *[
            f"<tr><td>{escape(f.bn)}</td><td>{escape(f.into)}</td><td>{f.direction}</td>"
            f"<td>{escape(f.rule)}</td></tr>"
            for f in r.folded
        ],
        "</table><h2>Kept, and why</h2><table><tr><th>BN</th><th>reason</th><th>detail</th></tr>",
        *[
            f"<tr><td>{escape(k.bn)}</td><td><code>{escape(k.reason)}</code></td>"
            f"<td>{escape(k.detail)}</td></tr>"
            for k in r.skipped
        ],
        "</table>",
    ]
    v = r.verification
    if v is not None:
        verdict = (
            '<span class="ok">passed</span>' if v.passed else '<span class="bad">FAILED</span>'
        )
        body += [
            f"<h2>Verification: {verdict}</h2>",
            f"<p>{v.inputs} input batches ({escape(v.input_source)}), onnxruntime with graph "
            f"optimisations off against a float64 run of the original; atol {v.atol:g}, rtol "
            f"{v.rtol:g} (relative to each output's largest magnitude).</p>",
            "<table><tr><th>output</th><th>shape</th><th>max abs error</th>"
            "<th>max rel error</th><th>max |reference|</th><th>result</th></tr>",
            *[
                f"<tr><td>{escape(o.name)}</td><td>{list(o.shape)}</td><td>{o.max_abs_error:.3g}"
                f"</td><td>{o.max_rel_error:.3g}</td><td>{o.reference_max_abs:.3g}</td>"
                f'<td class="{"ok" if o.passed else "bad"}">'
                f"{'ok' if o.passed else 'FAIL'}</td></tr>"
                for o in v.outputs
            ],
            "</table>",
        ]
    if inspect is not None:
        body += inspect_sections(inspect, png)
    body += [f"<p><em>Note: {escape(n)}</em></p>" for n in r.notes]
    return _page(f"bnfold fuse {r.model}", body)

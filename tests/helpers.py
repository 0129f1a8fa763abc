"""Helpers the test modules share: architecture files, report rows, CLI error checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from bnfold.reports import BNLayerReport, Spread


def write_arch(folder: Path, source: str, stem: str = "net") -> tuple[Path, dict[str, Any]]:
    """Write ``source`` to ``folder/stem.py`` (for ``--arch``) and run it; the file and
    the names it defines."""
    path = folder / f"{stem}.py"
    path.write_text(source)
    namespace: dict[str, Any] = {}
    exec(compile(source, str(path), "exec"), namespace)
    return path, namespace


def bn_layer(name: str, **changes: Any) -> BNLayerReport:
    """A healthy BatchNorm2d row of an inspect report, with ``changes`` applied."""
    base = BNLayerReport(
        name=name,
        kind="BatchNorm2d",
        channels=64,
        eps=1e-5,
        eps_known=True,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        num_batches_tracked=100,
        training=False,
        running_mean=Spread(-1.0, 0.0, 1.0),
        running_var=Spread(0.25, 1.0, 4.0),
        gamma=Spread(0.5, 1.0, 1.5),
        beta=Spread(-0.125, 0.0, 0.125),
        fold_scale=Spread(0.25, 1.0, 3.0),
        fold_into="layer1.0.conv1",
        fold_direction="backward",
        reason=None,
        reason_detail=None,
        warnings=(),
        diagnostics=(),
    )
    return dataclasses.replace(base, **changes)


def assert_one_error_line(result: Any, *needles: str) -> None:
    """Exit 2, nothing on stdout, exactly one 'error:' line on stderr, no traceback."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert result.stderr.endswith("\n")
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def count_torch_exports(monkeypatch: Any) -> list[str]:
    """From now on, the class name of every model ``torch.export.export`` is called on."""
    import torch

    calls: list[str] = []
    real = torch.export.export

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(type(args[0]).__name__)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counted)
    return calls

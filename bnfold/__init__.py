"""bnfold: BatchNorm analysis and exact inference folding.

The public API (``__all__``)::

    bnfold.fold(model, example_inputs)      -> FoldResult (.module, .report)
    bnfold.inspect(model_or_path)           -> InspectReport
    bnfold.fuse(model_or_path, "m.onnx")    -> FuseReport
    bnfold.check(paths)                     -> CheckReport
    bnfold.recalibrate(model_or_path, data) -> RecalibrationReport
    bnfold.BnfoldError and its subclasses   (bad input; see bnfold.errors)

Every report has ``to_dict()``, the CLI's ``--format json``.  The library never prints
and never exits; ``bnfold.cli`` is the command line.  torch and onnx are imported by the
functions when they run, not here, so ``import bnfold`` and ``bnfold --help`` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bnfold.errors import (
    ArchError,
    BnfoldError,
    CaptureError,
    ExportError,
    FoldError,
    LoadError,
    OutputError,
    UnsafePickleError,
    VerifyError,
)

if TYPE_CHECKING:
    from bnfold.api import FoldReport, FoldResult, check, fold, fuse, inspect, recalibrate
    from bnfold.reports import CheckReport, FuseReport, InspectReport, RecalibrationReport

__version__ = "0.1.0"

__all__ = [
    "ArchError",
    "BnfoldError",
    "CaptureError",
    "CheckReport",
    "ExportError",
    "FoldError",
    "FoldReport",
    "FoldResult",
    "FuseReport",
    "InspectReport",
    "LoadError",
    "OutputError",
    "RecalibrationReport",
    "UnsafePickleError",
    "VerifyError",
    "__version__",
    "check",
    "fold",
    "fuse",
    "inspect",
    "recalibrate",
]

_API = {"check", "fold", "fuse", "inspect", "recalibrate", "FoldReport", "FoldResult"}
_REPORTS = {"CheckReport", "FuseReport", "InspectReport", "RecalibrationReport"}


def __getattr__(name: str) -> Any:
    """The API functions and report types, imported on first use."""
    if name in _API:
        from bnfold import api

        return getattr(api, name)
    if name in _REPORTS:
        from bnfold import reports

        return getattr(reports, name)
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""The exception tree of bnfold.

Every error a user can cause is a ``BnfoldError``; the CLI catches it in one place,
prints ``error: <message>`` (and the hint) on one line of stderr and exits with
``exit_code``::

    BnfoldError                 exit 2   (bad input, wrong arguments)
    ├── LoadError               the file cannot be read as a model
    │   └── UnsafePickleError   the file needs --trust-pickle
    ├── ArchError               --arch does not import or does not fit the weights
    ├── CaptureError            the model's data flow cannot be captured
    ├── FoldError               a fold could not be computed
    ├── ExportError             the ONNX exporter failed
    ├── OutputError             the output path is refused (exists, equals the input)
    └── VerifyError             verification could not run (not: ran and failed)

A verification that runs and finds a mismatch is a result, not an error: it is
reported and the CLI exits 1.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "ArchError",
    "BnfoldError",
    "CaptureError",
    "ExportError",
    "FoldError",
    "LoadError",
    "OutputError",
    "UnsafePickleError",
    "VerifyError",
]


class BnfoldError(Exception):
    """Base of every error bnfold raises on purpose."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None, path: Path | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.path = path

    def one_line(self) -> str:
        """The message as the CLI prints it: path, message and hint on one line."""
        text = f"{self.path}: {self.message}" if self.path is not None else self.message
        if self.hint:
            text += f" ({self.hint})"
        return " ".join(text.split())


class LoadError(BnfoldError):
    """The file cannot be read as a model."""


class UnsafePickleError(LoadError):
    """The file holds pickled Python objects whose loading runs code."""


class ArchError(BnfoldError):
    """``--arch`` does not import, cannot be built, or does not fit the weights."""


class CaptureError(BnfoldError):
    """The model's data flow cannot be captured."""


class FoldError(BnfoldError):
    """A fold could not be computed."""


class ExportError(BnfoldError):
    """The ONNX exporter failed."""


class OutputError(BnfoldError):
    """The output path is refused."""


class VerifyError(BnfoldError):
    """Verification could not run at all."""

"""bnfold: BatchNorm analysis and exact inference folding.

The library never prints and never exits; ``bnfold.cli`` is the command line.
Heavy dependencies (torch, onnx) are imported by the stage modules, not here, so
``import bnfold`` and ``bnfold --help`` stay fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

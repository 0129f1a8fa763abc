"""The command line: a Typer app with one small module per command.

Exit codes (all commands): 0 success; 1 a check or verification failed;
2 bad input or arguments (one line on stderr); 3 an unexpected internal error
(``--debug`` shows the traceback); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import warnings
from typing import NoReturn

import typer

from bnfold import __version__
from bnfold.cli import check as _check
from bnfold.cli import fuse as _fuse
from bnfold.cli import inspect as _inspect
from bnfold.cli import recalibrate as _recalibrate

app = typer.Typer(
    name="bnfold",
    help="BatchNorm analysis and exact inference folding, proven in onnxruntime.\n\n"
    "Exit codes: 0 ok, 1 a check/verification failed, 2 bad input or arguments, "
    "3 internal error, 130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bnfold {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """BatchNorm analysis and exact inference folding."""


app.command("inspect")(_inspect.inspect_command)
app.command("fuse")(_fuse.fuse_command)
app.command("check")(_check.check_command)
app.command("recalibrate")(_recalibrate.recalibrate_command)


def main() -> None:
    # torch and the exporters warn about their own deprecations on every call; a user of
    # bnfold can act on none of it, and it would bury the one line bnfold prints.
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", module=r"(torch|onnxscript|onnx)(\..*)?$")
    try:
        app()
        code: object = 0
    except SystemExit as e:
        code = e.code
    _leave(code)


def _leave(code: object) -> NoReturn:
    """Exit without unloading the libraries.

    Python's own shutdown tears torch, onnxruntime and the exporters down, which takes
    this machine about 0.5 s and makes about 130 MB more resident (``python -c "import
    torch, torchvision, onnx, onnxruntime, onnxscript"``: 736 MB resident when the script
    ends, a peak of 865 MB by the time the process is gone), so the peak memory of a run
    would be its exit.  Every output of bnfold is closed and in place by now; the exit
    handlers still run and the streams are flushed.
    """
    if code is None:
        code = 0
    elif not isinstance(code, int):
        sys.stderr.write(f"{code}\n")
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # e.g. a closed pipe
            stream.flush()
    os._exit(code)

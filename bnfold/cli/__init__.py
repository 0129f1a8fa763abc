"""The command line: a Typer app with one small module per command.

Exit codes (all commands): 0 success; 1 a check or verification failed;
2 bad input or arguments (one line on stderr); 3 an unexpected internal error
(``--debug`` shows the traceback); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import warnings

import typer

from bnfold import __version__
from bnfold.cli import check as _check
from bnfold.cli import fuse as _fuse
from bnfold.cli import inspect as _inspect

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


def main() -> None:
    # torch and the exporters warn about their own deprecations on every call; a user of
    # bnfold can act on none of it, and it would bury the one line bnfold prints.
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", module=r"(torch|onnxscript|onnx)(\..*)?$")
    app()

"""What every command shares: consoles, the one error exit, progress, option parsing."""

from __future__ import annotations

import contextlib
import enum
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from bnfold.errors import BnfoldError

if TYPE_CHECKING:
    from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])


class OutputFormat(str, enum.Enum):
    table = "table"
    json = "json"
    markdown = "markdown"


# rich is imported when a console is made, not with the command line: the text formats
# never need it (~30 ms of ``check --format json``)


def stdout_console() -> Console:
    from rich.console import Console

    # markup off: model and layer names are never read as rich markup
    return Console(markup=False, highlight=False, emoji=False)


def stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, markup=False, highlight=False, emoji=False)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on one line of stderr; return the Exit to raise."""
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    sys.stderr.flush()
    return typer.Exit(code)


def handle_errors(fn: F) -> F:
    """The single exit point: BnfoldError -> one line + its code; the rest -> code 3."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug")) or os.environ.get("BNFOLD_DEBUG") == "1"
        try:
            with _interrupts_remembered():
                return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except BnfoldError as e:
            if debug:
                traceback.print_exc()
            raise fail(e.one_line(), e.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except Exception as e:  # noqa: BLE001 - the last line of defence
            if debug:
                traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise fail(
                f"internal error: {type(e).__name__}: {first} (re-run with --debug for the "
                "traceback and please report it)",
                3,
            ) from None

    return wrapper  # type: ignore[return-value]


_interrupted = False


@contextlib.contextmanager
def _interrupts_remembered() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered, so that a step
    whose library code swallowed the exception (C++ code that clears Python errors) still
    stops at its end (``Progress.step``)."""
    global _interrupted
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:  # SIG_IGN, or someone else's handler
        yield
        return

    def remember(signum: int, frame: Any) -> None:
        global _interrupted
        _interrupted = True
        raise KeyboardInterrupt

    _interrupted = False
    signal.signal(signal.SIGINT, remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupted = False  # a later command in this process starts afresh


def raise_if_interrupted() -> None:
    """KeyboardInterrupt if Ctrl-C came and was swallowed on its way (see above)."""
    if _interrupted:
        raise KeyboardInterrupt


class Progress:
    """Named steps on stderr while they run; silent unless stderr is a terminal."""

    def __init__(self, enabled: bool | None = None):
        self.console = None if enabled is False else stderr_console()
        self.enabled = self.console is not None and (enabled or self.console.is_terminal)

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        raise_if_interrupted()
        if not self.enabled or self.console is None:
            yield
        else:
            with self.console.status(label + " …"):
                yield
        raise_if_interrupted()


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise BnfoldError(f"--arch-kwargs is not valid JSON ({e.msg})") from e
    if not isinstance(value, dict):
        raise BnfoldError("--arch-kwargs must be a JSON object, like '{\"num_classes\": 10}'")
    return value


def parse_thresholds(items: list[str] | None) -> dict[str, float]:
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise BnfoldError(f"--threshold {item!r} is not NAME=NUMBER")
    return out


# Options shared by the commands that load a PyTorch model.
ARCH = typer.Option(
    None,
    "--arch",
    metavar="SPEC",
    help="Architecture for a bare state_dict: package.module:callable, path/file.py:callable, "
    "torchvision:NAME or timm:NAME.",
)
ARCH_KWARGS = typer.Option(
    None, "--arch-kwargs", metavar="JSON", help="Keyword arguments for --arch, as a JSON object."
)
TRUST_PICKLE = typer.Option(
    False,
    "--trust-pickle",
    help="Allow unpickling whole Python objects (runs code from the file). Only for files "
    "you trust.",
)
INPUT_SHAPE = typer.Option(
    None,
    "--input-shape",
    metavar="N,C,H,W",
    help="Input shape, e.g. 1,3,224,224; repeat for several inputs. Inferred when the first "
    "layer decides it.",
)
DEBUG = typer.Option(False, "--debug", help="Show tracebacks of errors.")

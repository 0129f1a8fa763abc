"""The safe-unpickling gate: what bnfold lets a pickle from a model file turn into.

Without ``--trust-pickle`` every pickle bnfold lets anything load goes through
torch's weights-only unpickler (``torch.load(weights_only=True)``, a re-implementation
of the pickle machine that resolves every ``GLOBAL``/``STACK_GLOBAL`` through the memo
and the stack exactly as ``pickle`` would, and accepts only tensor-rebuilding
functions, plain containers and a few torch types).  A pickle it refuses is refused
here (``UnsafePickleError``); no hand-written scan of opcodes decides anything.

ZIP archives are measured before a single member is read: a member's declared
(uncompressed) size is what both Python's ``zipfile`` and torch's reader allocate,
so a small archive that declares gigabytes is refused first (limits below).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bnfold.errors import LoadError, UnsafePickleError

__all__ = [
    "MAX_RATIO",
    "RATIO_FLOOR",
    "check_record_sizes",
    "check_zip_sizes",
    "forced_weights_only",
    "load_weights_only",
]

# torch.save and torch.export.save store every member uncompressed (ratio 1) and
# torch.jit.save deflates only its code (text, 2-3x), so genuine archives are far inside
# both limits. A member re-compressed by
# hand (``zip -r``) shrinks float weights by 1.1-1.5x and constant buffers by far more,
# which is why small members may have any ratio: only a member that declares more than
# RATIO_FLOOR bytes *and* more than MAX_RATIO times what it occupies is a bomb. The
# whole archive may declare at most MAX_RATIO times its size plus RATIO_FLOOR.
MAX_RATIO = 200
RATIO_FLOOR = 8 << 20  # 8 MiB


def check_zip_sizes(zf: zipfile.ZipFile, archive_size: int, path: Path, where: str = "") -> None:
    """Refuse a ZIP archive whose members declare absurdly more bytes than it holds."""
    total = 0
    for info in zf.infolist():
        size = info.file_size
        total += size
        if size > RATIO_FLOOR and size > MAX_RATIO * max(info.compress_size, 1):
            raise LoadError(
                f"member {where}{info.filename} would inflate {info.compress_size} bytes to "
                f"{size} bytes (over {MAX_RATIO}x): refused as a ZIP bomb",
                path=path,
            )
    if total > MAX_RATIO * archive_size + RATIO_FLOOR:
        raise LoadError(
            f"the archive{' ' + where.rstrip('/') if where else ''} declares {total} bytes of "
            f"members in {archive_size} bytes (over {MAX_RATIO}x): refused as a ZIP bomb",
            path=path,
        )


def check_record_sizes(path: Path, archive_size: int) -> None:
    """The total limit again, as torch's own ZIP reader (miniz) sees the archive, which
    is what torch.load and torch.export.load allocate from: two readers of one central
    directory must not disagree about a bomb."""
    import torch

    try:
        reader = torch._C.PyTorchFileReader(str(path))
        total = sum(reader.get_record_size(name) for name in reader.get_all_records())
    except Exception:  # noqa: BLE001 - not an archive torch reads; its loader says why
        return
    if total > MAX_RATIO * archive_size + RATIO_FLOOR:
        raise LoadError(
            f"the archive declares {total} bytes of members in {archive_size} bytes (over "
            f"{MAX_RATIO}x): refused as a ZIP bomb",
            path=path,
        )


def load_weights_only(data: bytes, path: Path, member: str) -> Any:
    """Unpickle ``data`` (a torch.save file, zip or legacy) with torch's weights-only
    unpickler; UnsafePickleError when it names anything else, LoadError when corrupt."""
    import torch

    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as inner:
                check_zip_sizes(inner, len(data), path, where=f"{member}/")
        except zipfile.BadZipFile as e:
            raise LoadError(f"member {member} is a corrupt ZIP archive", path=path) from e
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(
            f"member {member} holds a pickle torch's weights-only unpickler refuses "
            f"({_first_line(e)}); loading it otherwise could run code from the file",
            hint="re-run with --trust-pickle only if you trust where the file came from",
            path=path,
        ) from e
    except Exception as e:
        raise LoadError(f"member {member} is a corrupt pickle ({_first_line(e)})", path=path) from e


@contextlib.contextmanager
def forced_weights_only() -> Iterator[None]:
    """Every ``torch.load`` inside runs weights-only, even one that asks for
    ``weights_only=False`` (torch reads ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` on every call).

    A second line of defence around library code (``torch.export.load``) whose pickles
    were already checked with ``load_weights_only``.
    """
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # both set is an error
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _first_line(e: BaseException) -> str:
    """The useful part of torch's weights-only error: what it refused."""
    text = str(e)
    if found := re.search(r"GLOBAL ([\w.]+)", text):
        return f"it names {found.group(1)}"
    if found := re.search(r"Unsupported operand (\d+)", text):
        return f"it uses pickle opcode {int(found.group(1)):#04x}, which that unpickler refuses"
    if found := re.search(r"WeightsUnpickler error:\s*(\S.*)", text):
        return found.group(1)[:200]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]

"""Loading: a path on disk -> a model bnfold can analyse, plus what format it was.

The format is detected from the file's content, never from its extension:

- a ZIP archive holding ``*/archive_format``     -> torch.export program (``.pt2``)
- a ZIP archive holding ``*/constants.pkl``/code -> TorchScript (``torch.jit.save``)
- a ZIP archive holding ``*/data.pkl``            -> ``torch.save`` (state_dict, checkpoint
  or a whole pickled module)
- a pickle stream (first byte 0x80)               -> legacy ``torch.save``
- 8-byte little-endian length + JSON header       -> safetensors
- a protobuf ModelProto with a graph and opsets   -> ONNX

Only regular files are read (a FIFO would block, ``/dev/zero`` never ends), and a ZIP
archive is measured before any member is read (``safe_pickle.check_zip_sizes``).

Security, unless ``trust_pickle=True``: every pickle that anything loads goes through
torch's weights-only unpickler (``torch.load(weights_only=True)``), so a file that
needs arbitrary pickled Python objects (a whole ``nn.Module``) is refused.  torch.export
archives are checked member by member before ``torch.export.load`` reads them, and
their program after (``bnfold.pt2_guard``).  TorchScript archives are read by torch's
C++ unpickler, which cannot import Python code.  Builders named by ``--arch`` never
download: a builder that tries is refused.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import importlib
import importlib.util
import inspect
import io
import itertools
import json
import logging
import os
import pickletools
import re
import stat
import struct
import sys
import zipfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnfold.errors import ArchError, BnfoldError, LoadError, UnsafePickleError
from bnfold.safe_pickle import check_record_sizes, check_zip_sizes

if TYPE_CHECKING:
    import onnx
    import torch

__all__ = ["LoadedModel", "ModelFormat", "build_arch", "load_model", "load_onnx"]


class ModelFormat(str, enum.Enum):
    MODULE = "module"  # an nn.Module handed over in memory (the Python API)
    STATE_DICT = "state_dict"
    CHECKPOINT = "checkpoint"
    PICKLED_MODULE = "pickled_module"
    TORCHSCRIPT = "torchscript"
    EXPORTED_PROGRAM = "torch_export"
    SAFETENSORS = "safetensors"
    ONNX = "onnx"


@dataclass
class LoadedModel:
    """A model as loaded: always its path and format, then what the format carries."""

    path: Path
    format: ModelFormat
    state_dict: dict[str, torch.Tensor] | None = None
    module: torch.nn.Module | None = None  # the architecture, when known
    onnx_model: onnx.ModelProto | None = None
    arch: str | None = None
    notes: list[str] = field(default_factory=list)
    example_inputs: tuple[torch.Tensor, ...] | None = None  # saved with torch.export archives

    @property
    def architecture_known(self) -> bool:
        return self.module is not None or self.onnx_model is not None


_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "ema")
_NESTING = 4  # checkpoint keys followed at most this deep: {'model': {'state_dict': ...}}
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
_SAFETENSORS_MAX_HEADER = 100 << 20  # the safetensors library's own limit


def load_model(
    path: Path,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Load ``path`` whatever its format; with ``arch`` build that architecture and fill it."""
    path = Path(path)
    head, size = _read_head(path)
    if head[:4] == b"PK\x03\x04":
        loaded = _load_zip(path, size, trust_pickle=trust_pickle)
    elif head[:1] == b"\x80":
        loaded = _load_torch_save(path, trust_pickle=trust_pickle)
    elif _looks_like_safetensors(head, size):
        loaded = LoadedModel(
            path, ModelFormat.SAFETENSORS, state_dict=_load_safetensors(path, size)
        )
    elif _looks_like_text(head):
        raise LoadError(
            "this is a text file, not a model",
            hint="pass a file saved by torch.save, torch.jit.save, torch.export.save, "
            "safetensors or ONNX",
            path=path,
        )
    else:
        loaded = LoadedModel(path, ModelFormat.ONNX, onnx_model=load_onnx(path))
    if arch is not None:
        if loaded.format in (ModelFormat.ONNX,):
            raise ArchError("--arch does not apply to ONNX models", path=path)
        if loaded.module is None:
            assert loaded.state_dict is not None
            loaded.module, notes = _build_filled(arch, arch_kwargs or {}, loaded.state_dict, path)
            loaded.notes.extend(notes)
            loaded.module.eval()
            loaded.arch = arch
        else:
            loaded.notes.append(f"--arch {arch} ignored: the file carries its architecture")
    return loaded


# --------------------------------------------------------------------------- sniffing


def _read_head(path: Path) -> tuple[bytes, int]:
    """The first 512 bytes and the size of a regular file; LoadError for anything else.

    The file is opened non-blocking and checked with fstat, so a FIFO (which would block
    the open or the read) or a device (``/dev/zero`` never ends) is refused before a
    single byte is read from it.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise LoadError("no such file", hint="check the path", path=path) from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise LoadError(f"cannot read: {getattr(e, 'strerror', None) or e}", path=path) from e
    if stat.S_ISDIR(st.st_mode):
        raise LoadError("is a directory, not a model file", path=path)
    if not stat.S_ISREG(st.st_mode):
        raise LoadError(_not_regular(st.st_mode), path=path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):  # swapped for something else since the stat
                raise LoadError(_not_regular(st.st_mode), path=path)
            head = f.read(512)
    except OSError as e:
        raise LoadError(f"cannot read: {e.strerror}", path=path) from e
    if not head:
        raise LoadError("the file is empty", path=path)
    return head, st.st_size


def _not_regular(mode: int) -> str:
    kind = (
        "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a regular file"
    )
    return f"is {kind}, not a model file; bnfold reads regular files only"


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 10 or head[8:9] != b"{":
        return False
    (n,) = struct.unpack("<Q", head[:8])
    # a JSON object right after the length: '{"' or '{}' (ONNX files never start so)
    return 0 < n <= size - 8 or head[8:10] in (b'{"', b"{}")


# --------------------------------------------------------------------------- zip archives


def _load_zip(path: Path, size: int, *, trust_pickle: bool) -> LoadedModel:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            check_zip_sizes(zf, size, path)
        check_record_sizes(path, size)
    except LoadError:
        raise
    except Exception as e:
        # NotImplementedError, ... on damaged central directories
        raise LoadError(f"corrupt or truncated archive ({_short(e)})", path=path) from e
    if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
        return _load_exported(path, names, trust_pickle=trust_pickle)
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return _load_torchscript(path)
    if any(n.endswith("data.pkl") for n in names):
        return _load_torch_save(path, trust_pickle=trust_pickle)
    raise LoadError(
        "a ZIP archive that is not a PyTorch model (no data.pkl, TorchScript code or "
        "torch.export program inside)",
        path=path,
    )


def _load_torch_save(path: Path, *, trust_pickle: bool) -> LoadedModel:
    import pickle

    import torch

    try:
        with path.open("rb") as f:  # a file object: torch.load must not go by the extension
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if _pickle_unreadable(path):
            raise LoadError(
                "corrupt torch.save file (its pickle cannot be parsed)", path=path
            ) from e
        if not trust_pickle:
            raise UnsafePickleError(
                "holds pickled Python objects (for example a whole nn.Module saved with "
                "torch.save(model)); loading them runs code from the file",
                hint="save model.state_dict() instead and pass --arch, or re-run with "
                "--trust-pickle if you trust where the file came from",
                path=path,
            ) from e
        try:
            with path.open("rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=False)
        except ModuleNotFoundError as e2:
            raise LoadError(
                f"unpickling failed: the pickled classes live in module {e2.name!r}, which is "
                "not importable here",
                hint="add its folder to PYTHONPATH, or save a state_dict and pass --arch",
                path=path,
            ) from e2
        except Exception as e2:
            raise LoadError(f"unpickling failed: {type(e2).__name__}: {e2}", path=path) from e2
    except Exception as e:
        raise LoadError(f"corrupt or truncated torch.save file ({_short(e)})", path=path) from e
    return _classify(path, obj)


def _classify(path: Path, obj: Any) -> LoadedModel:
    import torch

    if isinstance(obj, torch.nn.Module):
        return LoadedModel(
            path, ModelFormat.PICKLED_MODULE, state_dict=dict(obj.state_dict()), module=obj
        )
    if not isinstance(obj, Mapping):
        raise LoadError(
            f"holds a {type(obj).__name__}, not a model, state_dict or checkpoint", path=path
        )
    if _is_state_dict(obj):
        sd, notes = _clean_keys(dict(obj))
        return LoadedModel(path, ModelFormat.STATE_DICT, state_dict=sd, notes=notes)
    found = _find_in_checkpoint(obj, ())
    if found is not None:
        keys, inner = found
        where = " → ".join(repr(k) for k in keys)
        if isinstance(inner, torch.nn.Module):
            loaded = LoadedModel(
                path, ModelFormat.CHECKPOINT, state_dict=dict(inner.state_dict()), module=inner
            )
            loaded.notes.append(f"module taken from checkpoint key {where}")
            return loaded
        sd, notes = _clean_keys(dict(inner))
        if any("lightning" in str(k) for k in obj):
            sd, more = _strip_common_prefix(sd)
            notes += more
        loaded = LoadedModel(path, ModelFormat.CHECKPOINT, state_dict=sd, notes=notes)
        loaded.notes.insert(0, f"state_dict taken from checkpoint key {where}")
        return loaded
    raise LoadError(
        "a dict with no tensors and no state_dict under any of the keys "
        + ", ".join(repr(k) for k in _STATE_DICT_KEYS)
        + f" (followed {_NESTING} levels deep)",
        hint="save model.state_dict() or a checkpoint with a 'state_dict' key",
        path=path,
    )


def _find_in_checkpoint(
    obj: Mapping[Any, Any], keys: tuple[str, ...]
) -> tuple[tuple[str, ...], Any] | None:
    """The first state_dict (or module) under the known keys, breadth first, with its path:
    ``{'model': {'state_dict': sd}}`` gives ``(('model', 'state_dict'), sd)``."""
    import torch

    level: list[tuple[tuple[str, ...], Mapping[Any, Any]]] = [(keys, obj)]
    for _ in range(_NESTING):
        deeper = []
        for where, mapping in level:
            for key in _STATE_DICT_KEYS:
                inner = mapping.get(key)
                if isinstance(inner, torch.nn.Module) or (
                    isinstance(inner, Mapping) and inner and _is_state_dict(inner)
                ):
                    return (*where, key), inner
                if isinstance(inner, Mapping):
                    deeper.append(((*where, key), inner))
        level = deeper
    return None


def _is_state_dict(obj: Mapping[Any, Any]) -> bool:
    import torch

    values = list(obj.values())
    return (
        bool(values)
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in values)
    )


def _clean_keys(sd: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    notes = []
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
        notes.append("stripped the 'module.' prefix (DataParallel/DDP)")
    return sd, notes


def _strip_common_prefix(sd: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    firsts = {k.split(".", 1)[0] for k in sd}
    if len(firsts) == 1 and all("." in k for k in sd):
        (prefix,) = firsts
        return {k.split(".", 1)[1]: v for k, v in sd.items()}, [
            f"stripped the common '{prefix}.' prefix"
        ]
    return sd, []


def _pickle_unreadable(path: Path) -> bool:
    """Whether the file's main pickle cannot even be parsed (corrupt, not hostile).

    Only chooses the wording of the error: whether the pickle is *safe* is decided by
    torch's weights-only unpickler, never here.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next(n for n in zf.namelist() if n.endswith("data.pkl"))
                data = zf.read(name)
        else:
            data = path.read_bytes()
        for _ in pickletools.genops(data):
            pass
    except Exception:  # noqa: BLE001 - whatever stops the parse makes it unreadable
        return True
    return False


def _load_torchscript(path: Path) -> LoadedModel:
    import torch

    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise LoadError(f"corrupt TorchScript archive ({_short(e)})", path=path) from e
    return LoadedModel(
        path, ModelFormat.TORCHSCRIPT, state_dict=dict(module.state_dict()), module=module
    )


def _load_exported(path: Path, names: list[str], *, trust_pickle: bool) -> LoadedModel:
    import torch

    from bnfold import pt2_guard
    from bnfold.safe_pickle import forced_weights_only

    pt2_guard.check_archive(path, names, trust_pickle=trust_pickle)
    notes = pt2_guard.register_pytree_types(pt2_guard.pytree_types(path), path)
    export_logger = logging.getLogger("torch.export")
    level = export_logger.level
    export_logger.setLevel(logging.CRITICAL)  # torch logs tracebacks for corrupt archives
    weights_only = contextlib.nullcontext() if trust_pickle else forced_weights_only()
    try:
        with weights_only, path.open("rb") as f:
            ep = torch.export.load(f)
    except Exception as e:
        raise LoadError(f"corrupt torch.export archive ({_short(e)})", path=path) from e
    finally:
        export_logger.setLevel(level)
    if not trust_pickle:
        pt2_guard.check_program(ep, path)
    try:
        # the guards are Python source from the file that module() would exec
        module = ep.module() if trust_pickle else ep.module(check_guards=False)
    except Exception as e:
        raise LoadError(f"corrupt torch.export archive ({_short(e)})", path=path) from e
    sd = dict(ep.state_dict)
    sd.update({k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    loaded = LoadedModel(
        path, ModelFormat.EXPORTED_PROGRAM, state_dict=sd, module=module, notes=notes
    )
    example = getattr(ep, "example_inputs", None)
    if (
        example
        and isinstance(example[0], tuple)
        and not example[1]
        and all(isinstance(t, torch.Tensor) for t in example[0])
    ):
        loaded.example_inputs = tuple(example[0])
    return loaded


# --------------------------------------------------------------------------- safetensors


def _load_safetensors(path: Path, size: int) -> dict[str, torch.Tensor]:
    """Parse a safetensors file: every entry checked against the file before any read.

    Entries must lie inside the data section without overlapping, so the tensors read
    never add up to more than the file.
    """
    import torch

    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > _SAFETENSORS_MAX_HEADER:
            raise LoadError(
                f"corrupt safetensors header (declares {n} bytes; the file has {size})",
                path=path,
            )
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise LoadError(f"corrupt safetensors header ({_short(e)})", path=path) from e
        data_start = 8 + n
        data_size = size - data_start
        if not isinstance(header, dict):
            raise LoadError("corrupt safetensors header (not a JSON object)", path=path)
        entries = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            entries.append((*_safetensors_entry(name, info, data_size, path), name))
        entries.sort(key=lambda e: (e[0], e[1]))
        end_of_previous, previous = 0, ""
        for begin, end, _dtype, _shape, name in entries:
            if begin < end_of_previous and begin != end:
                raise LoadError(
                    f"corrupt safetensors file: {name!r} overlaps {previous!r} (aliased "
                    "data would be read twice)",
                    path=path,
                )
            if end > end_of_previous:
                end_of_previous, previous = end, name
        out: dict[str, torch.Tensor] = {}
        for begin, end, dtype, shape, name in sorted(entries, key=lambda e: e[0]):
            raw = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(data_start + begin)
            if end > begin and f.readinto(raw.numpy()) != end - begin:  # type: ignore[arg-type]
                raise LoadError(
                    f"truncated safetensors file: {name!r} lies past the end", path=path
                )
            out[name] = raw.view(dtype).reshape(shape)
    if not out:
        raise LoadError("the safetensors file holds no tensors", path=path)
    ordered = {name: out[name] for name in header if name in out}  # the file's order
    return _clean_keys(ordered)[0]


def _safetensors_entry(
    name: str, info: Any, data_size: int, path: Path
) -> tuple[int, int, torch.dtype, list[int]]:
    import torch

    def bad(why: str) -> LoadError:
        return LoadError(f"corrupt safetensors entry for {name!r} ({why})", path=path)

    if not isinstance(info, dict):
        raise bad("not a JSON object")
    dtype_name = _SAFETENSORS_DTYPES.get(info.get("dtype"))  # type: ignore[arg-type]
    dtype = getattr(torch, dtype_name, None) if dtype_name else None
    if dtype is None:
        raise bad(f"unknown dtype {str(info.get('dtype'))[:20]!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise bad("its shape is not a list of non-negative integers")
    if any(s >= 2**63 for s in shape):
        raise bad("its shape has a dimension torch cannot hold")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise bad("its data_offsets are not two non-negative integers")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise LoadError(f"truncated safetensors file: {name!r} lies past the end", path=path)
    numel = 1
    for s in shape:
        numel *= s  # Python integers: 2**70 does not wrap
    if numel * dtype.itemsize != end - begin:
        raise bad("size mismatch: its shape and dtype need another byte count")
    return begin, end, dtype, shape


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


# --------------------------------------------------------------------------- ONNX


def load_onnx(path: Path) -> onnx.ModelProto:
    """Parse an ONNX file and its external data (which must stay inside its folder)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise LoadError(
            "not a model bnfold can read (not a PyTorch, safetensors or ONNX file, or "
            "a corrupt/truncated one)",
            path=path,
        ) from e
    if model.ir_version <= 0 or not model.opset_import or not model.HasField("graph"):
        raise LoadError(
            "not a model bnfold can read (not a PyTorch, safetensors or ONNX file, or "
            "a corrupt/truncated one)",
            path=path,
        )
    _load_external_data(model, path)
    return model


# ONNX element types narrower than a byte, packed: bits per element in raw_data, and
# elements per int32_data entry (onnx.numpy_helper.to_array's unpacking)
_SUB_BYTE = {"UINT4": (4, 2), "INT4": (4, 2), "FLOAT4E2M1": (4, 2), "UINT2": (2, 4),
             "INT2": (2, 4), "FLOAT6E2M3": (6, 1), "FLOAT6E3M2": (6, 1)}  # fmt: skip


def _tensor_layout(tensor: Any, path: Path) -> tuple[int, int | None, str | None, int]:
    """(element count, raw byte count, typed field, typed entry count) of an ONNX tensor;
    LoadError when its element type is unknown or a dimension is negative."""
    kind = _element_type(tensor.data_type)
    if kind is None:
        raise LoadError(
            f"tensor {tensor.name!r} has element type {tensor.data_type}, which ONNX does not "
            "define",
            path=path,
        )
    name, typed, itemsize = kind
    numel = 1
    for d in tensor.dims:
        if d < 0:
            raise LoadError(f"tensor {tensor.name!r} has a negative dimension {d}", path=path)
        numel *= d
    if name == "STRING":
        return numel, None, typed, numel
    if name in _SUB_BYTE:
        bits, per_entry = _SUB_BYTE[name]
        return numel, -(-numel * bits // 8), typed, -(-numel // per_entry)
    per = 2 if name.startswith("COMPLEX") else 1
    return numel, numel * itemsize, typed, numel * per


@functools.lru_cache(maxsize=64)
def _element_type(data_type: int) -> tuple[str, str, int] | None:
    """(name, typed field, bytes per element) of an ONNX element type; None if undefined."""
    import onnx

    if data_type not in onnx.TensorProto.DataType.values() or data_type == 0:
        return None
    name = onnx.TensorProto.DataType.Name(data_type)
    typed = onnx.helper.tensor_dtype_to_field(data_type)
    if name == "STRING":
        return name, typed, 0
    return name, typed, onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize


def _check_inline_tensor(tensor: Any, path: Path) -> None:
    """The data stored in the model holds exactly what its shape and type say."""
    numel, raw, typed, entries = _tensor_layout(tensor, path)
    if tensor.HasField("raw_data") and raw is not None:
        got = len(tensor.raw_data)
        if got != raw:
            raise LoadError(
                f"tensor {tensor.name!r} holds {got} bytes of data; its shape and type need {raw}",
                path=path,
            )
        return
    count = len(getattr(tensor, typed)) if typed else 0
    if count != entries and (numel or count):
        raise LoadError(
            f"tensor {tensor.name!r} holds {count} values; its shape needs {entries}", path=path
        )


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    base = path.resolve().parent
    external = []
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            external.append(tensor)
        else:
            _check_inline_tensor(tensor, path)
    ranges: dict[Path, list[tuple[int, int, str]]] = {}
    for tensor in external:
        target, offset, nbytes = _external_range(tensor, base, path)
        ranges.setdefault(target, []).append((offset, offset + nbytes, tensor.name))
    for spans in ranges.values():
        spans.sort()
        for (_, end, first), (begin, _, second) in itertools.pairwise(spans):
            if begin < end:
                raise LoadError(
                    f"external data of {second!r} overlaps that of {first!r} (aliased data "
                    "would be read twice)",
                    path=path,
                )
    if external:
        import onnx.external_data_helper as edh

        try:
            edh.load_external_data_for_model(model, str(base))
        except (OSError, ValueError) as e:
            raise LoadError(f"cannot read external data ({e})", path=path) from e
        for tensor in external:
            _, raw, _, _ = _tensor_layout(tensor, path)
            if len(tensor.raw_data) != raw:
                raise LoadError(f"external data of {tensor.name!r} is truncated", path=path)


def _external_range(tensor: Any, base: Path, path: Path) -> tuple[Path, int, int]:
    """(file, offset, byte count) of one tensor's external data, every field checked."""
    fields = {entry.key: entry.value for entry in tensor.external_data}
    name = tensor.name
    location = fields.get("location", "")
    if not location or "\0" in location:
        raise LoadError(
            f"external data of {name!r} has {'no' if not location else 'a NUL byte in its'} "
            "location",
            path=path,
        )
    for key in ("offset", "length"):
        value = fields.get(key)
        if value is not None and not re.fullmatch(r"[0-9]{1,19}", value):
            raise LoadError(
                f"external data of {name!r} has {key} {value[:30]!r}, not a non-negative integer",
                path=path,
            )
    target = (base / location).resolve()
    if not target.is_relative_to(base):
        raise LoadError(
            f"external data of {name!r} points outside the model's folder ({location}); refused",
            path=path,
        )
    if not target.exists():
        raise LoadError(f"external data file {location!r} of {name!r} is missing", path=path)
    if not target.is_file():
        raise LoadError(
            f"external data file {location!r} of {name!r} is not a regular file", path=path
        )
    _, raw, _, _ = _tensor_layout(tensor, path)
    if raw is None:
        raise LoadError(f"tensor {name!r} holds strings in external data", path=path)
    offset = int(fields.get("offset", 0))
    size = target.stat().st_size
    length = int(fields["length"]) if "length" in fields else size - offset
    if length != raw:
        raise LoadError(
            f"external data of {name!r} declares {length} bytes; its shape and type need {raw}",
            path=path,
        )
    if offset + length > size:
        raise LoadError(
            f"external data of {name!r} is truncated: it needs bytes {offset}..{offset + length} "
            f"of {location!r}, which has {size}",
            path=path,
        )
    return target, offset, length


# --------------------------------------------------------------------------- --arch


def build_arch(spec: str, kwargs: Mapping[str, Any]) -> torch.nn.Module:
    """Build the architecture named by ``spec``, never downloading anything.

    ``torchvision:NAME`` (``weights=None``, and ``weights_backbone=None`` where the
    builder takes it), ``timm:NAME`` (``pretrained=False``), ``transformers:CLASS``
    (``CLASS(CLASS.config_class(**kwargs))``), ``package.module:callable`` or
    ``path/to/file.py:callable``; ``kwargs`` go to the callable (or the config).
    """
    import torch

    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise ArchError(
            f"--arch {spec!r} is not of the form package.module:callable, "
            "path/file.py:callable, torchvision:NAME, timm:NAME or transformers:CLASS"
        )
    # what a builder prints (ultralytics' model summary) is not bnfold's output: stdout
    # carries the report alone (--format json must parse)
    with _no_downloads() as attempts, contextlib.redirect_stdout(io.StringIO()):
        try:
            model = _call_builder(source, name, spec, dict(kwargs))
        except ArchError:
            raise
        except Exception as e:
            if attempts:
                raise _download_error(spec, attempts) from e
            raise ArchError(f"--arch {spec!r} could not be built: {_short(e)}") from e
    if attempts:
        raise _download_error(spec, attempts)
    if not isinstance(model, torch.nn.Module):
        raise ArchError(f"--arch {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def _call_builder(source: str, name: str, spec: str, kwargs: dict[str, Any]) -> Any:
    if source == "torchvision":
        try:
            import torchvision
        except ImportError as e:
            raise ArchError(
                "--arch torchvision:... needs torchvision", hint="pip install torchvision"
            ) from e
        _refuse_weight_kwargs(spec, kwargs, ("weights", "weights_backbone"))
        try:
            builder = torchvision.models.get_model_builder(name)
        except ValueError as e:
            raise ArchError(f"--arch {spec!r} could not be built: {_short(e)}") from e
        no_weights = {"weights": None}
        if "weights_backbone" in inspect.signature(builder).parameters:
            no_weights["weights_backbone"] = None
        return builder(**no_weights, **kwargs)
    if source == "timm":
        try:
            import timm
        except ImportError as e:
            raise ArchError("--arch timm:... needs timm", hint="pip install timm") from e
        _refuse_weight_kwargs(spec, kwargs, ("pretrained",))
        return timm.create_model(name, pretrained=False, **kwargs)
    if source == "transformers":
        try:
            import transformers
        except ImportError as e:
            raise ArchError(
                "--arch transformers:... needs transformers", hint="pip install transformers"
            ) from e
        cls = getattr(transformers, name, None)
        config_class = getattr(cls, "config_class", None)
        if not isinstance(cls, type) or config_class is None:
            raise ArchError(
                f"--arch {spec!r}: transformers has no model class {name!r} with a config class",
                hint="name a model class, e.g. transformers:ResNetForImageClassification",
            )
        return cls(config_class(**kwargs))
    factory = _import_callable(source, name, spec)
    return factory(**kwargs)


def _refuse_weight_kwargs(spec: str, kwargs: Mapping[str, Any], names: tuple[str, ...]) -> None:
    given = [k for k in names if kwargs.get(k) not in (None, False)]
    if given:
        raise ArchError(
            f"--arch {spec!r}: --arch-kwargs asks for pretrained weights ({', '.join(given)}); "
            "bnfold never downloads, the weights come from the model file",
            hint=f"drop {', '.join(repr(k) for k in given)} from --arch-kwargs",
        )


class _DownloadBlocked(ConnectionError):
    """Raised in place of any network access or torch.hub download while building."""


@contextlib.contextmanager
def _no_downloads() -> Iterator[list[str]]:
    """While building: torch.hub's downloads (wherever their names were imported to) and
    every socket connection raise ``_DownloadBlocked``; the attempts are listed."""
    import socket

    import torch.hub

    attempts: list[str] = []

    def blocked(what: str) -> Any:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            target = next((a for a in args if isinstance(a, (str, tuple))), "")
            attempts.append(f"{what}({str(target)[:80]})")
            raise _DownloadBlocked(f"bnfold blocked a download: {what}")

        return refuse

    patches: list[tuple[Any, str, Any]] = []  # (owner, attribute, what to restore)
    # torch.hub's two download functions, in every module that imported them by name
    # (torchvision binds load_state_dict_from_url in its own modules): a cached file would
    # be returned without any network access
    names = ("load_state_dict_from_url", "download_url_to_file")
    hub = {id(getattr(torch.hub, n)): n for n in names}
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None) or {}  # never a module's __getattr__
        for attr in names:
            value = namespace.get(attr)
            if value is not None and hub.get(id(value)) == attr:
                patches.append((module, attr, value))
    for attr in ("getaddrinfo", "create_connection"):
        patches.append((socket, attr, getattr(socket, attr)))
    for attr in ("connect", "connect_ex"):  # inherited from _socket.socket: delete after
        patches.append((socket.socket, attr, socket.socket.__dict__.get(attr, _INHERITED)))
    try:
        for owner, attr, _ in patches:
            setattr(owner, attr, blocked(f"{getattr(owner, '__name__', owner)}.{attr}"))
        yield attempts
    finally:
        for owner, attr, original in reversed(patches):
            if original is _INHERITED:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)


_INHERITED = object()


def _download_error(spec: str, attempts: list[str]) -> ArchError:
    return ArchError(
        f"--arch {spec!r}: the builder tried to download ({attempts[0]}); bnfold never downloads",
        hint="pass --arch-kwargs that build it without pretrained weights, or build it in "
        "your own file (path/to/file.py:callable)",
    )


def _import_callable(
    source: str, name: str, spec: str, option: str = "--arch", error: type[BnfoldError] = ArchError
) -> Any:
    """The object ``name`` of ``source`` (a dotted module, found from the current folder
    too, or a ``path/file.py``): ``--arch``'s builders and ``--data``'s callables."""
    if source.endswith(".py"):
        file = Path(source)
        if not file.is_file():
            raise error(f"{option} {spec!r}: no such file {source}")
        mod_spec = importlib.util.spec_from_file_location(f"_bnfold_arch_{file.stem}", file)
        if mod_spec is None or mod_spec.loader is None:
            raise error(f"{option} {spec!r}: cannot import {source}")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module
        mod_spec.loader.exec_module(module)
    else:
        cwd = str(Path.cwd())
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(source)
        except ImportError as e:
            raise error(
                f"{option} {spec!r}: cannot import {source} ({e})",
                hint="check the module path, or give a file: path/to/file.py:callable",
            ) from e
    try:
        return getattr(module, name)
    except AttributeError as e:
        raise error(f"{option} {spec!r}: {source} has no attribute {name!r}") from e


def _build_filled(
    spec: str, kwargs: Mapping[str, Any], sd: dict[str, Any], path: Path
) -> tuple[torch.nn.Module, list[str]]:
    """Build ``spec`` and load ``sd`` into it.

    The model is first built on the meta device, which skips the random initialisation
    of weights about to be overwritten (seconds for big models); when that fails, leaves
    a tensor the file does not fill, or builds lazy modules (whose shapes come from the
    file, which needs real tensors), it is built normally.
    """
    import torch
    from torch.nn.modules.lazy import LazyModuleMixin

    try:
        with torch.device("meta"):
            model = build_arch(spec, kwargs)
        if not any(isinstance(m, LazyModuleMixin) for m in model.modules()):
            notes = _fill_module(model, sd, path, assign=True)
            if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
                return model, notes
    except Exception:  # noqa: BLE001 - retried below, where errors are reported
        pass
    model = build_arch(spec, kwargs)
    return model, _fill_module(model, sd, path)


def _fill_module(
    module: torch.nn.Module, sd: dict[str, Any], path: Path, *, assign: bool = False
) -> list[str]:
    """Load ``sd`` into ``module`` strictly, with one readable error listing every misfit.

    Allowed on purpose, each with a note: BatchNorm ``num_batches_tracked`` missing from
    the file (not needed for inference; left unknown rather than a false 0), tensors of
    another dtype (cast to the architecture's), and lazy modules (shaped by the file).
    """
    import torch
    from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

    expected = module.state_dict()
    notes: list[str] = []
    if set(sd) != set(expected):
        stripped, more = _strip_common_prefix(sd)
        if set(stripped) == set(expected):
            sd, notes = stripped, more
    missing = sorted(set(expected) - set(sd))
    no_nbt = [k for k in missing if _is_bn_counter(module, k)]
    missing = [k for k in missing if k not in no_nbt]
    unexpected = sorted(set(sd) - set(expected))
    mismatched = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in sd
        and not isinstance(expected[k], UninitializedTensorMixin)
        and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch (file vs arch)", mismatched),
        ):
            if items:
                shown = ", ".join(items[:5]) + (
                    f", … {len(items) - 5} more" if len(items) > 5 else ""
                )
                parts.append(f"{len(items)} {label}: {shown}")
        raise ArchError(
            "the weights do not fit --arch: " + "; ".join(parts),
            hint="check --arch and --arch-kwargs",
            path=path,
        )
    sd, cast_notes = _cast_to_arch(sd, expected)
    notes += cast_notes
    filled = {k: torch.zeros((), dtype=torch.long) for k in no_nbt}
    module.load_state_dict({**sd, **filled}, strict=True, assign=assign)
    for key in no_nbt:
        owner = module.get_submodule(key.rpartition(".")[0])
        owner.num_batches_tracked = None  # type: ignore[assignment] # unknown, not a false 0
    if no_nbt:
        notes.append(
            f"the file has no num_batches_tracked for {len(no_nbt)} BatchNorm layer(s); "
            "not needed for inference, reported as unknown"
        )
    notes += _finish_lazy(module)
    return notes


def _is_bn_counter(module: torch.nn.Module, key: str) -> bool:
    import torch

    owner_name, _, leaf = key.rpartition(".")
    if leaf != "num_batches_tracked":
        return False
    try:
        owner = module.get_submodule(owner_name)
    except AttributeError:
        return False
    return isinstance(owner, torch.nn.modules.batchnorm._NormBase)


def _cast_to_arch(
    sd: dict[str, Any], expected: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Tensors whose dtype differs from the architecture's, cast to it (with notes)."""
    casts: Counter[tuple[str, str]] = Counter()
    out = dict(sd)
    for key, value in sd.items():
        want = expected.get(key)
        if want is None:  # (a lazy module's uninitialized tensors have their dtype too)
            continue
        if value.dtype != want.dtype:
            casts[(_dtype_name(value.dtype), _dtype_name(want.dtype))] += 1
            out[key] = value.to(want.dtype)
    notes = []
    for (src, dst), count in sorted(casts.items()):
        lossy = _narrower(src, dst)
        notes.append(
            f"cast {count} tensor(s) from {src} to {dst}, the architecture's dtype"
            + ("; precision is lost" if lossy else "")
        )
    return out, notes


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _narrower(src: str, dst: str) -> bool:
    """Whether casting ``src`` to ``dst`` can change values."""
    import math

    import torch

    a, b = getattr(torch, src), getattr(torch, dst)
    if a.is_complex or b.is_complex:
        return not b.is_complex or a.itemsize > b.itemsize
    if a.is_floating_point and b.is_floating_point:
        fa, fb = torch.finfo(a), torch.finfo(b)
        return fb.eps > fa.eps or fb.max < fa.max or fb.tiny > fa.tiny
    if a.is_floating_point:
        return True  # to an integer or bool
    if b.is_floating_point:  # integer to float: exact up to the mantissa
        bits = 1 if a == torch.bool else torch.iinfo(a).bits
        return bits > 1 - math.log2(torch.finfo(b).eps)
    if a == torch.bool or b == torch.bool:
        return b == torch.bool and a != torch.bool
    ia, ib = torch.iinfo(a), torch.iinfo(b)
    return ib.min > ia.min or ib.max < ia.max


def _finish_lazy(module: torch.nn.Module) -> list[str]:
    """Lazy modules filled from the file become the plain modules they stand for.

    ``load_state_dict`` gives a lazy module its weights but leaves it lazy, with
    ``in_channels``/``in_features``/``num_features`` still 0; torch completes the change
    on the first forward. Here it is completed from the weights' shapes instead, as
    ``LazyModuleMixin._infer_parameters`` does after its dry run.
    """
    from torch import nn
    from torch.nn.modules.lazy import LazyModuleMixin

    done = []
    for name, m in module.named_modules():
        if not isinstance(m, LazyModuleMixin) or m.has_uninitialized_params():  # type: ignore[misc]
            continue
        if isinstance(m, nn.modules.conv._ConvNd):
            w = m.weight
            m.in_channels = w.shape[0] if m.transposed else w.shape[1] * m.groups
        elif isinstance(m, nn.Linear):
            m.in_features = m.weight.shape[1]
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            ref = m.running_mean if m.running_mean is not None else m.weight
            if ref is not None:
                m.num_features = ref.shape[0]
        m._initialize_hook.remove()
        m._load_hook.remove()
        delattr(m, "_initialize_hook")
        delattr(m, "_load_hook")
        if m.cls_to_become is not None:
            m.__class__ = m.cls_to_become
        done.append(name or "<root>")
    if done:
        return [f"lazy module(s) {', '.join(done[:5])}{' …' if len(done) > 5 else ''} shaped by "
                "the file's weights"]  # fmt: skip
    return []


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else type(e).__name__
    return first[:200]

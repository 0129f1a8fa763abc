"""Loading: a path on disk -> a model bnfold can analyse, plus what format it was.

The format is detected from the file's content, never from its extension:

- a ZIP archive holding ``*/archive_format``     -> torch.export program (``.pt2``)
- a ZIP archive holding ``*/constants.pkl``/code -> TorchScript (``torch.jit.save``)
- a ZIP archive holding ``*/data.pkl``            -> ``torch.save`` (state_dict, checkpoint
  or a whole pickled module)
- a pickle stream (first byte 0x80)               -> legacy ``torch.save``
- 8-byte little-endian length + JSON header       -> safetensors
- a protobuf ModelProto with a graph and opsets   -> ONNX

Security: ``torch.save`` files are read with ``weights_only=True``; anything that
needs arbitrary pickled Python objects (a whole ``nn.Module``) is refused unless
``trust_pickle=True``.  torch.export archives may embed pickles that torch itself
loads with ``weights_only=False``, so every pickle in them is scanned first and
refused when it names anything but tensor-rebuilding functions.  TorchScript
archives are read by torch's C++ unpickler, which cannot import Python code.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import io
import json
import logging
import pickletools
import struct
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnfold.errors import ArchError, LoadError, UnsafePickleError

if TYPE_CHECKING:
    import onnx
    import torch

__all__ = ["LoadedModel", "ModelFormat", "build_arch", "load_model", "load_onnx"]


class ModelFormat(str, enum.Enum):
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
_SAFE_PICKLE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
}
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def load_model(
    path: Path,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Load ``path`` whatever its format; with ``arch`` build that architecture and fill it."""
    path = Path(path)
    head = _read_head(path)
    if head[:4] == b"PK\x03\x04":
        loaded = _load_zip(path, trust_pickle=trust_pickle)
    elif head[:1] == b"\x80":
        loaded = _load_torch_save(path, trust_pickle=trust_pickle)
    elif _looks_like_safetensors(path, head):
        loaded = LoadedModel(path, ModelFormat.SAFETENSORS, state_dict=_load_safetensors(path))
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


def _read_head(path: Path) -> bytes:
    if not path.exists():
        raise LoadError("no such file", hint="check the path", path=path)
    if path.is_dir():
        raise LoadError("is a directory, not a model file", path=path)
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError as e:
        raise LoadError(f"cannot read: {e.strerror}", path=path) from e
    if not head:
        raise LoadError("the file is empty", path=path)
    return head


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < n <= path.stat().st_size - 8


# --------------------------------------------------------------------------- zip archives


def _load_zip(path: Path, *, trust_pickle: bool) -> LoadedModel:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except Exception as e:
        # NotImplementedError, ... on damaged central directories
        raise LoadError(f"corrupt or truncated archive ({_short(e)})", path=path) from e
    if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
        return _load_exported(path, names)
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
    for key in _STATE_DICT_KEYS:
        inner = obj.get(key)
        if isinstance(inner, torch.nn.Module):
            loaded = LoadedModel(
                path,
                ModelFormat.CHECKPOINT,
                state_dict=dict(inner.state_dict()),
                module=inner,
            )
            loaded.notes.append(f"module taken from checkpoint key '{key}'")
            return loaded
        if isinstance(inner, Mapping) and inner and _is_state_dict(inner):
            sd, notes = _clean_keys(dict(inner))
            lightning = any("lightning" in str(k) for k in obj)
            if lightning:
                sd, more = _strip_common_prefix(sd)
                notes += more
            loaded = LoadedModel(path, ModelFormat.CHECKPOINT, state_dict=sd, notes=notes)
            loaded.notes.insert(0, f"state_dict taken from checkpoint key '{key}'")
            return loaded
    raise LoadError(
        "a dict with no tensors and no state_dict under any of the keys "
        + ", ".join(repr(k) for k in _STATE_DICT_KEYS),
        hint="save model.state_dict() or a checkpoint with a 'state_dict' key",
        path=path,
    )


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


def _load_torchscript(path: Path) -> LoadedModel:
    import torch

    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise LoadError(f"corrupt TorchScript archive ({_short(e)})", path=path) from e
    return LoadedModel(
        path, ModelFormat.TORCHSCRIPT, state_dict=dict(module.state_dict()), module=module
    )


def _load_exported(path: Path, names: list[str]) -> LoadedModel:
    import torch

    try:
        _scan_archive_pickles(path, names)
    except UnsafePickleError:
        raise
    except Exception as e:
        raise LoadError(f"corrupt torch.export archive ({_short(e)})", path=path) from e
    export_logger = logging.getLogger("torch.export")
    level = export_logger.level
    export_logger.setLevel(logging.CRITICAL)  # torch logs tracebacks for corrupt archives
    try:
        with path.open("rb") as f:
            ep = torch.export.load(f)
    except Exception as e:
        raise LoadError(f"corrupt torch.export archive ({_short(e)})", path=path) from e
    finally:
        export_logger.setLevel(level)
    module = ep.module()
    sd = dict(ep.state_dict)
    sd.update({k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    loaded = LoadedModel(path, ModelFormat.EXPORTED_PROGRAM, state_dict=sd, module=module)
    example = getattr(ep, "example_inputs", None)
    if (
        example
        and isinstance(example[0], tuple)
        and not example[1]
        and all(isinstance(t, torch.Tensor) for t in example[0])
    ):
        loaded.example_inputs = tuple(example[0])
    return loaded


def _scan_archive_pickles(path: Path, names: list[str]) -> None:
    """Refuse a torch.export archive whose embedded pickles name non-tensor globals."""
    with zipfile.ZipFile(path) as zf:
        for name in names:
            data = zf.read(name)
            if data[:4] == b"PK\x03\x04":
                try:
                    with zipfile.ZipFile(io.BytesIO(data)) as inner:
                        for inner_name in inner.namelist():
                            if inner_name.endswith(".pkl"):
                                _check_pickle(inner.read(inner_name), path, f"{name}/{inner_name}")
                except zipfile.BadZipFile:
                    continue  # raw tensor bytes that happen to start like a zip
            elif name.endswith(".pkl") or (data[:1] == b"\x80" and not _raw_weight(name)):
                _check_pickle(data, path, name)


def _pickle_unreadable(path: Path) -> bool:
    """Whether the file's main pickle cannot even be parsed (corrupt, not hostile)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next(n for n in zf.namelist() if n.endswith("data.pkl"))
                data = zf.read(name)
        else:
            data = path.read_bytes()
    except Exception:  # noqa: BLE001
        return True
    return ("?", "unreadable pickle") in _pickle_globals(data)


def _raw_weight(name: str) -> bool:
    """Members holding raw tensor bytes (which may start with any byte)."""
    return (
        "/data/weights/" in name
        or "/data/constants/" in name
        or ("/data/" in name and (name.rsplit("/", 1)[-1].isdigit()))
    )


def _check_pickle(data: bytes, path: Path, member: str) -> None:
    for module, name in _pickle_globals(data):
        ok = (
            (module, name) in _SAFE_PICKLE_GLOBALS
            or (module == "torch" and name.endswith("Storage"))
            or (module == "torch._utils" and name.startswith("_rebuild_"))
        )
        if not ok:
            raise UnsafePickleError(
                f"member {member} pickles {module}.{name}, which would run code on loading",
                hint="bnfold refuses torch.export archives with code in their pickles",
                path=path,
            )


def _pickle_globals(data: bytes) -> list[tuple[str, str]]:
    """(module, name) of every GLOBAL/STACK_GLOBAL in a pickle, found without running it."""
    found: list[tuple[str, str]] = []
    strings: list[str] = []
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(arg))
            elif op.name in ("GLOBAL", "INST"):
                module, _, name = str(arg).partition(" ")
                found.append((module, name))
            elif op.name == "STACK_GLOBAL":
                found.append((strings[-2], strings[-1]) if len(strings) >= 2 else ("?", "?"))
    except Exception:  # noqa: BLE001 - a broken pickle is not loadable either
        found.append(("?", "unreadable pickle"))
    return found


# --------------------------------------------------------------------------- safetensors


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    import torch

    size = path.stat().st_size
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LoadError(f"corrupt safetensors header ({e})", path=path) from e
        data_start = 8 + n
        buf = f.read()
    if not isinstance(header, dict):
        raise LoadError("corrupt safetensors header (not a JSON object)", path=path)
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = getattr(torch, _SAFETENSORS_DTYPES[info["dtype"]])
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise LoadError(f"corrupt safetensors entry for {name!r}", path=path) from e
        if not 0 <= begin <= end <= size - data_start or end > len(buf):
            raise LoadError(f"truncated safetensors file: {name!r} lies past the end", path=path)
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * dtype.itemsize
        if end - begin != nbytes:
            raise LoadError(f"corrupt safetensors entry for {name!r} (size mismatch)", path=path)
        t = (
            torch.frombuffer(bytearray(buf[begin:end]), dtype=dtype)
            if nbytes
            else torch.empty(0, dtype=dtype)
        )
        out[name] = t.reshape(shape)
    if not out:
        raise LoadError("the safetensors file holds no tensors", path=path)
    return _clean_keys(out)[0]


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


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import (
        ExternalDataInfo,
        _get_all_tensors,
        uses_external_data,
    )

    base = path.resolve().parent
    external = [t for t in _get_all_tensors(model) if uses_external_data(t)]
    for tensor in external:
        info = ExternalDataInfo(tensor)
        target = (base / info.location).resolve()
        if not target.is_relative_to(base):
            raise LoadError(
                f"external data of {tensor.name!r} points outside the model's folder "
                f"({info.location}); refused",
                path=path,
            )
        if not target.is_file():
            raise LoadError(
                f"external data file {info.location!r} of {tensor.name!r} is missing",
                path=path,
            )
    if external:
        import onnx.external_data_helper as edh

        try:
            edh.load_external_data_for_model(model, str(base))
        except (OSError, ValueError) as e:
            raise LoadError(f"cannot read external data ({e})", path=path) from e
        for tensor in external:
            if len(tensor.raw_data) != _expected_nbytes(tensor):
                raise LoadError(f"external data of {tensor.name!r} is truncated", path=path)


def _expected_nbytes(tensor: Any) -> int:
    import onnx

    numel = 1
    for d in tensor.dims:
        numel *= d
    return numel * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


# --------------------------------------------------------------------------- --arch


def build_arch(spec: str, kwargs: Mapping[str, Any]) -> torch.nn.Module:
    """Build the architecture named by ``spec``.

    ``torchvision:NAME``, ``timm:NAME``, ``package.module:callable`` or
    ``path/to/file.py:callable``; ``kwargs`` go to the callable.
    """
    import torch

    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise ArchError(
            f"--arch {spec!r} is not of the form package.module:callable, "
            "path/file.py:callable, torchvision:NAME or timm:NAME"
        )
    try:
        if source == "torchvision":
            try:
                import torchvision
            except ImportError as e:
                raise ArchError(
                    "--arch torchvision:... needs torchvision", hint="pip install torchvision"
                ) from e
            model = torchvision.models.get_model(name, weights=None, **kwargs)
        elif source == "timm":
            try:
                import timm
            except ImportError as e:
                raise ArchError("--arch timm:... needs timm", hint="pip install timm") from e
            model = timm.create_model(name, pretrained=False, **kwargs)
        else:
            factory = _import_callable(source, name, spec)
            model = factory(**kwargs)
    except ArchError:
        raise
    except Exception as e:
        raise ArchError(f"--arch {spec!r} could not be built: {_short(e)}") from e
    if not isinstance(model, torch.nn.Module):
        raise ArchError(f"--arch {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def _import_callable(source: str, name: str, spec: str) -> Any:
    if source.endswith(".py"):
        file = Path(source)
        if not file.is_file():
            raise ArchError(f"--arch {spec!r}: no such file {source}")
        mod_spec = importlib.util.spec_from_file_location(f"_bnfold_arch_{file.stem}", file)
        if mod_spec is None or mod_spec.loader is None:
            raise ArchError(f"--arch {spec!r}: cannot import {source}")
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
            raise ArchError(
                f"--arch {spec!r}: cannot import {source} ({e})",
                hint="check the module path, or give a file: path/to/file.py:callable",
            ) from e
    try:
        return getattr(module, name)
    except AttributeError as e:
        raise ArchError(f"--arch {spec!r}: {source} has no attribute {name!r}") from e


def _build_filled(
    spec: str, kwargs: Mapping[str, Any], sd: dict[str, Any], path: Path
) -> tuple[torch.nn.Module, list[str]]:
    """Build ``spec`` and load ``sd`` into it.

    The model is first built on the meta device, which skips the random initialisation
    of weights about to be overwritten (seconds for big models); when that fails, or
    leaves a tensor the file does not fill, it is built normally.
    """
    import torch

    try:
        with torch.device("meta"):
            model = build_arch(spec, kwargs)
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
    """Load ``sd`` into ``module`` strictly, with one readable error listing every misfit."""
    expected = module.state_dict()
    notes: list[str] = []
    if set(sd) != set(expected):
        stripped, more = _strip_common_prefix(sd)
        if set(stripped) == set(expected):
            sd, notes = stripped, more
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
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
    module.load_state_dict(sd, strict=True, assign=assign)
    return notes


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else type(e).__name__
    return first[:200]

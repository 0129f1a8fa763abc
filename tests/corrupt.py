"""Builders of broken and hostile model files, shared by the loader and CLI tests.

Each builder writes one file under a folder it is given and returns its path; none
of them needs the network.  The hostile pickles only ever touch a marker file in
that folder, so a test can prove the payload did (or did not) run.
"""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import random
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


class TouchOnUnpickle:
    """Unpickling this runs ``Path(marker).touch()``: code execution, observable on disk."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def hostile_torch_save(folder: Path, marker: Path, name: str = "evil.pt") -> Path:
    """A torch.save zip whose pickle touches ``marker`` when loaded with weights_only=False."""
    path = folder / name
    torch.save({"weights": TouchOnUnpickle(marker)}, path)
    return path


def hostile_export_archive(exported: Path, folder: Path, marker: Path) -> Path:
    """A copy of a torch.export archive whose sample inputs are a pickle that touches ``marker``.

    torch.export.load falls back to ``weights_only=False`` for the sample inputs, so
    plain torch runs this payload.
    """
    payload = io.BytesIO()
    torch.save((TouchOnUnpickle(marker),), payload)
    path = folder / "evil_export.pt2"
    with zipfile.ZipFile(exported) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("sample_inputs/model.pt"):
                data = payload.getvalue()
            dst.writestr(info, data)
    return path


def truncated(source: Path, folder: Path, keep: int, name: str = "truncated.pt") -> Path:
    """The first ``keep`` bytes of ``source`` (negative: drop that many from the end)."""
    data = source.read_bytes()
    path = folder / name
    path.write_bytes(data[:keep])
    return path


def bit_flipped(
    source: Path, folder: Path, offset: int, bit: int = 4, name: str = "flipped.pt"
) -> Path:
    """``source`` with one bit flipped at byte ``offset``."""
    data = bytearray(source.read_bytes())
    data[offset] ^= 1 << bit
    path = folder / name
    path.write_bytes(bytes(data))
    return path


def central_directory_records(zip_path: Path) -> dict[str, int]:
    """Member name -> byte offset of its central-directory record, walked from the end
    record (so zips nested inside members are not mistaken for the outer directory)."""
    data = zip_path.read_bytes()
    end = data.rfind(b"PK\x05\x06")
    (count,) = struct.unpack("<H", data[end + 10 : end + 12])
    (pos,) = struct.unpack("<I", data[end + 16 : end + 20])
    records = {}
    for _ in range(count):
        assert data[pos : pos + 4] == b"PK\x01\x02"
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[pos + 28 : pos + 34])
        records[data[pos + 46 : pos + 46 + name_len].decode()] = pos
        pos += 46 + name_len + extra_len + comment_len
    return records


def central_record_of(zip_path: Path, suffix: str) -> int:
    """Offset of the central-directory record of the member whose name ends with ``suffix``."""
    return next(
        off for name, off in central_directory_records(zip_path).items() if name.endswith(suffix)
    )


def export_archive_with_wrong_size(exported: Path, folder: Path) -> Path:
    """A torch.export archive whose directory lists a wrong compressed size for one weight.

    Python's zipfile still reads every member (the pickle scan passes); torch's own
    zip reader rejects the archive.
    """
    offset = central_record_of(exported, "data/weights/weight_0") + 20  # compressed size
    return bit_flipped(exported, folder, offset, bit=4, name="wrong_size.pt2")


def member_data_offset(zip_path: Path, suffix: str) -> int:
    """Byte offset of the (stored) data of the first zip member whose name ends with ``suffix``."""
    with zipfile.ZipFile(zip_path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
    raw = zip_path.read_bytes()
    start = info.header_offset
    # local file header: 30 fixed bytes, then the name and the extra field
    name_len, extra_len = struct.unpack("<HH", raw[start + 26 : start + 30])
    return start + 30 + name_len + extra_len


def random_bytes(folder: Path, seed: int, size: int = 4096) -> Path:
    """``size`` seeded random bytes (never starting like a zip, pickle or text file)."""
    rng = random.Random(seed)
    data = bytearray(rng.randrange(256) for _ in range(size))
    data[0] = 0xFE  # not 'P' (zip), not 0x80 (pickle), not printable
    path = folder / f"random{seed}.bin"
    path.write_bytes(bytes(data))
    return path


def foreign_zip(folder: Path) -> Path:
    """A valid zip archive that holds no model."""
    path = folder / "archive.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "not a model\n")
        zf.writestr("data/numbers.csv", "1,2,3\n")
    return path


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """(header, data section) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file from a header and a data section, with no checks at all."""
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


def onnx_conv_bn(var_location: str | None = None, channels: int = 4):
    """ONNX ModelProto: Conv -> BatchNormalization (epsilon 1e-3), built by hand.

    With ``var_location`` the BN's running variance lives in that external data
    file (``channels`` float32 values at offset 0) instead of inside the model.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    c = channels
    inits = [
        numpy_helper.from_array(np.ones((c, 3, 3, 3), np.float32), "w"),
        numpy_helper.from_array(np.full(c, 2.0, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(c, np.float32), "beta"),
        numpy_helper.from_array(np.arange(c, dtype=np.float32), "mean"),
        numpy_helper.from_array(np.full(c, 4.0, np.float32), "var"),
    ]
    if var_location is not None:
        var = inits[4]
        var.ClearField("raw_data")
        var.data_location = TensorProto.EXTERNAL
        for key, value in (("location", var_location), ("offset", "0"), ("length", str(4 * c))):
            entry = var.external_data.add()
            entry.key, entry.value = key, value
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
        helper.make_node(
            "BatchNormalization",
            ["y", "gamma", "beta", "mean", "var"],
            ["z"],
            name="bn",
            epsilon=1e-3,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def small_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A Conv2d(3, 8) + BatchNorm2d(8) state_dict with non-trivial statistics."""
    from tests.models import ConvBN, randomize_all

    torch.manual_seed(seed)
    model: nn.Module = randomize_all(ConvBN(), seed)
    return model.state_dict()


# --------------------------------------------------------------------------- hostile .pt2


class ExecOnUnpickle:
    """Unpickling this runs ``builtins.exec`` of code that creates ``marker``."""

    def __init__(self, marker: Path):
        self.code = f"open({str(marker)!r}, 'w').close()"

    def __reduce__(self):
        return (exec, (self.code,))


def memo_pickle(marker: Path) -> bytes:
    """A pickle calling ``builtins.exec`` whose STACK_GLOBAL takes module and name from the
    memo (BINPUT/BINGET), with decoy strings in between: a scanner that pairs STACK_GLOBAL
    with the last two string literals sees ``torch._utils._rebuild_tensor_v2``."""

    def text(s: str) -> bytes:
        raw = s.encode()
        return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE

    code = f"open({str(marker)!r}, 'w').close()".encode()
    return b"".join(
        [
            b"\x80\x04",  # PROTO 4
            text("builtins"), b"q\x00", b"0",  # BINPUT 0, POP
            text("exec"), b"q\x01", b"0",  # BINPUT 1, POP
            text("torch._utils"), b"0",  # decoys
            text("_rebuild_tensor_v2"), b"0",
            b"h\x00", b"h\x01", b"\x93",  # BINGET 0, BINGET 1, STACK_GLOBAL
            b"X" + struct.pack("<I", len(code)) + code,  # BINUNICODE
            b"\x85", b"R", b".",  # TUPLE1, REDUCE, STOP
        ]
    )  # fmt: skip


def memoize_pickle(marker: Path) -> bytes:
    """The same with MEMOIZE (protocol 4's implicit memo index) instead of BINPUT."""

    def text(s: str) -> bytes:
        raw = s.encode()
        return b"\x8c" + bytes([len(raw)]) + raw

    code = f"open({str(marker)!r}, 'w').close()".encode()
    return b"".join(
        [
            b"\x80\x04",
            text("builtins"), b"\x94", b"0",  # MEMOIZE (index 0), POP
            text("exec"), b"\x94", b"0",  # MEMOIZE (index 1), POP
            text("collections"), b"0", text("OrderedDict"), b"0",  # decoys
            b"h\x00", b"h\x01", b"\x93",
            b"X" + struct.pack("<I", len(code)) + code,
            b"\x85", b"R", b".",
        ]
    )  # fmt: skip


def torch_save_with_pickle(folder: Path, pickle_bytes: bytes, name: str = "memo.pt") -> Path:
    """A torch.save zip (of a real state_dict) whose data.pkl is replaced by ``pickle_bytes``."""
    source = io.BytesIO()
    torch.save(small_state_dict(), source)
    path = folder / name
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = pickle_bytes if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info, data)
    return path


def edited_export_archive(
    exported: Path,
    folder: Path,
    name: str,
    *,
    json_edits: dict[str, Callable[[Any], Any]] | None = None,
    members: dict[str, bytes] | None = None,
    root_members: dict[str, bytes] | None = None,
) -> Path:
    """A copy of a torch.export archive with JSON members edited (by name suffix) and
    members added or replaced (``members``: paths below the archive's root folder;
    ``root_members``: at the top of the zip)."""
    json_edits = json_edits or {}
    members = dict(members or {})
    path = folder / name
    with zipfile.ZipFile(exported) as src, zipfile.ZipFile(path, "w") as dst:
        root = src.namelist()[0].split("/", 1)[0]
        for info in src.infolist():
            data = src.read(info)
            inner = info.filename.split("/", 1)[1]
            if inner in members:
                data = members.pop(inner)
            for suffix, edit in json_edits.items():
                if info.filename.endswith(suffix):
                    data = json.dumps(edit(json.loads(data))).encode()
            dst.writestr(info, data)
        for inner, data in members.items():
            dst.writestr(f"{root}/{inner}", data)
        for name_, data in (root_members or {}).items():
            dst.writestr(name_, data)
    return path


def hostile_export_opaque_constant(exported: Path, folder: Path, marker: Path) -> Path:
    """(a) A constant declared an opaque object: ``data/constants/opaque_obj_0`` is a plain
    pickle that torch.export.load reads with ``pickle.loads``."""

    def add_constant(config: dict) -> dict:
        config["config"]["evil"] = {
            "path_name": "opaque_obj_0",
            "is_param": False,
            "use_pickle": True,
            "tensor_meta": None,
        }
        return config

    return edited_export_archive(
        exported,
        folder,
        "opaque_constant.pt2",
        json_edits={"data/constants/model_constants_config.json": add_constant},
        members={"data/constants/opaque_obj_0": pickle.dumps(ExecOnUnpickle(marker))},
    )


def hostile_export_pickled_weight(
    exported: Path, folder: Path, marker: Path, *, memo: bool = False, upper: bool = False
) -> Path:
    """(b) A weight whose config entry says ``use_pickle``, its member a legacy torch.save
    pickle that torch.export.load reads with ``weights_only=False``; (c) with ``memo``, a
    raw pickle hiding its global in the memo behind decoy strings. With ``upper`` the
    member is stored as ``data/weights/WEIGHT_99``: torch's reader finds it all the same
    (its lookup ignores case), a check that matches names exactly does not."""
    if memo:
        payload = memo_pickle(marker)
    else:
        buffer = io.BytesIO()
        torch.save(ExecOnUnpickle(marker), buffer, _use_new_zipfile_serialization=False)
        payload = buffer.getvalue()

    def pickled(config: dict) -> dict:
        entry = config["config"]["conv.weight"]
        entry["use_pickle"] = True
        entry["path_name"] = "weight_99"
        return config

    return edited_export_archive(
        exported,
        folder,
        "memo_weight.pt2" if memo else "upper_weight.pt2" if upper else "pickled_weight.pt2",
        json_edits={"data/weights/model_weights_config.json": pickled},
        members={"data/weights/WEIGHT_99" if upper else "data/weights/weight_99": payload},
    )


def hostile_export_expression(exported: Path, folder: Path, marker: Path) -> Path:
    """A symbolic size whose ``expr_str`` is Python: torch parses it with sympy.sympify,
    which evaluates it."""

    def symbolic(program: dict) -> dict:
        values = program["graph_module"]["graph"]["tensor_values"]
        first = next(iter(values.values()))
        first["sizes"][0] = {
            "as_expr": {
                "expr_str": f"open({str(marker)!r}, 'w').close()",
                "hint": {"as_int": 8},
            }
        }
        return program

    return edited_export_archive(
        exported, folder, "expression.pt2", json_edits={"models/model.json": symbolic}
    )


def hostile_export_target(exported: Path, folder: Path, marker: Path) -> Path:
    """A node whose target is ``torch.serialization.os.mkdir`` (torch resolves targets by
    walking attributes down from ``torch``), called on ``marker`` when the program runs."""

    def retarget(program: dict) -> dict:
        node = program["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.serialization.os.mkdir"
        node["inputs"] = [{"name": "path", "arg": {"as_string": str(marker)}, "kind": 1}]
        return program

    return edited_export_archive(
        exported, folder, "target.pt2", json_edits={"models/model.json": retarget}
    )


def hostile_export_attribute(exported: Path, folder: Path, marker: Path) -> Path:
    """The parameter ``conv.weight`` renamed everywhere to ``conv.<payload>``, where fx
    writes the name into the module's forward as ``getattr(self.conv, "<payload>")``: the
    payload closes the string and runs ``exec`` (no dots: module paths split on them)."""
    code = ",".join(str(b) for b in f"open({str(marker)!r}, 'w').close()".encode())
    payload = f'weight" if exec(bytes(({code},))) else "weight'

    def rename(document: Any) -> Any:
        if isinstance(document, dict):
            return {rename(k): rename(v) for k, v in document.items()}
        if isinstance(document, list):
            return [rename(v) for v in document]
        return f"conv.{payload}" if document == "conv.weight" else document

    edits = {"models/model.json": rename, "data/weights/model_weights_config.json": rename}
    return edited_export_archive(exported, folder, "attribute.pt2", json_edits=edits)


def hostile_export_guards(exported: Path, folder: Path, marker: Path) -> Path:
    """Guards code (Python source kept in the archive) that ExportedProgram.module() execs
    into a function run on every call."""

    def guard(program: dict) -> dict:
        program["guards_code"] = [f"open({str(marker)!r}, 'w').close() is None"]
        return program

    return edited_export_archive(
        exported, folder, "guards.pt2", json_edits={"models/model.json": guard}
    )


def with_zip_bomb(
    source: Path, folder: Path, name: str, member: str = "data/bomb", size: int = 256 << 20
) -> Path:
    """A copy of the ZIP archive ``source`` plus one deflated member of ``size`` zero bytes
    (256 MiB deflate to about 250 KB) under the archive's root folder."""
    path = folder / name
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w") as dst:
        root = src.namelist()[0].split("/", 1)[0]
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        info = zipfile.ZipInfo(f"{root}/{member}")
        info.compress_type = zipfile.ZIP_DEFLATED
        chunk = bytes(1 << 20)
        with dst.open(info, "w", force_zip64=True) as out:
            for _ in range(size // len(chunk)):
                out.write(chunk)
    return path

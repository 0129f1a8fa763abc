"""Hostile and malformed model files: no code from the file ever runs, nothing hangs or
allocates far beyond the file's size, and every refusal is one ``error:`` line, exit 2
(issue 13).

The hostile torch.export archives are genuine ``torch.export.save`` archives with one
member altered; each payload only creates a marker file, and a control test proves that
plain ``torch.export.load`` does run it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import resource
import struct
import subprocess
import sys
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from bnfold import pt2_guard, safe_pickle
from bnfold.errors import LoadError, UnsafePickleError
from bnfold.loading import ModelFormat, load_model
from tests import corrupt
from tests.models import ConvBN, randomize_all

TIMEOUT = 120  # seconds: far above any honest refusal; a hang fails the test
X = torch.randn(1, 3, 8, 8)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bnfold(*args: str, cwd: Path | None = None, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bnfold", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        cwd=cwd,
        **kwargs,
    )


def assert_one_line_exit_2(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A genuine torch.export archive of ConvBN (with its example inputs), saved once."""
    torch.manual_seed(0)
    model = randomize_all(ConvBN())
    path = tmp_path_factory.mktemp("export") / "program.pt2"
    torch.export.save(torch.export.export(model, (X,)), path)
    return path


HOSTILE = {
    "opaque_constant": corrupt.hostile_export_opaque_constant,  # (a)
    "pickled_weight": corrupt.hostile_export_pickled_weight,  # (b)
    "memo_weight": partial(corrupt.hostile_export_pickled_weight, memo=True),  # (c)
    "upper_case_weight": partial(corrupt.hostile_export_pickled_weight, upper=True),
    "expression": corrupt.hostile_export_expression,
    "attribute": corrupt.hostile_export_attribute,
}


@pytest.fixture
def in_tmp(tmp_path) -> Path:
    """The marker file a payload creates when it runs."""
    return tmp_path / "MARKER"


def build(kind: str, exported: Path, folder: Path, marker: Path) -> Path:
    return HOSTILE[kind](exported, folder, marker)


# --------------------------------------------------------------------------- hostile .pt2


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_payload_runs_in_plain_torch(exported, tmp_path, in_tmp, kind):
    """Control (issue 13): plain torch.export.load, then running the program, does run each
    payload, so the refusals below are what protects."""
    path = build(kind, exported, tmp_path, in_tmp)
    with contextlib.suppress(Exception):  # most payloads break the program after running
        torch.export.load(path).module()(X)
    assert in_tmp.exists()


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_load_model_refuses_hostile_archive(exported, tmp_path, in_tmp, kind):
    """Issue 13: load_model refuses each hostile archive with UnsafePickleError, unrun,
    the file untouched."""
    path = build(kind, exported, tmp_path, in_tmp)
    digest = sha(path)
    with pytest.raises(UnsafePickleError) as info:
        load_model(path)
    assert "--trust-pickle" in info.value.one_line()
    assert not in_tmp.exists()
    assert sha(path) == digest


@pytest.mark.parametrize(
    ("kind", "command"),
    [
        ("opaque_constant", "inspect"),
        ("opaque_constant", "fuse"),
        ("pickled_weight", "inspect"),
        ("pickled_weight", "fuse"),
        ("memo_weight", "inspect"),
        ("memo_weight", "fuse"),
        ("expression", "inspect"),
        ("attribute", "fuse"),
    ],
)
def test_cli_refuses_hostile_archive(exported, tmp_path, in_tmp, kind, command):
    """Issue 13: `bnfold inspect/fuse` on a hostile archive: one line, exit 2, marker never
    created, nothing written."""
    path = build(kind, exported, tmp_path, in_tmp)
    out = tmp_path / "out.onnx"
    args = [command, str(path), "--input-shape", "1,3,8,8"]
    if command == "fuse":
        args += ["--out", str(out)]
    line = assert_one_line_exit_2(bnfold(*args, cwd=tmp_path), "--trust-pickle")
    assert path.name in line
    assert not in_tmp.exists()
    assert not out.exists()


def test_guards_code_never_runs(exported, tmp_path, in_tmp):
    """Issue 13: guards code (Python source the archive carries) is never exec'd: the
    archive loads and runs without it, while plain torch runs it on every call."""
    path = corrupt.hostile_export_guards(exported, tmp_path, in_tmp)
    loaded = load_model(path)
    loaded.module(X)
    assert not in_tmp.exists()
    result = bnfold("inspect", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not in_tmp.exists()
    torch.export.load(path).module()(X)  # control
    assert in_tmp.exists()


def test_trust_pickle_is_the_only_way_past_a_pickled_constant(exported, tmp_path, in_tmp):
    """Issue 13: with trust_pickle the opaque constant reaches torch (the payload runs and
    torch then fails on what it returned); without it, it is refused unrun."""
    path = corrupt.hostile_export_opaque_constant(exported, tmp_path, in_tmp)
    with pytest.raises(UnsafePickleError, match="pickled Python object"):
        load_model(path)
    assert not in_tmp.exists()
    with pytest.raises(LoadError) as info:
        load_model(path, trust_pickle=True)
    assert not isinstance(info.value, UnsafePickleError)
    assert in_tmp.exists()


def test_compiled_code_in_archive_is_refused(exported, tmp_path):
    """Issue 13: an archive with AOTInductor members (shared libraries torch.export.load
    would dlopen) is refused without --trust-pickle."""
    path = corrupt.edited_export_archive(
        exported, tmp_path, "aoti.pt2", members={"data/aotinductor/model/model.so": b"\x7fELF"}
    )
    with pytest.raises(UnsafePickleError, match="AOTInductor"):
        load_model(path)


def test_old_format_members_at_the_root_are_refused(exported, tmp_path, in_tmp):
    """Issue 13: pre-2.7 members at the archive's root (which torch.export.load falls back
    to, unpickling them with weights_only=False) are refused before anything reads them."""
    buffer = io.BytesIO()
    torch.save((corrupt.ExecOnUnpickle(in_tmp),), buffer)
    path = corrupt.edited_export_archive(
        exported,
        tmp_path,
        "old.pt2",
        root_members={"version": b"8.0", "serialized_example_inputs.pt": buffer.getvalue()},
    )
    with pytest.raises(LoadError, match="outside its one root folder"):
        load_model(path)
    assert not in_tmp.exists()


def test_member_declared_raw_and_pickled_is_checked_as_a_pickle(exported, tmp_path, in_tmp):
    """Issue 13: a weight member that one config entry calls raw and another pickled is
    still unpickled by torch, so it is checked as a pickle."""
    buffer = io.BytesIO()
    torch.save(corrupt.ExecOnUnpickle(in_tmp), buffer, _use_new_zipfile_serialization=False)

    def both(config: dict) -> dict:
        entry = dict(config["config"]["conv.weight"], use_pickle=True, path_name="weight_0")
        config["config"]["extra"] = entry
        return config

    path = corrupt.edited_export_archive(
        exported,
        tmp_path,
        "both.pt2",
        json_edits={"data/weights/model_weights_config.json": both},
        members={"data/weights/weight_0": buffer.getvalue()},
    )
    with pytest.raises(UnsafePickleError):
        load_model(path)
    assert not in_tmp.exists()


def test_program_calling_other_than_operators_is_refused(exported):
    """Issue 13: check_program refuses a graph whose node calls a Python function, or passes
    one as an argument (a deserialized target may be any attribute reachable from torch)."""
    ep = torch.export.load(exported)
    pt2_guard.check_program(ep, exported)  # the genuine program passes
    node = next(n for n in ep.graph.nodes if n.op == "call_function")
    target = node.target
    node.target = os.mkdir
    with pytest.raises(UnsafePickleError, match=r"posix\.mkdir"):
        pt2_guard.check_program(ep, exported)
    node.target = target
    node.args = (*node.args, print)
    with pytest.raises(UnsafePickleError, match=r"builtins\.print"):
        pt2_guard.check_program(ep, exported)


SREPR_FROM_TORCH = [
    "Symbol('s77', positive=True, integer=True)",
    "Add(Mul(Integer(2), Symbol('s0', positive=True, integer=True)), Integer(1))",
    "FloorDiv(Add(Symbol('s0', positive=True, integer=True), Integer(3)), Integer(4))",
    "Pow(Symbol('s0', positive=True, integer=True), Rational(1, 2))",
    "Pow(Symbol('s0', positive=True, integer=True), Integer(-1))",
    "Mul(Float('1.5', precision=53), Symbol('s1', integer=True))",
    "And(StrictGreaterThan(Symbol('s0', integer=True), Integer(1)), LessThan(Symbol('s0', "
    "integer=True), Integer(9)))",
    "Piecewise(ExprCondPair(Symbol('s0', integer=True), GreaterThan(Symbol('s0', integer=True),"
    " Integer(2))), ExprCondPair(Integer(1), true))",
    "TruncToInt(ToFloat(Symbol('u3', integer=True)))",
    "-int_oo",
]


@pytest.mark.parametrize("text", SREPR_FROM_TORCH)
def test_symbolic_sizes_torch_writes_are_accepted(text):
    """The srepr forms torch writes for symbolic sizes pass the expression check."""
    assert pt2_guard._bad_expression(text) is None


@pytest.mark.parametrize(
    "text",
    [
        "open('x', 'w')",
        "__import__('os').system('true')",
        "().__class__.__base__",
        "exec(chr(112) + chr(114))",
        "Symbol('s0').__class__",
        "Pow(Integer(2), Integer(10000000000))",
        "2**2**2**2**2",
        "Pow(Pow(Pow(Integer(3), Integer(64)), Integer(64)), Integer(64))",
        "LShift(Integer(1), Integer(1000000000000))",
        "PowByNatural(Integer(2), Symbol('s0', integer=True))",
        "Float('1.5', precision=1000000000)",
        "Integer(10**100)",
        "(lambda: 0)()",
        "[s0 for s0 in range(10)]",
        "Symbol(**{'name': 's0'})",
        "Max(" * 100 + "s0" + ")" * 100,
    ],
)
def test_symbolic_sizes_that_run_code_or_blow_up_are_refused(text):
    """Issue 13: an expr_str that would run code under sympify, or compute an unbounded
    power, is refused before sympy sees it."""
    assert pt2_guard._bad_expression(text) is not None


def test_dynamic_shape_archive_loads(tmp_path):
    """A genuine archive with symbolic sizes (expr_str) loads, and runs at another batch."""
    torch.manual_seed(0)
    model = randomize_all(ConvBN())
    batch = torch.export.Dim("batch", min=2, max=64)
    path = tmp_path / "dynamic.pt2"
    torch.export.save(
        torch.export.export(model, (torch.randn(4, 3, 8, 8),), dynamic_shapes=({0: batch},)), path
    )
    assert '"expr_str"' in zipfile.ZipFile(path).read("dynamic/models/model.json").decode()
    loaded = load_model(path)
    assert loaded.format is ModelFormat.EXPORTED_PROGRAM
    x = torch.randn(6, 3, 8, 8)
    torch.testing.assert_close(loaded.module(x), model(x))


# --------------------------------------------------------------------------- plain torch.save


@pytest.mark.parametrize("variant", ["binput_stack_global", "memoize", "legacy"])
def test_memo_scanner_bypass_in_torch_save_is_refused(tmp_path, variant):
    """Issue 13: a torch.save file whose pickle hides its global in the memo (BINPUT/BINGET
    or MEMOIZE behind decoy strings) is refused, unrun; with trust_pickle it does run."""
    marker = tmp_path / "MARKER"
    payload = (corrupt.memoize_pickle if variant == "memoize" else corrupt.memo_pickle)(marker)
    if variant == "legacy":
        path = tmp_path / "legacy.pt"
        path.write_bytes(payload)  # a bare pickle stream: the legacy torch.save format
    else:
        path = corrupt.torch_save_with_pickle(tmp_path, payload)
    with pytest.raises(UnsafePickleError):
        load_model(path)
    assert not marker.exists()
    with pytest.raises(LoadError):
        load_model(path, trust_pickle=True)
    assert marker.exists()  # control: the payload is real


# --------------------------------------------------------------------------- not a regular file


def _limited_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a runaway read fails fast


@pytest.mark.parametrize("kind", ["fifo", "fifo_symlink", "dev_zero"])
def test_non_regular_files_are_refused(tmp_path, kind):
    """Issue 13: a FIFO (hung forever) or /dev/zero (memory grew without bound) as the model
    is refused at once: one line, exit 2."""
    fifo = tmp_path / "pipe.pt"
    if kind == "dev_zero":
        path = Path("/dev/zero")
    else:
        os.mkfifo(fifo)
        path = fifo
        if kind == "fifo_symlink":
            path = tmp_path / "link.pt"
            path.symlink_to(fifo)
    result = bnfold("inspect", str(path), preexec_fn=_limited_memory)
    line = assert_one_line_exit_2(result)
    assert ("FIFO" in line) if kind != "dev_zero" else ("device" in line)


# --------------------------------------------------------------------------- safetensors


def _safetensors(tmp_path: Path, header: dict, data: bytes, name: str = "bad.safetensors"):
    return corrupt.write_safetensors(tmp_path / name, header, data)


@pytest.mark.parametrize(
    ("shape", "needle"),
    [
        ([2**70, 0], "shape"),  # numel 0 fits 0 bytes; torch cannot hold the dimension
        ([-2, -2], "non-negative"),  # numel 4 fits 16 bytes
        ([True, 4], "non-negative integers"),
    ],
)
def test_safetensors_bad_dimensions(tmp_path, shape, needle):
    """Issue 13: dimensions torch cannot hold, negative or not integers: LoadError, not a
    crash in reshape."""
    nbytes = 16 if shape == [-2, -2] else 0
    header = {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, nbytes]}}
    path = _safetensors(tmp_path, header, bytes(16))
    with pytest.raises(LoadError, match=needle):
        load_model(path)


def test_safetensors_deeply_nested_header(tmp_path):
    """Issue 13: a header nested 100000 deep (RecursionError in json) is a LoadError."""
    head = b"[" * 100_000 + b"]" * 100_000
    head = b'{"a":' + head + b"}"
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head)
    with pytest.raises(LoadError, match="corrupt safetensors header"):
        load_model(path)


def test_safetensors_absurd_header_length(tmp_path):
    """Issue 13: a header length far beyond the file is named as a corrupt safetensors
    header (not 'not a model')."""
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**60) + b'{"w": {}}')
    with pytest.raises(LoadError, match=r"corrupt safetensors header \(declares"):
        load_model(path)


def test_safetensors_aliased_ranges_are_refused(tmp_path):
    """Issue 13: entries whose byte ranges overlap (100 names for one 8 MB range peaked at
    1.3 GB) are refused."""
    n = 1 << 16
    header = {f"w{i}": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]} for i in range(3)}
    path = _safetensors(tmp_path, header, bytes(4 * n))
    with pytest.raises(LoadError, match="overlaps"):
        load_model(path)
    partial_overlap = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    with pytest.raises(LoadError, match="overlaps"):
        load_model(_safetensors(tmp_path, partial_overlap, bytes(24), "partial.safetensors"))


def test_safetensors_unknown_dtype(tmp_path):
    """A dtype the format does not define: LoadError naming it."""
    header = {"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}
    with pytest.raises(LoadError, match="unknown dtype 'Q7'"):
        load_model(_safetensors(tmp_path, header, bytes(4)))


def test_safetensors_reads_each_tensor_once(tmp_path):
    """A valid file with gaps and zero-sized entries loads with the right values."""
    a, b = torch.arange(4, dtype=torch.float32), torch.ones(2, 3, dtype=torch.float16)
    data = a.numpy().tobytes() + bytes(8) + b.numpy().tobytes()
    header = {
        "b": {"dtype": "F16", "shape": [2, 3], "data_offsets": [24, 36]},
        "empty": {"dtype": "F32", "shape": [0, 5], "data_offsets": [16, 16]},
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
    }
    loaded = load_model(_safetensors(tmp_path, header, data, "ok.safetensors"))
    assert list(loaded.state_dict) == ["b", "empty", "a"]
    assert torch.equal(loaded.state_dict["a"], a)
    assert torch.equal(loaded.state_dict["b"], b)
    assert loaded.state_dict["empty"].shape == (0, 5)


# --------------------------------------------------------------------------- ONNX


def _onnx(tmp_path: Path, model: onnx.ModelProto, name: str = "model.onnx") -> Path:
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def test_onnx_initializer_shorter_than_its_shape(tmp_path):
    """Issue 13: raw_data shorter than the shape says: LoadError naming the tensor."""
    model = corrupt.onnx_conv_bn()
    var = _initializer(model, "var")
    var.raw_data = var.raw_data[:-4]
    with pytest.raises(LoadError, match="'var' holds 12 bytes of data; its shape and type need 16"):
        load_model(_onnx(tmp_path, model))


@pytest.mark.parametrize("data_type", [0, 999])
def test_onnx_initializer_with_undefined_type(tmp_path, data_type):
    """Issue 13: data_type 0 (UNDEFINED) or a number ONNX does not define: LoadError."""
    model = corrupt.onnx_conv_bn()
    _initializer(model, "mean").data_type = data_type
    with pytest.raises(LoadError, match=f"element type {data_type}"):
        load_model(_onnx(tmp_path, model))


def test_onnx_typed_values_count_checked(tmp_path):
    """An initializer stored as float_data with fewer values than its shape: LoadError."""
    model = corrupt.onnx_conv_bn()
    gamma = _initializer(model, "gamma")
    gamma.ClearField("raw_data")
    gamma.float_data.extend([1.0, 2.0])
    with pytest.raises(LoadError, match="'gamma' holds 2 values; its shape needs 4"):
        load_model(_onnx(tmp_path, model))


def _external(tmp_path: Path, **fields: str) -> Path:
    (tmp_path / "weights.data").write_bytes(np.full(4, 4.0, np.float32).tobytes())
    model = corrupt.onnx_conv_bn("weights.data")
    var = _initializer(model, "var")
    del var.external_data[:]
    for key, value in {"location": "weights.data", "offset": "0", "length": "16", **fields}.items():
        entry = var.external_data.add()
        entry.key, entry.value = key, value
    return _onnx(tmp_path, model)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"location": "weights.data\0evil"}, "a NUL byte"),
        ({"offset": "zero"}, "offset 'zero', not a non-negative integer"),
        ({"offset": "-4"}, "offset '-4', not a non-negative integer"),
        ({"length": "-16"}, "length '-16', not a non-negative integer"),
        ({"length": "4096"}, "declares 4096 bytes; its shape and type need 16"),
        ({"offset": "8"}, r"truncated: it needs bytes 8\.\.24"),
    ],
)
def test_onnx_external_data_fields_checked(tmp_path, fields, needle):
    """Issue 13: external data with a NUL in its location, a non-numeric or negative offset
    or length, or more bytes than the file holds: LoadError, not a crash."""
    with pytest.raises(LoadError, match=needle):
        load_model(_external(tmp_path, **fields))


def test_onnx_external_data_aliasing_refused(tmp_path):
    """Two tensors reading overlapping bytes of one external file are refused."""
    (tmp_path / "w.data").write_bytes(np.ones(4, np.float32).tobytes())
    model = corrupt.onnx_conv_bn("w.data")
    mean = _initializer(model, "mean")
    mean.ClearField("raw_data")
    mean.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "w.data"), ("offset", "0"), ("length", "16")):
        entry = mean.external_data.add()
        entry.key, entry.value = key, value
    with pytest.raises(LoadError, match="overlaps"):
        load_model(_onnx(tmp_path, model))


def test_onnx_external_data_from_a_fifo_is_refused(tmp_path):
    """External data that is a FIFO inside the model's folder is refused, never opened."""
    os.mkfifo(tmp_path / "weights.data")
    model = corrupt.onnx_conv_bn("weights.data")
    path = _onnx(tmp_path, model)
    result = bnfold("inspect", str(path))
    assert_one_line_exit_2(result, "not a regular file")


# --------------------------------------------------------------------------- ZIP bombs


def test_zip_bomb_in_torch_save_is_refused(tmp_path):
    """Issue 13: a torch.save zip with a member inflating 250 KB to 256 MiB is refused
    before any member is read."""
    source = tmp_path / "sd.pt"
    torch.save(corrupt.small_state_dict(), source)
    path = corrupt.with_zip_bomb(source, tmp_path, "bomb.pt")
    assert path.stat().st_size < 2 << 20
    with pytest.raises(LoadError, match="ZIP bomb"):
        load_model(path)


def test_zip_bomb_in_export_archive_is_refused(exported, tmp_path):
    """Issue 13: the same member in a torch.export archive: one line, exit 2, fast."""
    path = corrupt.with_zip_bomb(exported, tmp_path, "bomb.pt2")
    assert_one_line_exit_2(bnfold("inspect", str(path)), "ZIP bomb")


def test_zip_bomb_nested_in_a_member_is_refused(exported, tmp_path):
    """Issue 13: a bomb inside the torch.save zip an export archive nests (its sample
    inputs) is measured before torch reads it."""
    inputs = tmp_path / "inputs.pt"
    torch.save(((X,), {}), inputs)
    nested = corrupt.with_zip_bomb(inputs, tmp_path, "nested.pt")
    path = corrupt.edited_export_archive(
        exported,
        tmp_path,
        "nested_bomb.pt2",
        members={"data/sample_inputs/model.pt": nested.read_bytes()},
    )
    with pytest.raises(LoadError, match="ZIP bomb"):
        load_model(path)


def test_genuine_archives_are_far_from_the_zip_limits(exported, tmp_path):
    """torch.save and torch.export.save store members uncompressed, torch.jit.save deflates
    only its code (2-3x): the bomb limits (200x, and only above 8 MiB) never touch them."""
    model = randomize_all(ConvBN())
    saved, scripted = tmp_path / "sd.pt", tmp_path / "ts.pt"
    torch.save(model.state_dict(), saved)
    torch.jit.save(torch.jit.script(model), str(scripted))
    for path in (saved, scripted, exported):
        with zipfile.ZipFile(path) as zf:
            ratios = [i.file_size / max(i.compress_size, 1) for i in zf.infolist()]
            assert max(ratios) < safe_pickle.MAX_RATIO / 20, path
        load_model(path)


# --------------------------------------------------------------------------- pytree types


def test_archive_naming_an_unregistered_output_type(exported, tmp_path):
    """Issue 13: an archive whose outputs are a pytree type nothing registers: LoadError
    naming the type, not 'corrupt'."""

    def foreign(program: dict) -> dict:
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(signature["out_spec"])
        spec[1] = {"type": "mypkg.outputs.Out", "context": "null", "children_spec": [spec[1]]}
        signature["out_spec"] = json.dumps(spec)
        return program

    path = corrupt.edited_export_archive(
        exported, tmp_path, "foreign.pt2", json_edits={"models/model.json": foreign}
    )
    line = assert_one_line_exit_2(bnfold("inspect", str(path)))
    assert "mypkg.outputs.Out" in line and "corrupt" not in line


def test_allowlisted_output_type_missing_package(monkeypatch, tmp_path):
    """An output type from transformers when transformers is not installed: LoadError
    saying pip install transformers."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "transformers" else real(name, *a),
    )
    with pytest.raises(LoadError) as info:
        pt2_guard.register_pytree_types(
            {"transformers.modeling_outputs.NoSuchOutput"}, tmp_path / "m.pt2"
        )
    assert "not installed" in info.value.message
    assert "pip install transformers" in info.value.one_line()


def test_allowlist_never_imports_other_modules(tmp_path):
    """A type naming a module outside the allowlist is never imported."""
    assert "json.tool" not in sys.modules
    with pytest.raises(LoadError, match="no imported package registers"):
        pt2_guard.register_pytree_types({"json.tool.Output"}, tmp_path / "m.pt2")
    assert "json.tool" not in sys.modules


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("transformers") is None,
    reason="transformers is not installed (the 'test' extra installs it)",
)
def test_transformers_output_archive_loads_in_a_fresh_process(tmp_path):
    """Issue 13: a torch.export archive of a transformers model (outputs a ModelOutput)
    loads where transformers is installed but not imported: bnfold imports its output
    module (an allowlisted name) and says so."""
    import transformers

    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3
    )
    model = transformers.ResNetForImageClassification(config).eval()
    path = tmp_path / "hf.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 32, 32),)), path)
    result = bnfold("inspect", str(path), "--format", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["format"] == "torch_export"
    assert any("imported transformers.modeling_outputs" in n for n in report["notes"])

"""A torch.export archive (``.pt2``) checked before torch reads it, and its program after.

``torch.export.load`` trusts the archive completely. Read from torch 2.14's
``torch/export/pt2_archive/_package.py`` and ``torch/_export/serde/serialize.py``, it:

1. unpickles with ``weights_only=False`` every weight and tensor constant whose entry
   in ``data/{weights,constants}/<model>_*_config.json`` says ``use_pickle``, and the
   legacy ``data/{weights,constants}/<model>.pt`` files;
2. unpickles ``data/constants/opaque_obj_*`` with plain ``pickle.loads`` and
   ``custom_obj_*`` with torch's TorchScript unpickler;
3. unpickles ``data/sample_inputs/<model>.pt`` weights-only, falling back to
   ``weights_only=False`` when that fails (and, after any RuntimeError, the members of
   the pre-2.7 format at the archive's root the same way);
4. loads the shared libraries under ``data/aotinductor/`` (native code);
5. parses every symbolic-shape expression (``expr_str``) with ``sympy.sympify``, which
   is ``eval``;
6. resolves every node's target by walking attributes down from ``torch`` (so
   ``torch.serialization.os.system`` resolves), and writes names and attribute
   targets from the JSON into the Python code fx generates and runs;
7. and ``ExportedProgram.module()`` execs the archive's ``guards_code`` (Python source)
   into a function the module calls on every forward.

So, unless the user trusts the file (``--trust-pickle``):

- every pickle torch would load (1, 3, and any other member that is a pickle and not a
  raw tensor) must load with torch's weights-only unpickler and give tensors
  (``bnfold.safe_pickle``); torch then reads them with weights-only forced on. Members
  are read here through torch's own reader under the names torch uses (its lookup
  ignores case), so what is checked is what torch reads;
- opaque and TorchScript objects (2) and compiled code (4) are refused (members at the
  archive's root, where the pre-2.7 format lives (3), are refused even when trusted);
- every ``expr_str`` must be arithmetic on symbols and numbers in a small grammar,
  checked with Python's ``ast`` before sympy sees it (5); every other string of the
  JSON that is not free text must hold no quote, backslash or control character (6);
- once loaded, every node of every graph must call an operator (``OpOverload``), a
  higher-order operator or a symbolic-shape builtin, with only nodes, tensors,
  numbers, strings, dtypes, devices and operators as arguments (6);
- the module is taken with ``module(check_guards=False)``: the guards are never exec'd
  (7).
"""

from __future__ import annotations

import ast
import json
import operator
import os
import re
import unicodedata
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from bnfold.errors import LoadError, UnsafePickleError
from bnfold.safe_pickle import load_weights_only

__all__ = ["check_archive", "check_program", "pytree_types", "register_pytree_types"]

_HINT = "re-run with --trust-pickle only if you trust where the file came from"

# keys whose string values are free text torch never turns into code (metadata kept in
# node.meta, pytree specs parsed as JSON, string arguments written with repr())
_FREE_TEXT = frozenset(
    {
        "nn_module_stack",
        "source_fn_stack",
        "torch_fn",
        "custom",
        "in_spec",
        "out_spec",
        "as_string",
        "as_strings",
        "torch_version",
        "guards_code",  # inert: bnfold asks for the module with check_guards=False
    }
)
_MULTILINE_TEXT = frozenset({"stack_trace"})  # fx copies one line of it into a comment

# --------------------------------------------------------------------------- archive


def check_archive(path: Path, zip_names: list[str], *, trust_pickle: bool) -> None:
    """Refuse an archive torch.export.load would run code from (see the module docstring)."""
    import torch

    roots = {name.split("/", 1)[0] for name in zip_names}
    if any("/" not in name for name in zip_names) or len(roots) != 1:
        raise LoadError(
            "corrupt torch.export archive (members outside its one root folder)", path=path
        )
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        records = list(reader.get_all_records())
    except Exception as e:
        raise LoadError(f"corrupt torch.export archive ({_short(e)})", path=path) from e
    if any(r.startswith("data/aotinductor/") for r in records) and not trust_pickle:
        raise UnsafePickleError(
            "holds AOTInductor compiled code (shared libraries under data/aotinductor/); "
            "torch.export.load would load and run it",
            hint=_HINT,
            path=path,
        )
    if trust_pickle:
        return

    def read(name: str) -> bytes:
        try:
            return bytes(reader.get_record(name))
        except Exception as e:
            raise LoadError(f"corrupt torch.export archive ({_short(e)})", path=path) from e

    # members are named as torch names them (os.path.join of folder and path_name) and
    # read through torch's own reader, whose lookup ignores case: what is checked here is
    # byte for byte what torch.export.load reads under that name
    raw: set[str] = set()  # members torch reads as raw tensor bytes, never unpickles
    pickled: set[str] = set()  # members torch unpickles
    for name in records:
        if name.endswith(".json"):
            document = _parse_json(read(name), path, name)
            _check_strings(document, path, name)
        if name.startswith("models/") and name.endswith(".json"):
            model = name[len("models/") : -len(".json")]
            pickled.add(f"data/sample_inputs/{model}.pt")
            pickled.add(f"data/weights/{model}.pt")
            pickled.add(f"data/constants/{model}.pt")
    for name in records:
        if not name.endswith("_config.json") or not name.startswith(
            ("data/weights/", "data/constants/")
        ):
            continue
        folder = name.rsplit("/", 1)[0] + "/"
        config = _parse_json(read(name), path, name)
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise LoadError(f"corrupt torch.export archive ({name} has no config)", path=path)
        for fqn, meta in entries.items():
            if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
                raise LoadError(f"corrupt torch.export archive ({name}: {fqn!r})", path=path)
            member = os.path.join(folder, meta["path_name"])  # noqa: PTH118 - as torch joins
            if meta["path_name"].startswith(("opaque_obj_", "custom_obj_")):
                raise UnsafePickleError(
                    f"constant {fqn!r} is a pickled Python object ({member}), not a tensor; "
                    "loading it runs code from the file",
                    hint=_HINT,
                    path=path,
                )
            (pickled if meta.get("use_pickle") else raw).add(member)
    for member in sorted(pickled):  # a member declared raw elsewhere is unpickled all the same
        if reader.has_record(member):  # type: ignore[attr-defined]
            data = read(member)
            if data:
                _check_tensors(load_weights_only(data, path, member), path, member)
    known = {m.lower() for m in pickled | raw}
    for name in records:  # anything else under data/ that is a pickle: checked all the same
        if name.startswith("data/") and name.lower() not in known and not name.endswith(".json"):
            data = read(name)
            if data[:1] == b"\x80" or data[:4] == b"PK\x03\x04":
                load_weights_only(data, path, name)


_PLAIN_VALUES = (int, float, complex, bool, str, bytes, type(None))


def _check_tensors(obj: Any, path: Path, member: str) -> None:
    """Weights-only unpickling gives tensors in containers; anything else is refused."""
    import torch

    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif not isinstance(item, _PLAIN_VALUES) and not isinstance(
            item, (torch.Tensor, torch.dtype, torch.device, torch.layout, torch.memory_format)
        ):
            raise UnsafePickleError(
                f"member {member} holds a {type(item).__name__}, not tensors",
                hint=_HINT,
                path=path,
            )


def _parse_json(data: bytes, path: Path, member: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise LoadError(
            f"corrupt torch.export archive ({member} is not valid JSON)", path=path
        ) from e


def _strings(document: Any) -> Iterator[tuple[str, str]]:
    """(key, string) for every string in a JSON document, dict keys included."""
    stack: list[tuple[str, Any]] = [("", document)]
    while stack:
        key, item = stack.pop()
        if isinstance(item, str):
            yield key, item
        elif isinstance(item, dict):
            for k, v in item.items():
                yield "", k
                stack.append((k, v))
        elif isinstance(item, list):
            stack.extend((key, v) for v in item)


def _check_strings(document: Any, path: Path, member: str) -> None:
    for key, text in _strings(document):
        if key == "expr_str":
            why = _bad_expression(text)
            if why is not None:
                raise UnsafePickleError(
                    f"{member}: the symbolic size {text[:60]!r} has {why}; torch would "
                    "evaluate it as Python (sympy.sympify)",
                    hint=_HINT,
                    path=path,
                )
            continue
        if key in _MULTILINE_TEXT:
            bad = _has_control(text, allow="\n\t")
        elif key in _FREE_TEXT:
            bad = _has_control(text)
        else:
            bad = '"' in text or "\\" in text or _has_control(text)
        if bad:
            raise UnsafePickleError(
                f"{member}: {key or 'a key'} {text[:60]!r} has a quote, backslash or control "
                "character; torch would write it into Python code it runs",
                hint=_HINT,
                path=path,
            )


def _has_control(text: str, allow: str = "") -> bool:
    return any(unicodedata.category(c) in ("Cc", "Zl", "Zp") and c not in allow for c in text)


# --------------------------------------------------------------------------- expressions

# torch writes symbolic sizes with sympy's srepr (``Add(Mul(Integer(2), Symbol('s0',
# positive=True, integer=True)), Integer(1))``) and parses them back with sympy.sympify,
# which is eval, in a namespace holding sympy and these torch functions
_FUNCTIONS = frozenset(
    {
        # sympy classes srepr writes
        "Add", "Mul", "Max", "Min", "Abs", "floor", "ceiling", "Equality", "Unequality",
        "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "Eq", "Ne", "Lt",
        "Le", "Gt", "Ge", "And", "Or", "Not", "Piecewise", "ExprCondPair", "ITE",
        # torch.utils._sympy.functions, as the deserializer names them
        "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
        "FloorToInt", "CeilDiv", "RShift", "FloatTrueDiv", "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
        "RoundDecimal", "ToFloat", "Identity",
    }
)  # fmt: skip
# powers: the exponent (second argument) must be a small literal
_POWERS = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift"})
_CONSTANTS = frozenset({"oo", "zoo", "nan", "int_oo", "true", "false", "True", "False"})
_MAX_EXPONENT = 64
_MAX_POWER_DEPTH = 2  # (b**64)**64 has 2**12 bits of b; a third level would have 2**18
_MAX_INT = 2**64
_MAX_PRECISION = 1024  # Float('1.5', precision=53): bits, which sympy allocates
_MAX_EXPR = 100_000
_MAX_DEPTH = 60
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,6})?")


def _symbol_name(name: str) -> bool:
    from torch.utils._sympy.symbol import prefix_str

    return any(
        name.startswith(prefix) and name[len(prefix) :].isdigit() for prefix in prefix_str.values()
    )


def _bad_expression(text: str) -> str | None:
    """Why ``text`` is not a symbolic-size expression sympify may evaluate, or None."""
    if len(text) > _MAX_EXPR:
        return "an over-long expression"
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "an expression that is not arithmetic"
    try:
        _check_node(tree.body, 0, 0)
    except (ValueError, RecursionError) as e:
        return str(e) if isinstance(e, ValueError) else "an expression nested too deeply"
    return None


def _int_literal(node: ast.AST, limit: int) -> bool:
    """``k``, ``-k`` or ``Integer(k)`` with ``|k| <= limit``."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "Integer"
        and len(node.args) == 1
        and not node.keywords
    ):
        node = node.args[0]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
    return isinstance(node, ast.Constant) and type(node.value) is int and node.value <= limit


def _small_exponent(node: ast.AST) -> bool:
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "Rational"
        and len(node.args) == 2
        and not node.keywords
    ):
        return all(_int_literal(a, _MAX_EXPONENT) for a in node.args)
    return _int_literal(node, _MAX_EXPONENT)


_BINOPS = (
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.BitAnd,
    ast.BitOr,
)  # fmt: skip
_UNARY = (ast.USub, ast.UAdd, ast.Not, ast.Invert)
_COMPARE = (ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq)


def _check_node(node: ast.AST, depth: int, powers: int) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError("an expression nested too deeply")
    d = depth + 1
    if isinstance(node, ast.BinOp) and isinstance(node.op, _BINOPS):
        if isinstance(node.op, ast.Pow):
            _check_power(node.left, node.right, d, powers)
            return
        _check_node(node.left, d, powers)
        _check_node(node.right, d, powers)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, _UNARY):
        _check_node(node.operand, d, powers)
    elif isinstance(node, ast.Compare) and all(isinstance(op, _COMPARE) for op in node.ops):
        for child in (node.left, *node.comparators):
            _check_node(child, d, powers)
    elif isinstance(node, ast.BoolOp):
        for child in node.values:
            _check_node(child, d, powers)
    elif isinstance(node, ast.Tuple):  # Piecewise((expr, cond), ...)
        for child in node.elts:
            _check_node(child, d, powers)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        _check_call(node, node.func.id, d, powers)
    elif isinstance(node, ast.Name):
        if node.id not in _CONSTANTS and not _symbol_name(node.id):
            raise ValueError(f"the name {node.id!r}")
    elif isinstance(node, ast.Constant):
        if type(node.value) not in (int, float, bool):
            raise ValueError("a constant that is not a number")
        if type(node.value) is int and abs(node.value) > _MAX_INT:
            raise ValueError("an integer too large")
    else:
        raise ValueError(f"a {type(node).__name__} that is not arithmetic")


def _bool_literal(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is bool


def _check_power(base: ast.AST, exponent: ast.AST, depth: int, powers: int) -> None:
    if not _small_exponent(exponent) or powers >= _MAX_POWER_DEPTH:
        raise ValueError("a power that could take unbounded time or memory")
    _check_node(base, depth, powers + 1)


def _check_call(node: ast.Call, name: str, depth: int, powers: int) -> None:
    args, keywords = node.args, node.keywords
    if any(isinstance(a, ast.Starred) for a in args) or any(k.arg is None for k in keywords):
        raise ValueError(f"a call of {name!r} with unpacked arguments")
    if name == "Symbol":  # Symbol('s77', positive=True, integer=True)
        if not (
            len(args) == 1
            and isinstance(args[0], ast.Constant)
            and isinstance(args[0].value, str)
            and args[0].value.isidentifier()
            and all(_bool_literal(k.value) for k in keywords)
        ):
            raise ValueError("a Symbol(...) that is not a plain symbol")
    elif name == "Integer":
        if len(args) != 1 or keywords or not _int_literal(args[0], _MAX_INT):
            raise ValueError("an Integer(...) that is not a small integer")
    elif name == "Rational":
        if len(args) != 2 or keywords or not all(_int_literal(a, _MAX_INT) for a in args):
            raise ValueError("a Rational(...) that is not two small integers")
    elif name == "Float":  # Float('1.5', precision=53)
        literal = args[0] if len(args) == 1 else None
        if not (
            isinstance(literal, ast.Constant)
            and (
                type(literal.value) in (int, float)
                or (isinstance(literal.value, str) and _NUMBER.fullmatch(literal.value))
            )
            and all(
                k.arg == "precision" and _int_literal(k.value, _MAX_PRECISION) for k in keywords
            )
        ):
            raise ValueError("a Float(...) that is not a plain number")
    elif name in _POWERS:
        if len(args) != 2 or keywords:
            raise ValueError(f"a call of {name!r} with other than two arguments")
        _check_power(args[0], args[1], depth, powers)
    elif name in _FUNCTIONS and not keywords:
        for arg in args:
            _check_node(arg, depth, powers)
    else:
        raise ValueError(f"a call of {name!r}")


# --------------------------------------------------------------------------- program


def check_program(ep: Any, path: Path) -> None:
    """Refuse a loaded program whose graphs call anything but operators (nothing ran yet)."""
    import torch
    from torch import fx

    try:
        from torch._export.serde.serialize import _SYM_OPS

        builtins: set[Any] = set(_SYM_OPS)
    except ImportError:  # private; the operator module covers what it held in 2.14
        builtins = set()
    builtins |= {operator.getitem}
    for module in ep.graph_module.modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, fx.Graph):
            continue
        for node in graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                pass
            elif node.op == "call_function":
                if not (_is_operator(node.target) or node.target in builtins):
                    _refuse_target(node, node.target, path)
            else:
                _refuse_target(node, node.op, path)
            for value in (*node.args, *node.kwargs.values()):
                fx.node.map_aggregate(value, partial(_check_leaf, node=node, path=path))
    for name, value in ep.constants.items():
        if not isinstance(value, torch.Tensor):
            raise UnsafePickleError(
                f"constant {name!r} is a {type(value).__name__}, not a tensor",
                hint=_HINT,
                path=path,
            )


def _is_operator(target: Any) -> bool:
    import torch

    return isinstance(
        target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)
    )


def _check_leaf(leaf: Any, *, node: Any, path: Path) -> Any:
    import torch
    from torch import fx

    plain = (
        fx.Node, torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool, torch.dtype,
        torch.device, torch.layout, torch.memory_format, int, float, complex, bool, str,
        type(None), type(Ellipsis),
    )  # fmt: skip
    if not isinstance(leaf, plain) and not _is_operator(leaf):
        _refuse_target(node, leaf, path)
    return leaf


def _refuse_target(node: Any, what: Any, path: Path) -> None:
    name = getattr(what, "__qualname__", None) or type(what).__name__
    module = getattr(what, "__module__", None)
    label = f"{module}.{name}" if module else str(name)
    raise UnsafePickleError(
        f"graph node {node.name!r} would call {label}, which is not a torch operator; "
        "running the program would run code named by the file",
        hint=_HINT,
        path=path,
    )


# --------------------------------------------------------------------------- pytree types


def pytree_types(path: Path) -> set[str]:
    """Every pytree type the archive's input and output specs name (``None`` left out)."""
    import torch

    names: set[str] = set()
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        records = [r for r in reader.get_all_records() if r.startswith("models/")]
        documents = [json.loads(bytes(reader.get_record(r))) for r in records]
    except Exception:  # noqa: BLE001 - torch.export.load reports what is wrong
        return names
    for document in documents:
        for key, text in _strings(document):
            if key not in ("in_spec", "out_spec"):
                continue
            try:
                spec = json.loads(text)
            except (ValueError, RecursionError):
                continue
            stack = [spec]
            while stack:
                item = stack.pop()
                if isinstance(item, dict):
                    if isinstance(item.get("type"), str):
                        names.add(item["type"])
                    stack.extend(item.values())
                elif isinstance(item, list):
                    stack.extend(item)
    return names


_IMPORTABLE = (
    re.compile(r"transformers\.modeling_outputs"),
    re.compile(r"transformers\.models\.[a-z0-9_]+\.modeling_[a-z0-9_]+"),
)


def register_pytree_types(names: set[str], path: Path) -> list[str]:
    """Import the modules that register the archive's pytree types, from an allowlist.

    Returns notes; raises LoadError naming the package when a type stays unregistered.
    """
    import importlib
    import importlib.util

    from torch.utils import _pytree

    notes: list[str] = []
    for name in sorted(names):
        if name in _pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            continue
        module = name.rpartition(".")[0]
        package = module.split(".", 1)[0]
        if any(p.fullmatch(module) for p in _IMPORTABLE):
            if importlib.util.find_spec(package) is None:
                raise LoadError(
                    f"the program's inputs or outputs are a {name}, a type the package "
                    f"{package!r} registers; it is not installed",
                    hint=f"pip install {package}",
                    path=path,
                )
            try:
                importlib.import_module(module)
            except Exception as e:
                raise LoadError(
                    f"the program's inputs or outputs are a {name}; importing {module} to "
                    f"register it failed ({_short(e)})",
                    path=path,
                ) from e
            if name in _pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
                notes.append(f"imported {module} to read the program's {name.rpartition('.')[2]}")
                continue
        raise LoadError(
            f"the program's inputs or outputs are a {name}, a pytree type no imported "
            f"package registers",
            hint=f"bnfold imports only known output modules; load the archive from Python "
            f"after importing {package!r}, or save the program with plain tensor outputs",
            path=path,
        )
    return notes


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]

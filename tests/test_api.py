"""Issue 16: bnfold as a Python library, tested through its public names only."""

from __future__ import annotations

import copy
import doctest
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app
from tests.models import randomize_all, state_fingerprint

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"


def test_public_surface_is_pinned():
    """``__all__`` is the public surface: an accidental export or removal fails here."""
    assert sorted(bnfold.__all__) == [
        "ArchError", "BnfoldError", "CaptureError", "CheckReport", "ExportError", "FoldError",
        "FoldReport", "FoldResult", "FuseReport", "InspectReport", "LoadError", "OutputError",
        "RecalibrationReport", "UnsafePickleError", "VerifyError", "__version__", "check",
        "fold", "fuse", "inspect", "recalibrate",
    ]  # fmt: skip
    for name in bnfold.__all__:
        assert getattr(bnfold, name) is not None
    assert issubclass(bnfold.LoadError, bnfold.BnfoldError)
    assert (ROOT / "bnfold" / "py.typed").is_file()


def test_import_is_light():
    """``import bnfold`` imports neither torch nor onnx (they load when a function runs)."""
    code = (
        "import sys, bnfold; "
        "print(sorted(m for m in ('torch', 'onnx', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_docstring_examples_run():
    """Every public function's docstring example runs and prints what it says."""
    from bnfold import api

    result = doctest.testmod(api, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0


def resnet(seed: int = 0) -> nn.Module:
    """torchvision resnet18 with random weights and BN statistics from train-mode passes."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10).train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        for _ in range(2):
            model(torch.randn(4, 3, 64, 64))
    return model.eval()


def test_fold_matches_the_original_and_beats_fx_fuse():
    """fold(model, x).module: the model given is bit-identical after, every BN fx's fuse
    folds is folded, and the folded module equals a float64 run of the original on inputs
    other than the example (another batch size, scaled by 100)."""
    from torch.fx.experimental.optimization import fuse as fx_fuse

    model = resnet()
    before = state_fingerprint(model)
    result = bnfold.fold(model, torch.randn(1, 3, 64, 64))
    after = state_fingerprint(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    fx_left = sum(isinstance(m, nn.BatchNorm2d) for m in fx_fuse(copy.deepcopy(model)).modules())
    ours_left = len(result.skipped)
    assert ours_left <= fx_left and len(result.folded) == 20
    assert result.verification.passed and result.report.dynamic_batch
    reference = copy.deepcopy(model).double()
    for x in (torch.randn(5, 3, 64, 64), 100 * torch.randn(3, 3, 48, 48)):
        with torch.no_grad():
            got, ref = result.module(x).double(), reference(x.double())
        assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_folded_module_exports_scripts_and_saves(tmp_path):
    """The folded module can be torch.export'ed, scripted and saved as a state_dict."""
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    folded = bnfold.fold(model, torch.randn(2, 3, 16, 16)).module
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = folded(x)
        program = torch.export.export(folded, (x,))
        assert torch.allclose(program.module()(x), expected)
        with warnings.catch_warnings():  # TorchScript's own chatter about annotations
            warnings.simplefilter("ignore")
            scripted = torch.jit.script(folded)
        assert torch.allclose(scripted(x), expected)
    torch.save(folded.state_dict(), tmp_path / "folded.pt")
    assert not any("running_mean" in k for k in torch.load(tmp_path / "folded.pt"))


def test_fold_refuses_a_model_in_training_mode():
    """A model in training mode is reported, not silently switched."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(bnfold.BnfoldError, match="training mode"):
        bnfold.fold(model, torch.randn(2, 3, 8, 8))
    assert model.training


def test_fold_with_inputs_of_the_wrong_shape_names_the_input():
    """Example inputs of the wrong shape: which input, its shape, what the model wants."""
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(bnfold.BnfoldError) as info:
        bnfold.fold(model, torch.randn(2, 5, 8, 8))
    text = info.value.one_line()
    assert "input 0: [2, 5, 8, 8]" in text and "(batch, 3, size, size)" in text


@pytest.mark.parametrize("kind", ["path", "module", "exported", "onnx"])
def test_inspect_takes_paths_and_models(kind):
    """inspect() reads a file, an nn.Module, an ExportedProgram and an onnx.ModelProto."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("archs", SAMPLES / "archs.py")
    archs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(archs)
    model = archs.ConvNet()
    model.load_state_dict(torch.load(SAMPLES / "convnet.state_dict.pt"))
    model.eval()
    if kind == "path":
        report = bnfold.inspect(
            SAMPLES / "convnet.state_dict.pt", arch=f"{SAMPLES / 'archs.py'}:ConvNet"
        )
    elif kind == "module":
        report = bnfold.inspect(model)
    elif kind == "exported":
        report = bnfold.inspect(torch.export.export(model, (torch.randn(2, 3, 32, 32),)))
    else:
        report = bnfold.inspect(onnx.load(str(SAMPLES / "convnet.onnx")))
    assert isinstance(report, bnfold.InspectReport)
    assert report.summary.bn_layers >= 3
    assert all(layer.channels > 0 for layer in report.layers)


def test_reports_to_dict_is_the_cli_json(tmp_path):
    """report.to_dict() is exactly the CLI's --format json (inspect and check)."""
    arch = f"{SAMPLES / 'archs.py'}:ConvNet"
    weights = SAMPLES / "convnet.state_dict.pt"
    cli = CliRunner().invoke(app, ["inspect", str(weights), "--arch", arch, "--format", "json"])
    assert cli.exit_code == 0, cli.output
    assert bnfold.inspect(weights, arch=arch).to_dict() == json.loads(cli.stdout)
    onnx_file = SAMPLES / "convnet.onnx"
    cli = CliRunner().invoke(app, ["check", str(onnx_file), "--max-bn", "9", "--format", "json"])
    assert bnfold.check(onnx_file, max_bn=9).to_dict() == json.loads(cli.stdout)


def test_fuse_from_memory_and_check_a_folder(tmp_path):
    """fuse() on an in-memory module writes a verified ONNX file; check() takes a folder."""
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    report = bnfold.fuse(model, tmp_path / "a.onnx", example_inputs=torch.randn(1, 3, 16, 16))
    assert report.verification.passed and report.onnx_bn_nodes == 0
    assert report.to_dict()["verification"]["passed"] is True
    program = torch.export.export(model, (torch.randn(2, 3, 16, 16),))
    bnfold.fuse(program, tmp_path / "b.onnx")
    checked = bnfold.check(tmp_path)
    assert [Path(f.path).name for f in checked.files] == ["a.onnx", "b.onnx"]
    assert checked.passed and checked.exit_code == 0


def test_errors_are_the_error_tree(tmp_path):
    """Bad input raises from the error tree: a caller can tell it from a failed check."""
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(bnfold.LoadError):
        bnfold.inspect(tmp_path / "notes.txt")
    with pytest.raises(bnfold.BnfoldError):
        bnfold.fuse(tmp_path / "missing.pt", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(bnfold.BnfoldError, match="not a model bnfold takes"):
        bnfold.inspect(np.zeros(3))


def readme_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """The README's Python API examples run as written, in order, from a copy of the
    repository's sample models (the README cannot drift from the code)."""
    import shutil

    examples = readme_examples()
    assert len(examples) >= 4
    shutil.copytree(SAMPLES, tmp_path / "sample_models")
    monkeypatch.chdir(tmp_path)
    for code in examples:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})

"""``bnfold.loading``: every format round-tripped, ``--arch`` specs, and every bad file refused.

The format is detected from the content, so every round trip saves under a
misleading extension; every round trip also proves the input file is unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import textwrap
import zipfile
from pathlib import Path

import onnx
import pytest
import torch

from bnfold.errors import ArchError, BnfoldError, LoadError, UnsafePickleError
from bnfold.loading import LoadedModel, ModelFormat, build_arch, load_model
from tests import corrupt
from tests.models import ConvBN, randomize_all

ARCH_SOURCE = textwrap.dedent("""
    from torch import nn

    class Net(nn.Module):
        def __init__(self, width=8):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, bias=False)
            self.bn = nn.BatchNorm2d(width)

        def forward(self, x):
            return self.bn(self.conv(x))

    def make_net(width=8):
        return Net(width)

    NOT_A_MODULE = 3
""")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model() -> ConvBN:
    torch.manual_seed(0)
    return randomize_all(ConvBN())


@pytest.fixture
def sd(model) -> dict[str, torch.Tensor]:
    return model.state_dict()


@pytest.fixture(scope="module")
def exported_archive(tmp_path_factory) -> Path:
    """A torch.export archive of ConvBN, saved once for the module (export is slow)."""
    torch.manual_seed(0)
    m = randomize_all(ConvBN())
    path = tmp_path_factory.mktemp("export") / "program.pt"  # misleading: it is a .pt2
    torch.export.save(torch.export.export(m, (torch.randn(1, 3, 8, 8),)), path)
    return path


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory) -> tuple[Path, Path]:
    """resnet18 (10 classes) weights, and a copy that fits resnet18 badly in three ways."""
    import torchvision

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("resnet")
    sd = torchvision.models.resnet18(num_classes=10).state_dict()
    good = folder / "resnet18.onnx"  # misleading extension on purpose
    torch.save(sd, good)
    bad_sd = dict(sd)
    del bad_sd["layer1.0.bn1.running_var"]
    bad_sd["extra.weight"] = torch.zeros(2)
    bad = folder / "resnet18_bad.pt"
    torch.save(bad_sd, bad)
    return good, bad


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["weights.pt", "weights.safetensors", "weights.onnx", "weights"])
def test_plain_state_dict_round_trip(tmp_path, sd, name):
    """A torch.save'd state_dict loads as STATE_DICT with identical tensors, whatever the name."""
    path = tmp_path / name
    torch.save(sd, path)
    digest = sha(path)
    loaded = load_model(path)
    assert loaded.format is ModelFormat.STATE_DICT
    assert loaded.module is None and loaded.onnx_model is None
    assert not loaded.architecture_known
    assert loaded.path == path
    assert_same_tensors(loaded.state_dict, sd)
    assert loaded.notes == []
    assert sha(path) == digest


def test_legacy_pickle_state_dict_round_trip(tmp_path, sd):
    """The pre-1.6 (non-zip) torch.save format is detected by its pickle header."""
    path = tmp_path / "weights.zip"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"
    digest = sha(path)
    loaded = load_model(path)
    assert loaded.format is ModelFormat.STATE_DICT
    assert_same_tensors(loaded.state_dict, sd)
    assert sha(path) == digest


def test_checkpoint_with_state_dict_key(tmp_path, sd):
    """{'state_dict': ..., 'epoch': ...} loads as CHECKPOINT and says which key it used."""
    path = tmp_path / "ckpt.onnx"
    torch.save({"state_dict": sd, "epoch": 12, "optimizer": {"lr": 0.1}}, path)
    digest = sha(path)
    loaded = load_model(path)
    assert loaded.format is ModelFormat.CHECKPOINT
    assert_same_tensors(loaded.state_dict, sd)
    assert loaded.notes == ["state_dict taken from checkpoint key 'state_dict'"]
    assert sha(path) == digest


def test_checkpoint_dataparallel_prefix_is_stripped(tmp_path, sd):
    """{'model_state_dict': {'module.' + k: v}} loads with the DataParallel prefix removed."""
    path = tmp_path / "ddp.pt"
    torch.save({"model_state_dict": {"module." + k: v for k, v in sd.items()}, "step": 3}, path)
    digest = sha(path)
    loaded = load_model(path)
    assert loaded.format is ModelFormat.CHECKPOINT
    assert_same_tensors(loaded.state_dict, sd)
    assert loaded.notes[0] == "state_dict taken from checkpoint key 'model_state_dict'"
    assert any("'module.'" in note for note in loaded.notes)
    assert sha(path) == digest


def test_lightning_checkpoint_prefix_is_stripped(tmp_path, sd):
    """A Lightning checkpoint ({'state_dict': {'model.' + k}, 'pytorch-lightning_version'})."""
    path = tmp_path / "epoch=3.ckpt"
    torch.save(
        {
            "state_dict": {"model." + k: v for k, v in sd.items()},
            "pytorch-lightning_version": "2.4",
            "epoch": 3,
            "global_step": 100,
        },
        path,
    )
    digest = sha(path)
    loaded = load_model(path)
    assert loaded.format is ModelFormat.CHECKPOINT
    assert_same_tensors(loaded.state_dict, sd)
    assert any("'model.'" in note for note in loaded.notes)
    assert sha(path) == digest


def test_lightning_checkpoint_fits_arch(tmp_path, sd):
    """A Lightning checkpoint with --arch fills the module with the prefix-stripped weights."""
    arch = tmp_path / "convbn_arch.py"
    arch.write_text("from tests.models import ConvBN\n")
    path = tmp_path / "lightning.ckpt"
    torch.save(
        {
            "state_dict": {"model." + k: v for k, v in sd.items()},
            "pytorch-lightning_version": "2.4",
        },
        path,
    )
    loaded = load_model(path, arch=f"{arch}:ConvBN")
    assert isinstance(loaded.module, ConvBN)
    assert_same_tensors(loaded.module.state_dict(), sd)


def test_whole_pickled_module_is_refused_without_trust(tmp_path, model):
    """torch.save(model) needs arbitrary unpickling: UnsafePickleError naming --trust-pickle."""
    path = tmp_path / "model.onnx"
    torch.save(model, path)
    digest = sha(path)
    with pytest.raises(UnsafePickleError) as info:
        load_model(path)
    assert info.value.path == path
    assert "pickled Python objects" in info.value.message
    assert "--trust-pickle" in info.value.one_line()
    assert info.value.exit_code == 2
    assert sha(path) == digest


def test_whole_pickled_module_loads_with_trust(tmp_path, model, sd):
    """With trust_pickle the pickled module loads as PICKLED_MODULE with its architecture."""
    path = tmp_path / "model.pt2"
    torch.save(model, path)
    digest = sha(path)
    loaded = load_model(path, trust_pickle=True)
    assert loaded.format is ModelFormat.PICKLED_MODULE
    assert isinstance(loaded.module, ConvBN)
    assert loaded.architecture_known
    assert_same_tensors(loaded.state_dict, sd)
    assert sha(path) == digest


def test_checkpoint_holding_a_module_loads_with_trust(tmp_path, model, sd):
    """{'model': nn.Module} with trust_pickle takes the module from the checkpoint key."""
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model, "epoch": 1}, path)
    with pytest.raises(UnsafePickleError):
        load_model(path)
    loaded = load_model(path, trust_pickle=True)
    assert loaded.format is ModelFormat.CHECKPOINT
    assert isinstance(loaded.module, ConvBN)
    assert loaded.notes == ["module taken from checkpoint key 'model'"]
    assert_same_tensors(loaded.state_dict, sd)


def test_torchscript_round_trip(tmp_path, model, sd):
    """A torch.jit.save archive loads as TORCHSCRIPT with its module and weights."""
    path = tmp_path / "model.safetensors"
    torch.jit.save(torch.jit.script(model), str(path))
    digest = sha(path)
    loaded = load_model(path)
    assert loaded.format is ModelFormat.TORCHSCRIPT
    assert isinstance(loaded.module, torch.jit.ScriptModule)
    assert_same_tensors(loaded.state_dict, sd)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model(x), rtol=0, atol=0)
    assert sha(path) == digest


def test_torchscript_ignores_arch(tmp_path, model):
    """--arch on a file that carries its architecture is ignored, with a note saying so."""
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded = load_model(path, arch="torchvision:resnet18")
    assert isinstance(loaded.module, torch.jit.ScriptModule)
    assert loaded.arch is None
    assert loaded.notes == [
        "--arch torchvision:resnet18 ignored: the file carries its architecture"
    ]


def test_torch_export_round_trip(exported_archive):
    """A torch.export archive (saved as .pt) loads as EXPORTED_PROGRAM with every weight."""
    digest = sha(exported_archive)
    torch.manual_seed(0)
    want = randomize_all(ConvBN()).state_dict()
    loaded = load_model(exported_archive)
    assert loaded.format is ModelFormat.EXPORTED_PROGRAM
    assert loaded.module is not None
    assert_same_tensors(loaded.state_dict, want)
    assert sha(exported_archive) == digest


def test_safetensors_round_trip(tmp_path, sd):
    """A safetensors file (saved as .pt) loads as SAFETENSORS with identical tensors."""
    from safetensors.torch import save_file

    path = tmp_path / "model.pt"
    save_file(sd, str(path))
    digest = sha(path)
    loaded = load_model(path)
    assert loaded.format is ModelFormat.SAFETENSORS
    assert loaded.module is None
    assert_same_tensors(loaded.state_dict, sd)
    assert sha(path) == digest


def test_safetensors_with_arch(tmp_path, sd):
    """safetensors weights plus --arch give a filled module in eval mode."""
    from safetensors.torch import save_file

    arch = tmp_path / "net_arch.py"
    arch.write_text("from tests.models import ConvBN\n")
    path = tmp_path / "model.bin"
    save_file(sd, str(path))
    loaded = load_model(path, arch=f"{arch}:ConvBN")
    assert loaded.format is ModelFormat.SAFETENSORS
    assert isinstance(loaded.module, ConvBN)
    assert not loaded.module.training
    assert_same_tensors(loaded.module.state_dict(), sd)


def test_onnx_round_trip_keeps_batchnorm(tmp_path, model):
    """An ONNX export (saved as .bin) loads as ONNX with its BatchNormalization node intact."""
    path = tmp_path / "model.bin"
    torch.onnx.export(
        model,
        (torch.randn(1, 3, 8, 8),),
        str(path),
        dynamo=False,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
    )
    digest = sha(path)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops == ["Conv", "BatchNormalization"]  # the exporter kept the BN
    loaded = load_model(path)
    assert loaded.format is ModelFormat.ONNX
    assert loaded.state_dict is None and loaded.module is None
    assert loaded.architecture_known
    assert [n.op_type for n in loaded.onnx_model.graph.node] == ops
    bn = loaded.onnx_model.graph.node[1]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in loaded.onnx_model.graph.initializer}
    torch.testing.assert_close(torch.tensor(inits[bn.input[4]]), model.bn.running_var)
    assert sha(path) == digest


def test_onnx_external_data_inside_folder_loads(tmp_path):
    """ONNX external data stored next to the model is read in."""
    (tmp_path / "weights.data").write_bytes(bytes(torch.full((4,), 4.0).numpy().tobytes()))
    path = tmp_path / "model.pt"
    onnx.save(corrupt.onnx_conv_bn("weights.data"), str(path))
    loaded = load_model(path)
    var = next(t for t in loaded.onnx_model.graph.initializer if t.name == "var")
    assert onnx.numpy_helper.to_array(var).tolist() == [4.0, 4.0, 4.0, 4.0]


def test_onnx_refuses_arch(tmp_path):
    """--arch with an ONNX file is an ArchError."""
    path = tmp_path / "model.onnx"
    onnx.save(corrupt.onnx_conv_bn(), str(path))
    with pytest.raises(ArchError, match="does not apply to ONNX"):
        load_model(path, arch="torchvision:resnet18")


# --------------------------------------------------------------------------- --arch


def test_arch_from_file(tmp_path, sd):
    """--arch path/file.py:Net builds Net, fills it strictly and puts it in eval mode."""
    arch = tmp_path / "mynet.py"
    arch.write_text(ARCH_SOURCE)
    net_sd = {k: v for k, v in sd.items() if k != "conv.bias"}
    path = tmp_path / "weights.pt"
    torch.save(net_sd, path)
    digest = sha(path)
    spec = f"{arch}:Net"
    loaded = load_model(path, arch=spec)
    assert loaded.format is ModelFormat.STATE_DICT
    assert type(loaded.module).__name__ == "Net"
    assert loaded.arch == spec
    assert not loaded.module.training
    assert loaded.architecture_known
    assert_same_tensors(loaded.module.state_dict(), net_sd)
    assert sha(path) == digest


def test_arch_from_file_factory_with_kwargs(tmp_path):
    """--arch file.py:factory passes --arch-kwargs to the callable."""
    arch = tmp_path / "mynet.py"
    arch.write_text(ARCH_SOURCE)
    module = build_arch(f"{arch}:make_net", {"width": 5})
    assert module.bn.num_features == 5


def test_arch_torchvision_resnet18_fits(resnet_files):
    """--arch torchvision:resnet18 with num_classes=10 fills every weight of the file."""
    good, _ = resnet_files
    want = torch.load(good, weights_only=True)
    loaded = load_model(good, arch="torchvision:resnet18", arch_kwargs={"num_classes": 10})
    assert loaded.format is ModelFormat.STATE_DICT
    assert type(loaded.module).__name__ == "ResNet"
    assert loaded.arch == "torchvision:resnet18"
    assert not loaded.module.training
    assert_same_tensors(loaded.module.state_dict(), want)


def test_arch_mismatch_lists_missing_unexpected_and_shapes(resnet_files):
    """Weights that do not fit --arch: one ArchError naming missing, unexpected and shape keys."""
    _, bad = resnet_files
    with pytest.raises(ArchError) as info:
        load_model(bad, arch="torchvision:resnet18")  # 1000 classes: fc shapes differ
    message = info.value.message
    assert "1 missing: layer1.0.bn1.running_var" in message
    assert "1 unexpected: extra.weight" in message
    assert (
        "2 shape mismatch (file vs arch): fc.weight (10, 512) vs (1000, 512), "
        "fc.bias (10,) vs (1000,)" in message
    )
    assert info.value.path == bad
    assert isinstance(info.value, BnfoldError)


def test_arch_module_not_importable(tmp_path, sd):
    """--arch naming a module that does not exist: ArchError saying it cannot import it."""
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    with pytest.raises(ArchError) as info:
        load_model(path, arch="bnfold_no_such_package.models:Net")
    assert "cannot import bnfold_no_such_package.models" in info.value.message


def test_arch_missing_attribute(tmp_path, sd):
    """--arch file.py:Missing: ArchError naming the attribute."""
    arch = tmp_path / "mynet.py"
    arch.write_text(ARCH_SOURCE)
    with pytest.raises(ArchError) as info:
        build_arch(f"{arch}:Missing", {})
    assert "has no attribute 'Missing'" in info.value.message


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("no_colon_at_all", "is not of the form"),
        ("{dir}/absent.py:Net", "no such file"),
        ("{dir}/mynet.py:NOT_A_MODULE", "'int' object is not callable"),
        ("collections:OrderedDict", "returned a OrderedDict, not an nn.Module"),
        ("torchvision:no_such_model_name", "could not be built"),
        ("{dir}/mynet.py:Net", "could not be built"),  # with a bad keyword argument
    ],
)
def test_bad_arch_specs(tmp_path, spec, needle):
    """Every malformed or unbuildable --arch is an ArchError with a telling message."""
    (tmp_path / "mynet.py").write_text(ARCH_SOURCE)
    kwargs = {"no_such_kwarg": 1} if spec.endswith("mynet.py:Net") else {}
    with pytest.raises(ArchError) as info:
        build_arch(spec.format(dir=tmp_path), kwargs)
    assert needle in info.value.message


# --------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    """A path that does not exist: LoadError 'no such file'."""
    with pytest.raises(LoadError, match="no such file"):
        load_model(tmp_path / "absent.pt")


def test_directory(tmp_path):
    """A directory: LoadError 'is a directory'."""
    with pytest.raises(LoadError, match="is a directory"):
        load_model(tmp_path)


def test_empty_file(tmp_path):
    """An empty file: LoadError 'the file is empty'."""
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(LoadError, match="the file is empty"):
        load_model(path)


def test_text_file(tmp_path):
    """A text file: LoadError saying it is text, not a model."""
    path = tmp_path / "model.pt"
    path.write_text("# not a model\nlayers: [conv, bn]\n")
    with pytest.raises(LoadError, match="text file, not a model"):
        load_model(path)


@pytest.mark.parametrize("keep", [4, 30, 200, 0.5, -200, -22, -1])
def test_truncated_torch_save(tmp_path, sd, keep):
    """A torch.save zip cut anywhere is a LoadError saying it is corrupt or truncated."""
    source = tmp_path / "full.pt"
    torch.save(sd, source)
    size = source.stat().st_size
    cut = int(size * keep) if isinstance(keep, float) else keep
    path = corrupt.truncated(source, tmp_path, cut)
    with pytest.raises(LoadError) as info:
        load_model(path)
    assert type(info.value) is LoadError
    assert "corrupt" in info.value.message or "truncated" in info.value.message


def test_bit_flip_in_pickle(tmp_path, sd):
    """A flipped bit inside data.pkl (a global's name) is refused, never loaded."""
    source = tmp_path / "full.pt"
    torch.save(sd, source)
    offset = source.read_bytes().index(b"collections") + 2
    path = corrupt.bit_flipped(source, tmp_path, offset)
    with pytest.raises(LoadError):
        load_model(path)


@pytest.mark.parametrize("field", ["name_length", "name_byte"])
def test_bit_flip_in_zip_central_directory(tmp_path, sd, field):
    """A bit flip in a zip member's name or name length is a LoadError, not UnicodeDecodeError."""
    source = tmp_path / "full.pt"
    torch.save(sd, source)
    record = corrupt.central_record_of(source, "data.pkl")
    # central-directory record: file name length at +28 (2 bytes), file name at +46
    offset = record + 28 if field == "name_length" else record + 46
    bit = 4 if field == "name_length" else 7  # +16 bytes of name; a byte >= 0x80 (bad UTF-8)
    path = corrupt.bit_flipped(source, tmp_path, offset, bit=bit)
    with pytest.raises(LoadError) as info:
        load_model(path)
    assert "corrupt" in info.value.message


def test_bit_flip_in_export_archive_member(exported_archive, tmp_path):
    """A bit flip in a torch.export member (bad CRC) is a LoadError, not BadZipFile."""
    offset = corrupt.member_data_offset(exported_archive, "models/model.json") + 10
    path = corrupt.bit_flipped(exported_archive, tmp_path, offset, bit=0, name="flipped.pt2")
    with pytest.raises(LoadError) as info:
        load_model(path)
    assert "corrupt" in info.value.message


def test_export_archive_torch_rejects(exported_archive, tmp_path):
    """An export archive zipfile accepts but torch's reader rejects: LoadError naming it."""
    path = corrupt.export_archive_with_wrong_size(exported_archive, tmp_path)
    with pytest.raises(LoadError, match=r"corrupt torch\.export archive"):
        load_model(path)


@pytest.mark.parametrize(
    ("kind", "stride"), [("torch_save", 13), ("torchscript", 29), ("torch_export", 61)]
)
def test_bit_flips_anywhere_never_escape_as_other_errors(
    tmp_path, model, exported_archive, kind, stride
):
    """Flipping one bit at any of many offsets either still loads or raises a LoadError."""
    source = tmp_path / "full.pt"
    if kind == "torch_save":
        torch.save(model.state_dict(), source)
    elif kind == "torchscript":
        torch.jit.save(torch.jit.script(model), str(source))
    else:
        source = exported_archive
    size = source.stat().st_size
    escaped = []
    for offset in range(0, size, stride):
        path = corrupt.bit_flipped(source, tmp_path, offset, bit=offset % 8)
        try:
            assert isinstance(load_model(path), LoadedModel)
        except LoadError:
            pass
        except Exception as e:  # noqa: BLE001 - collected and reported below
            escaped.append((offset, f"{type(e).__name__}: {e}"[:120]))
    assert escaped == [], escaped


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_bytes(tmp_path, seed):
    """Random bytes: LoadError saying it is not a model bnfold can read."""
    path = corrupt.random_bytes(tmp_path, seed)
    with pytest.raises(LoadError, match="not a model bnfold can read"):
        load_model(path)


def test_zip_that_is_not_a_model(tmp_path):
    """A valid zip without data.pkl, TorchScript code or an export program: LoadError."""
    with pytest.raises(LoadError, match="ZIP archive that is not a PyTorch model"):
        load_model(corrupt.foreign_zip(tmp_path))


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ([1, 2, 3], "holds a list, not a model"),
        ({"epoch": 3, "lr": 0.1}, "no tensors and no state_dict"),
        ({}, "no tensors and no state_dict"),
    ],
)
def test_torch_save_without_weights(tmp_path, payload, needle):
    """torch.save of something that holds no weights: LoadError saying what it holds."""
    path = tmp_path / "x.pt"
    torch.save(payload, path)
    with pytest.raises(LoadError, match=needle):
        load_model(path)


@pytest.mark.parametrize("keep", [0.5, -1])
def test_truncated_safetensors_data(tmp_path, sd, keep):
    """A safetensors file cut inside its data: LoadError 'truncated safetensors file'."""
    from safetensors.torch import save_file

    source = tmp_path / "full.safetensors"
    save_file(sd, str(source))
    size = source.stat().st_size
    cut = int(size * keep) if isinstance(keep, float) else keep
    _, data = corrupt.safetensors_parts(source)
    assert (cut if cut >= 0 else size + cut) > size - len(data)  # the cut is inside the data
    path = corrupt.truncated(source, tmp_path, cut, name="cut.safetensors")
    with pytest.raises(LoadError, match="truncated safetensors file"):
        load_model(path)


def test_truncated_safetensors_header(tmp_path, sd):
    """A safetensors file cut inside its JSON header: a LoadError, never a crash."""
    from safetensors.torch import save_file

    source = tmp_path / "full.safetensors"
    save_file(sd, str(source))
    path = corrupt.truncated(source, tmp_path, 40, name="cut.safetensors")
    with pytest.raises(LoadError, match="corrupt"):
        load_model(path)


def test_safetensors_offsets_past_the_end(tmp_path, sd):
    """Header offsets that point past the end of the file: LoadError naming the tensor."""
    from safetensors.torch import save_file

    source = tmp_path / "full.safetensors"
    save_file(sd, str(source))
    header, data = corrupt.safetensors_parts(source)
    header["bn.running_var"]["data_offsets"] = [len(data) + 64, len(data) + 96]
    path = corrupt.write_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(LoadError, match=r"'bn\.running_var' lies past the end"):
        load_model(path)


def test_safetensors_size_mismatch(tmp_path, sd):
    """Offsets inside the file but the wrong size for dtype x shape: LoadError."""
    from safetensors.torch import save_file

    source = tmp_path / "full.safetensors"
    save_file(sd, str(source))
    header, data = corrupt.safetensors_parts(source)
    begin, _ = header["bn.running_var"]["data_offsets"]
    header["bn.running_var"]["data_offsets"] = [begin, begin + 4]
    path = corrupt.write_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(LoadError, match="size mismatch"):
        load_model(path)


@pytest.mark.parametrize("location", ["../outside.bin", "{abs}", "link.bin"])
def test_onnx_external_data_outside_folder_refused(tmp_path, location):
    """ONNX external data resolving outside the folder (../, absolute, symlink) is refused."""
    folder = tmp_path / "model"
    folder.mkdir()
    outside = tmp_path / "outside.bin"
    outside.write_bytes(bytes(16))
    (folder / "link.bin").symlink_to(outside)
    path = folder / "model.onnx"
    onnx.save(corrupt.onnx_conv_bn(location.format(abs=outside)), str(path))
    with pytest.raises(LoadError, match="points outside the model's folder"):
        load_model(path)


def test_onnx_external_data_missing(tmp_path):
    """ONNX external data whose file does not exist: LoadError naming the file."""
    path = tmp_path / "model.onnx"
    onnx.save(corrupt.onnx_conv_bn("weights.data"), str(path))
    with pytest.raises(LoadError, match=r"external data file 'weights\.data' of 'var' is missing"):
        load_model(path)


def test_onnx_external_data_too_short(tmp_path):
    """ONNX external data file shorter than the tensor: LoadError, not a partial tensor."""
    (tmp_path / "weights.data").write_bytes(b"\0\0")
    path = tmp_path / "model.onnx"
    onnx.save(corrupt.onnx_conv_bn("weights.data"), str(path))
    with pytest.raises(LoadError, match="external data"):
        load_model(path)


def test_truncated_onnx(tmp_path):
    """An ONNX file cut in half: LoadError."""
    source = tmp_path / "full.onnx"
    onnx.save(corrupt.onnx_conv_bn(), str(source))
    path = corrupt.truncated(source, tmp_path, source.stat().st_size // 2, name="cut.onnx")
    with pytest.raises(LoadError, match="not a model bnfold can read"):
        load_model(path)


# --------------------------------------------------------------------------- hostile pickles


def test_hostile_pickle_never_runs_without_trust(tmp_path):
    """A torch.save pickle that would touch a file is refused and the file never appears."""
    marker = tmp_path / "MARKER"
    path = corrupt.hostile_torch_save(tmp_path, marker)
    digest = sha(path)
    with pytest.raises(UnsafePickleError):
        load_model(path)
    assert not marker.exists()
    assert sha(path) == digest


def test_hostile_pickle_payload_is_real(tmp_path):
    """Control: with trust_pickle the payload does run, so the refusal is what protects."""
    marker = tmp_path / "MARKER"
    path = corrupt.hostile_torch_save(tmp_path, marker)
    with pytest.raises(LoadError, match="no tensors and no state_dict"):
        load_model(path, trust_pickle=True)
    assert marker.exists()


def test_hostile_pickle_in_legacy_format(tmp_path):
    """The same hostile payload in the legacy (non-zip) torch.save format is refused too."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "legacy.pt"
    torch.save({"w": corrupt.TouchOnUnpickle(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafePickleError):
        load_model(path)
    assert not marker.exists()


def test_hostile_pickle_inside_export_archive(exported_archive, tmp_path):
    """A torch.export archive whose embedded pickle runs code is refused, unrun."""
    # plain torch.export.load unpickles sample inputs with weights_only=False: it would run this
    marker = tmp_path / "MARKER"
    path = corrupt.hostile_export_archive(exported_archive, tmp_path, marker)
    with pytest.raises(UnsafePickleError, match="run code"):
        load_model(path)
    assert not marker.exists()


def test_errors_are_bnfold_errors_with_one_line():
    """Every loader error is a BnfoldError whose one_line() has no newline (for the CLI)."""
    err = LoadError("cut\nshort", hint="re-save\nit", path=Path("/x/y.pt"))
    assert isinstance(err, BnfoldError)
    assert err.one_line() == "/x/y.pt: cut short (re-save it)"
    assert issubclass(UnsafePickleError, LoadError)
    assert issubclass(ArchError, BnfoldError)


def test_zip_member_listing_matches_torch_save_layout(tmp_path, sd):
    """Guard for the builders above: torch.save still writes a zip with */data.pkl first."""
    path = tmp_path / "full.pt"
    torch.save(sd, path)
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist()[0].endswith("/data.pkl")


# --------------------------------------------------------------------------- expected to load

LAZY_SOURCE = textwrap.dedent("""
    from torch import nn

    class LazyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.LazyConv2d(6, 3, bias=False)
            self.bn = nn.LazyBatchNorm2d()
            self.fc = nn.LazyLinear(2)

        def forward(self, x):
            return self.fc(self.bn(self.conv(x)).mean((2, 3)))
""")

FILTER_BANK_SOURCE = textwrap.dedent("""
    import torch
    from torch import nn

    class FilterBank(nn.Module):
        \"\"\"A conv whose weight is a fixed filter bank: a buffer, not a parameter.\"\"\"

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, bias=False)
            bank = torch.zeros_like(self.conv.weight)
            del self.conv.weight
            self.conv.register_buffer("weight", bank)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))
""")


def trained(model: torch.nn.Module, shape=(4, 3, 16, 16), steps: int = 3) -> torch.nn.Module:
    """``model`` after a few train-mode passes (real BN statistics), in eval mode."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(*shape))
    return model.eval()


def inspect_json(path: Path, *args: str) -> dict:
    """`bnfold inspect --format json` (CliRunner): the report as JSON."""
    import json

    from typer.testing import CliRunner

    from bnfold.cli import app

    result = CliRunner().invoke(app, ["inspect", str(path), "--format", "json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_state_dict_without_num_batches_tracked_fits_arch(tmp_path):
    """Issue 14: a state_dict with no num_batches_tracked keys fills --arch (a note says so,
    the counter is reported unknown, not a false 0 that would read as stale statistics)."""
    arch = tmp_path / "mynet.py"
    arch.write_text(ARCH_SOURCE)
    spec = f"{arch}:Net"
    source = trained(build_arch(spec, {}))
    sd = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "no_nbt.pt"
    torch.save(sd, path)
    loaded = load_model(path, arch=spec)
    assert loaded.module.bn.num_batches_tracked is None
    assert any("no num_batches_tracked for 1 BatchNorm" in n for n in loaded.notes)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded.module(x), source(x), rtol=0, atol=0)
    layer = inspect_json(path, "--arch", spec)["layers"][0]
    assert layer["num_batches_tracked"] is None
    assert "stale_stats" not in layer["warnings"]


def test_float16_state_dict_is_cast_to_the_arch_dtype(tmp_path, model):
    """Issue 14: a float16 state_dict fills a float32 --arch, cast exactly, with a note."""
    arch = tmp_path / "convbn_arch.py"
    arch.write_text("from tests.models import ConvBN\n")
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "half.pt"
    torch.save(half, path)
    loaded = load_model(path, arch=f"{arch}:ConvBN")
    for key, value in loaded.module.state_dict().items():
        assert value.dtype == model.state_dict()[key].dtype, key
        assert torch.equal(value, half[key].to(value.dtype)), key
    assert "cast 6 tensor(s) from float16 to float32, the architecture's dtype" in loaded.notes
    assert not any("precision" in n for n in loaded.notes)


def test_float32_state_dict_into_float16_arch_says_precision_is_lost(tmp_path, model):
    """Issue 14: narrowing to a float16 --arch is never silent: the note says precision is
    lost."""
    arch = tmp_path / "half_arch.py"
    arch.write_text("from tests.models import ConvBN\n\ndef make():\n    return ConvBN().half()\n")
    path = tmp_path / "full.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, arch=f"{arch}:make")
    assert loaded.module.conv.weight.dtype == torch.float16
    assert (
        "cast 6 tensor(s) from float32 to float16, the architecture's dtype; precision is lost"
        in loaded.notes
    )


@pytest.mark.parametrize(
    ("nesting", "where"),
    [
        (lambda sd: {"model": {"state_dict": sd}, "epoch": 3}, "'model' → 'state_dict'"),
        (lambda sd: {"model": {"module": {"state_dict": sd}}}, "'model' → 'module' → 'state_dict'"),
        (lambda sd: {"ema": {"model": sd}, "step": 1}, "'ema' → 'model'"),
    ],
)
def test_nested_checkpoints_are_followed(tmp_path, sd, nesting, where):
    """Issue 14: a state_dict nested a few levels deep under the known keys is found and
    the note gives its path."""
    path = tmp_path / "nested.ckpt"
    torch.save(nesting(sd), path)
    loaded = load_model(path)
    assert loaded.format is ModelFormat.CHECKPOINT
    assert_same_tensors(loaded.state_dict, sd)
    assert loaded.notes[0] == f"state_dict taken from checkpoint key {where}"


def test_nesting_is_bounded(tmp_path, sd):
    """A state_dict deeper than the bound is not searched for (the error says how deep)."""
    path = tmp_path / "deep.ckpt"
    torch.save({"model": {"model": {"model": {"model": {"state_dict": sd}}}}}, path)
    with pytest.raises(LoadError, match="followed 4 levels deep"):
        load_model(path)


def test_conv_weight_registered_as_a_buffer_loads(tmp_path):
    """Issue 14: a conv whose weight is a buffer (a fixed filter bank) loads with the file's
    filters, still a buffer, and inspect reports its BN."""
    arch = tmp_path / "bank.py"
    arch.write_text(FILTER_BANK_SOURCE)
    spec = f"{arch}:FilterBank"
    source = build_arch(spec, {})
    with torch.no_grad():
        source.conv.weight.copy_(torch.randn(4, 3, 3, 3))
    trained(source)
    path = tmp_path / "bank.pt"
    torch.save(source.state_dict(), path)
    loaded = load_model(path, arch=spec)
    assert "conv.weight" in dict(loaded.module.named_buffers())
    assert torch.equal(loaded.module.conv.weight, source.conv.weight)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded.module(x), source(x), rtol=0, atol=0)
    assert inspect_json(path, "--arch", spec)["layers"][0]["name"] == "bn"


def test_lazy_modules_load_from_a_state_dict(tmp_path):
    """Issue 14: LazyConv2d/LazyBatchNorm2d/LazyLinear architectures load from a state_dict
    as the plain modules they become, computing what the original computes; inspect folds
    the BN into the conv."""
    arch = tmp_path / "lazy.py"
    arch.write_text(LAZY_SOURCE)
    spec = f"{arch}:LazyNet"
    source = trained(build_arch(spec, {}))
    path = tmp_path / "lazy.pt"
    torch.save(source.state_dict(), path)
    loaded = load_model(path, arch=spec)
    module = loaded.module
    assert type(module.conv) is torch.nn.Conv2d and module.conv.in_channels == 3
    assert type(module.bn) is torch.nn.BatchNorm2d and module.bn.num_features == 6
    assert type(module.fc) is torch.nn.Linear and module.fc.in_features == 6
    assert any("lazy module(s) conv, bn, fc" in n for n in loaded.notes)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(module(x), source(x), rtol=0, atol=0)
    report = inspect_json(path, "--arch", spec, "--input-shape", "1,3,16,16")
    assert report["layers"][0]["fold_into"] == "conv"


# --------------------------------------------------------------------------- no downloads

DOWNLOADING_SOURCE = textwrap.dedent("""
    import torch
    import urllib.request
    from torch import nn

    def from_hub():
        torch.hub.load_state_dict_from_url("https://download.invalid/weights.pth")
        return nn.BatchNorm2d(3)

    def from_urllib():
        urllib.request.urlopen("http://download.invalid/config.json")
        return nn.BatchNorm2d(3)

    def swallowing():
        try:
            urllib.request.urlopen("http://download.invalid/config.json")
        except OSError:
            pass
        return nn.BatchNorm2d(3)
""")


def test_torchvision_builder_gets_no_backbone_weights():
    """Issue 14: torchvision:deeplabv3_mobilenet_v3_large builds without asking for its
    backbone's pretrained weights (it downloaded them by default)."""
    model = build_arch("torchvision:deeplabv3_mobilenet_v3_large", {"num_classes": 3})
    assert type(model).__name__ == "DeepLabV3"


@pytest.mark.parametrize("factory", ["from_hub", "from_urllib", "swallowing"])
def test_builder_that_downloads_is_refused(tmp_path, factory):
    """Issue 14: a builder that tries to download (torch.hub, or any network connection,
    even one it swallows) is an ArchError saying bnfold never downloads; nothing leaves
    the machine."""
    arch = tmp_path / "downloads.py"
    arch.write_text(DOWNLOADING_SOURCE)
    with pytest.raises(ArchError) as info:
        build_arch(f"{arch}:{factory}", {})
    assert "tried to download" in info.value.message
    assert "bnfold never downloads" in info.value.message


def test_download_guard_is_lifted_after_the_build(tmp_path):
    """The network and torch.hub are blocked only while the builder runs."""
    import socket

    arch = tmp_path / "downloads.py"
    arch.write_text(DOWNLOADING_SOURCE)
    connect, hub = socket.socket.connect, torch.hub.load_state_dict_from_url
    with pytest.raises(ArchError):
        build_arch(f"{arch}:from_hub", {})
    assert socket.socket.connect is connect
    assert torch.hub.load_state_dict_from_url is hub
    assert "connect" not in socket.socket.__dict__


@pytest.mark.parametrize(
    ("spec", "kwargs"),
    [
        ("torchvision:resnet18", {"weights": "DEFAULT"}),
        ("torchvision:deeplabv3_mobilenet_v3_large", {"weights_backbone": "DEFAULT"}),
        ("timm:resnet18", {"pretrained": True}),
    ],
)
def test_arch_kwargs_asking_for_pretrained_weights_are_refused(spec, kwargs):
    """Issue 14: --arch-kwargs that would download pretrained weights: ArchError."""
    with pytest.raises(ArchError, match="bnfold never downloads"):
        build_arch(spec, kwargs)


TRANSFORMERS = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="transformers is not installed (the 'test' extra installs it)",
)
HF_CONFIG = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "num_labels": 3}


@TRANSFORMERS
def test_transformers_builder_fills_a_model(tmp_path):
    """Issue 14: --arch transformers:ResNetForImageClassification builds the class from its
    config class with --arch-kwargs, offline, and takes the file's weights."""
    import transformers

    torch.manual_seed(0)
    source = trained(
        transformers.ResNetForImageClassification(transformers.ResNetConfig(**HF_CONFIG)),
        shape=(2, 3, 32, 32),
    )
    path = tmp_path / "hf.pt"
    torch.save(source.state_dict(), path)
    spec = "transformers:ResNetForImageClassification"
    loaded = load_model(path, arch=spec, arch_kwargs=HF_CONFIG)
    assert type(loaded.module) is transformers.ResNetForImageClassification
    assert loaded.module.config.hidden_sizes == [8, 16]
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.module(x).logits, source(x).logits, rtol=0, atol=0)


@TRANSFORMERS
def test_transformers_builder_unknown_class():
    """transformers:NAME naming no model class: ArchError with an example."""
    with pytest.raises(ArchError, match="no model class 'NoSuchModel'"):
        build_arch("transformers:NoSuchModel", {})


def test_transformers_builder_without_transformers(monkeypatch):
    """Without transformers installed, transformers:... says pip install transformers."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
    with pytest.raises(ArchError) as info:
        build_arch("transformers:ResNetForImageClassification", {})
    assert "pip install transformers" in info.value.one_line()


# --------------------------------------------------------------------------- TorchScript statistics


@pytest.mark.parametrize("how", ["trace", "script"])
def test_torchscript_resnet_with_trained_statistics_is_inspected(tmp_path, how):
    """Issue 14: inspect on a traced or scripted ResNet-18 with trained BN statistics reports
    every BN (a traced module has no eps attribute: it is read from the graph)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=4)
    model.bn1.eps = 1e-3  # read from the file, not assumed
    model = trained(model, shape=(2, 3, 32, 32))
    x = torch.randn(1, 3, 32, 32)
    scripted = torch.jit.trace(model, x) if how == "trace" else torch.jit.script(model)
    path = tmp_path / f"{how}.pt"
    torch.jit.save(scripted, str(path))
    report = inspect_json(path)
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert len(layers) == 20
    assert layers["bn1"]["eps"] == 1e-3 and layers["bn1"]["eps_known"]
    assert all(layer["eps_known"] for layer in layers.values())
    assert layers["layer1.0.bn1"]["eps"] == 1e-5
    assert layers["bn1"]["momentum"] == 0.1 and layers["bn1"]["training"] is False
    assert layers["bn1"]["num_batches_tracked"] == 3
    want = model.bn1.running_var.double()
    assert layers["bn1"]["running_var"]["max"] == pytest.approx(float(want.max()))
    assert not any("stale_stats" in layer["warnings"] for layer in layers.values())


def test_bn_record_without_eps_says_eps_unknown():
    """A BN-like module whose eps is found nowhere is reported with eps unknown, not a
    silent default."""
    from types import SimpleNamespace

    from bnfold.stats import record_from_module

    bn = SimpleNamespace(
        weight=torch.ones(3), bias=torch.zeros(3), running_mean=torch.zeros(3),
        running_var=torch.ones(3), training=False,
    )  # fmt: skip
    record = record_from_module("bn", bn)
    assert record.eps_known is False
    assert record.channels == 3

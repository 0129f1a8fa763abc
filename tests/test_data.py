"""``bnfold.data`` (issue 17): --data sources, per-BN statistics on real inputs, drift,
re-estimation and writing the model back in its format.

Expected statistics are computed independently, in float64 numpy, from the same data.
"""

from __future__ import annotations

import copy
import itertools
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bnfold.data import (
    DataOptions,
    DataSource,
    Moments,
    _split,
    drift,
    measure,
    open_data,
    recalibrate,
    recalibrate_module,
    write_model,
)
from bnfold.errors import BnfoldError, LoadError, OutputError
from bnfold.loading import LoadedModel, ModelFormat, load_model
from bnfold.stats import DATA_CODES, Thresholds, inspect_model
from tests.models import randomize_all, state_fingerprint

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
ARCH = f"{SAMPLES / 'archs.py'}:ConvNet"


# --------------------------------------------------------------------------- helpers


def save_npz(path: Path, *arrays: np.ndarray) -> Path:
    np.savez(path, *arrays)
    return path


def source(path: Path, **kwargs) -> DataSource:
    """The data at ``path``; batches of 2 unless given (small test data, at least one batch)."""
    return open_data(DataOptions(path, **{"batch_size": 2, **kwargs}))


def loaded_module(model: nn.Module, fmt: ModelFormat = ModelFormat.PICKLED_MODULE) -> LoadedModel:
    return LoadedModel(Path("model.pt"), fmt, state_dict=dict(model.state_dict()), module=model)


def reference_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (axis 1) mean and unbiased variance over every other axis, float64."""
    y = np.moveaxis(x.astype(np.float64), 1, 0).reshape(x.shape[1], -1)
    return y.mean(axis=1), y.var(axis=1, ddof=1)


class Lone(nn.Module):
    """A BN straight on the input: its inputs are the data."""

    def __init__(self, c: int = 3, dims: int = 2):
        super().__init__()
        self.bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](c)

    def forward(self, x):
        return self.bn(x)


class Chain(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN, with a dropout that must stay off."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(6, 4, 3, bias=True)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(self.drop(x)))


class Twice(nn.Module):
    """One BN module called on two different tensors per forward pass."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.bn(self.conv(self.bn(x)))


def chain(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_all(Chain(), seed)


def images(n: int, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 2.0, size=(1, c, 1, 1))
    shift = rng.uniform(-1, 1, size=(1, c, 1, 1))
    return (rng.standard_normal((n, c, h, w)) * scale + shift).astype(np.float32)


# --------------------------------------------------------------------------- sources


@given(count=st.integers(1, 500), size=st.integers(1, 64))
def test_batches_are_near_equal_and_cover_every_sample_once(count, size):
    """issue 17: batches of at most --batch-size, sizes within 1 of each other, in order."""
    bounds = _split(count, size)
    assert len(bounds) == math.ceil(count / size)
    sizes = [b - a for a, b in bounds]
    assert max(sizes) <= size and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert bounds[0][0] == 0 and bounds[-1][1] == count
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))


def test_npz_batches_hold_the_data_in_key_order(tmp_path):
    """issue 17: an .npz gives one tensor per array, batch by batch, equal to the file."""
    a = np.arange(33 * 4, dtype=np.float64).reshape(33, 4)
    b = np.arange(33, dtype=np.int64).reshape(33)
    src = source(save_npz(tmp_path / "d.npz", a, b), batch_size=8)
    batches = list(src.batches(torch.float32))
    assert [len(x[0]) for x in batches] == [7, 7, 7, 6, 6]
    got_a = torch.cat([x[0] for x in batches])
    got_b = torch.cat([x[1] for x in batches])
    assert got_a.dtype == torch.float32 and got_b.dtype == torch.int64
    assert np.array_equal(got_a.numpy(), a.astype(np.float32))
    assert np.array_equal(got_b.numpy(), b)
    summary = src.summary()
    assert (summary.samples, summary.batches, summary.input_shapes) == (33, 5, ((4,), ()))


def test_npy_samples_limit_and_normalisation(tmp_path):
    """issue 17: a .npy is one input; --limit keeps the first N; --mean/--std on axis 1."""
    x = images(10, c=2)
    np.save(tmp_path / "d.npy", x)
    src = source(tmp_path / "d.npy", limit=7, mean=(0.5, -1.0), std=(2.0, 0.25))
    got = torch.cat([b[0] for b in src.batches()]).numpy()
    mean = np.array([0.5, -1.0], dtype=np.float32).reshape(1, 2, 1, 1)
    std = np.array([2.0, 0.25], dtype=np.float32).reshape(1, 2, 1, 1)
    np.testing.assert_allclose(got, (x[:7] - mean) / std, rtol=1e-6)
    assert "normalised with mean 0.5,-1 std 2,0.25" in src.summary().preprocessing


def test_image_folder_is_read_recursively_in_path_order(tmp_path):
    """issue 17: images in subfolders, sorted by path, RGB scaled to [0, 1]."""
    from PIL import Image

    rng = np.random.default_rng(1)
    pixels = {}
    for rel in ["b/2.png", "a/1.png", "c.png", "a/0.bmp"]:
        path = tmp_path / "imgs" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
        Image.fromarray(arr).save(path)
        pixels[rel] = arr
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    src = source(tmp_path / "imgs", batch_size=3)
    got = torch.cat([b[0] for b in src.batches()]).numpy()
    order = ["a/0.bmp", "a/1.png", "b/2.png", "c.png"]
    expected = np.stack([pixels[k].transpose(2, 0, 1) / 255.0 for k in order])
    np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-6)
    assert src.summary().input_shapes == ((3, 5, 6),)
    assert any("not normalised" in note for note in src.notes)


def test_images_are_resized_to_cover_and_centre_cropped(tmp_path):
    """issue 17: --image-size resizes each image to cover H,W and crops the centre."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    left = np.zeros((20, 40, 3), dtype=np.uint8)
    left[:, 20:] = 255  # right half white: the centre crop sees both halves
    Image.fromarray(left).save(folder / "wide.png")
    Image.fromarray(np.full((30, 10, 3), 128, dtype=np.uint8)).save(folder / "tall.png")
    src = source(folder, image_size=(10, 10))
    (batch,) = src.batches()
    assert tuple(batch[0].shape) == (2, 3, 10, 10)
    tall, wide = batch[0].numpy()  # path order: tall.png, wide.png
    np.testing.assert_allclose(tall, 128 / 255, rtol=1e-6)
    assert wide[:, :, 0].max() < 0.05 and wide[:, :, -1].min() > 0.95  # dark left, white right


def test_images_of_different_sizes_need_image_size(tmp_path):
    """issue 17: without --image-size every image must have the first one's size."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((5, 4, 3), dtype=np.uint8)).save(folder / "b.png")
    src = source(folder)
    with pytest.raises(LoadError) as info:
        list(src.batches())
    assert "b.png" in info.value.one_line() and "--image-size" in info.value.one_line()


def test_broken_image_names_the_file(tmp_path):
    """issue 17: an undecodable image is a LoadError naming it, never a traceback."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(LoadError) as info:
        src = source(folder)
        list(src.batches())
    assert "x.png" in info.value.one_line()


def test_images_without_pillow_say_how_to_install(tmp_path, monkeypatch):
    """issue 17: without Pillow an image folder is refused with the install hint."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(BnfoldError) as info:
        source(folder)
    assert "pip install 'bnfold[data]'" in info.value.one_line()


@pytest.mark.parametrize(
    ("arrays", "kwargs", "needle"),
    [
        ([np.zeros((3, 2)), np.zeros((4, 2))], {}, "different numbers of samples"),
        ([], {}, "holds no arrays"),
        ([np.zeros((0, 2))], {}, "no samples"),
        ([np.zeros((3, 2))], {"mean": (0.0,), "std": (1.0,)}, "channel axis"),
        ([np.zeros((3, 2))], {"mean": (0.0, 1.0)}, "--mean and --std go together"),
        ([np.zeros((3, 2))], {"mean": (0.0, 1.0), "std": (1.0, 0.0)}, "--std must not"),
        ([np.zeros((3, 2))], {"image_size": (4, 4)}, "--image-size applies to folders"),
        ([np.zeros((3, 2))], {"batch_size": 0}, "--batch-size"),
    ],
)
def test_bad_data_is_one_clear_error(tmp_path, arrays, kwargs, needle):
    """issue 17: every wrong --data or option is a BnfoldError saying what is wrong."""
    path = save_npz(tmp_path / "d.npz", *arrays)
    with pytest.raises(BnfoldError) as info:
        source(path, **kwargs)
    assert needle in info.value.one_line()


def test_a_scalar_npy_is_refused(tmp_path):
    """issue 17: a .npy holding one number has no sample axis: refused, saying so."""
    np.save(tmp_path / "s.npy", np.float32(1.0))
    with pytest.raises(LoadError, match="the first axis must be the sample"):
        source(tmp_path / "s.npy")


@pytest.mark.parametrize(("name", "needle"), [("d.csv", "unsupported"), ("nope", "no such")])
def test_unsupported_or_missing_data(tmp_path, name, needle):
    """issue 17: an unknown extension or a missing path is refused up front."""
    if name.endswith(".csv"):
        (tmp_path / name).write_text("1,2\n")
    with pytest.raises(LoadError) as info:
        source(tmp_path / name)
    assert needle in info.value.one_line()


# --------------------------------------------------------------------------- moments


@settings(max_examples=60)
@given(
    n=st.integers(2, 12),
    c=st.integers(1, 4),
    spatial=st.sampled_from([(), (3,), (2, 5), (2, 2, 3)]),
    cut=st.integers(1, 11),
    offset=st.sampled_from([0.0, 5.0, -30.0]),
    seed=st.integers(0, 2**16),
)
def test_moments_equal_a_float64_reference_whatever_the_batches(n, c, spatial, cut, offset, seed):
    """issue 17: pooled mean and unbiased variance equal numpy's over all the data, for any
    split into batches, both from tensors and from per-batch (count, mean, var); float32
    sums per sample bound the variance's error by about 1e-6 * mean^2."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.1, 3, c).reshape(1, c, *[1] * len(spatial))
    x = (rng.standard_normal((n, c, *spatial)) * scale + offset).astype(np.float32)
    mean, var = reference_stats(x)
    from_tensors, from_stats = Moments(c), Moments(c)
    for start in range(0, n, cut):
        part = x[start : start + cut]
        from_tensors.add(torch.from_numpy(part))
        if part.shape[0] * int(np.prod(spatial or (1,))) > 1:
            bm, bv = reference_stats(part)
            from_stats.add_stats(part.size // c, bm, bv)
        else:
            from_stats.add(torch.from_numpy(part))
    for m in (from_tensors, from_stats):
        assert m.count == x.size // c
        assert np.all(np.abs(m.mean - mean) <= 1e-6 * (np.sqrt(var) + np.abs(mean)))
        assert np.all(np.abs(m.var - var) <= 1e-5 * var + 1e-6 * mean**2 + 1e-12)


def test_moments_refuse_an_input_with_the_wrong_channels():
    """issue 17: a BN input whose axis 1 is not the BN's channels is refused."""
    with pytest.raises(BnfoldError, match="3 channels got an input of shape"):
        Moments(3).add(torch.zeros(2, 4))


def exact_gaussian_sample(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> np.ndarray:
    """n samples whose sample mean is exactly ``mean`` and whose unbiased sample
    covariance is exactly ``cov`` (to float64 rounding): random points, centred, whitened
    with their own covariance, then coloured with ``cov``'s Cholesky factor."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return mean + z @ np.linalg.cholesky(cov).T


@pytest.mark.parametrize("batch_size", [5, 13, 60])
def test_statistics_after_a_linear_layer_are_known_in_closed_form(tmp_path, batch_size):
    """issue 17: data of known mean mu and covariance S through y = W x + b: the BN after
    the linear layer receives mean W mu + b and variance diag(W S W^T), exactly. inspect
    --data measures that, and the sequential method writes it, whatever the batch size
    (the merge across batches equals one pass over all the data); the cumulative method
    on one batch writes it too. (Data files are read as float32: 1e-6 is their rounding.)"""
    d, k, n = 4, 3, 60
    rng = np.random.default_rng(1)
    mu = rng.uniform(-2, 2, d)
    a = rng.standard_normal((d, d))
    cov = a @ a.T + 0.5 * np.eye(d)
    x = exact_gaussian_sample(n, mu, cov, seed=2)
    np.testing.assert_allclose(np.cov(x, rowvar=False), cov, rtol=1e-6)
    model = nn.Sequential(nn.Linear(d, k), nn.BatchNorm1d(k)).double().eval()
    randomize_all(model, 3)
    fresh = copy.deepcopy(model)
    w, b = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    want_mean, want_var = w @ mu + b, np.diag(w @ cov @ w.T)
    src = source(save_npz(tmp_path / "d.npz", x), batch_size=batch_size)
    got = measure(loaded_module(model), src).moments["1"]
    assert got.count == n
    np.testing.assert_allclose(got.mean, want_mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.var, want_var, rtol=1e-6)
    recalibrate_module(model, src.batches(torch.float64), method="sequential")
    np.testing.assert_allclose(model[1].running_mean.numpy(), want_mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(model[1].running_var.numpy(), want_var, rtol=1e-6)
    if batch_size == n:
        recalibrate_module(fresh, src.batches(torch.float64))
        np.testing.assert_allclose(fresh[1].running_mean.numpy(), want_mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(fresh[1].running_var.numpy(), want_var, rtol=1e-6)


def test_drift_by_hand():
    """issue 17: mean shift in running standard deviations, variance ratio with eps."""
    shift, ratio = drift(
        np.array([1.0, 0.0]), np.array([4.0, 1.0]), np.array([0.0, 0.0]), np.array([1.0, 1.0]), 0.0
    )
    assert shift.tolist() == [1.0, 0.0] and ratio.tolist() == [4.0, 1.0]


# --------------------------------------------------------------------------- measuring


def test_measure_a_lone_bn_gives_the_data_statistics(tmp_path):
    """issue 17: a BN on the input measures exactly the data's per-channel statistics."""
    x = images(20, c=3, h=4, w=5)
    model = randomize_all(Lone(3))
    got = measure(loaded_module(model), source(save_npz(tmp_path / "d.npz", x), batch_size=6))
    mean, var = reference_stats(x)
    m = got.moments["bn"]
    np.testing.assert_allclose(m.mean, mean, atol=1e-6)
    np.testing.assert_allclose(m.var, var, rtol=1e-5)
    assert m.count == 20 * 4 * 5


def test_measure_after_a_conv_in_eval_mode_and_leaves_the_model_alone(tmp_path):
    """issue 17: BN inputs are measured with the model in eval mode (dropout off, running
    statistics used); the model, its flags and its statistics are left as they were."""
    model = chain().train()  # a model saved in training mode is still measured in eval mode
    before = state_fingerprint(model)
    x = images(12, h=6, w=6)
    got = measure(loaded_module(model), source(save_npz(tmp_path / "d.npz", x), batch_size=5))
    ref = copy.deepcopy(model).eval().double()
    with torch.no_grad():
        h1 = ref.conv1(torch.from_numpy(x).double())
        h2 = ref.conv2(torch.relu(ref.bn1(h1)))
    for name, h in (("bn1", h1), ("bn2", h2)):
        mean, var = reference_stats(h.numpy())
        np.testing.assert_allclose(got.moments[name].mean, mean, atol=1e-5)
        np.testing.assert_allclose(got.moments[name].var, var, rtol=1e-4)
    assert all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_bn_called_twice_is_measured_per_call(tmp_path):
    """issue 17: the second call of a shared BN is its own row, `name#2`, as inspect names it."""
    torch.manual_seed(0)
    model = randomize_all(Twice())
    x = images(6, h=3, w=3)
    got = measure(loaded_module(model), source(save_npz(tmp_path / "d.npz", x)))
    assert set(got.moments) == {"bn", "bn#2"}
    np.testing.assert_allclose(got.moments["bn"].mean, reference_stats(x)[0], atol=1e-6)
    with torch.no_grad():
        second = model.conv(model.bn(torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(got.moments["bn#2"].mean, reference_stats(second)[0], atol=1e-5)


def test_torch_export_and_onnx_measure_what_eager_measures(tmp_path):
    """issue 17: the sample convnet as state_dict, .pt2 and .onnx gives the same numbers."""
    x = images(16, h=32, w=32)
    src = source(save_npz(tmp_path / "d.npz", x), batch_size=8)
    eager = measure(load_model(SAMPLES / "convnet.state_dict.pt", arch=ARCH), src).moments
    exported = measure(load_model(SAMPLES / "convnet.pt2"), src).moments
    onnx_model = load_model(SAMPLES / "convnet.onnx")
    onnx_report = inspect_model(onnx_model, data=measure(onnx_model, src))
    assert set(exported) == set(eager)
    for name in eager:
        np.testing.assert_allclose(exported[name].mean, eager[name].mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(exported[name].var, eager[name].var, rtol=1e-5)
    eager_means = [eager[n].mean for n in ("stem.1", "down1.1", "dw.1", "pw.1", "down2.1", "up.1")]
    for layer, mean in zip(onnx_report.layers, eager_means, strict=True):
        assert layer.data_mean is not None
        assert layer.data_mean.max == pytest.approx(float(mean.max()), rel=1e-4, abs=1e-5)


def test_progress_names_every_batch(tmp_path):
    """issue 17: on a terminal the CLI shows a step per batch while batches run: measuring,
    re-estimating (cumulative) and, in recalibrate, the drift passes before and after."""
    from contextlib import contextmanager

    labels: list[str] = []

    @contextmanager
    def step(label):
        labels.append(label)
        yield

    src = source(save_npz(tmp_path / "d.npz", images(6)), batch_size=2)
    measure(loaded_module(chain()), src, step)
    assert labels == [f"Running 6 samples (3 batches): batch {k}" for k in (1, 2, 3)]
    labels.clear()
    recalibrate(loaded_module(chain()), src, step=step)
    assert [label for label in labels if "Re-estimating" in label] == [
        f"Re-estimating BatchNorm statistics: batch {k}" for k in (1, 2, 3)
    ]
    assert sum(label.startswith("Drift before") for label in labels) == 3
    assert sum(label.startswith("Drift after") for label in labels) == 3


def test_torchscript_is_measured_through_its_onnx_export(tmp_path):
    """issue 17: a TorchScript model runs through its legacy ONNX export in onnxruntime; each
    BN's measured statistics, named after its module, equal those of the same weights run as
    an nn.Module."""
    src = source(save_npz(tmp_path / "d.npz", images(12, h=32, w=32)), batch_size=4)
    script = measure(load_model(SAMPLES / "convnet.torchscript.pt"), src)
    eager = measure(
        load_model(SAMPLES / "convnet.state_dict.pt", arch=f"{SAMPLES / 'archs.py'}:ConvNet"), src
    )
    assert sorted(script.moments) == sorted(eager.moments) and len(eager.moments) == 6
    for name, m in eager.moments.items():
        got = script.moments[name]
        assert got.count == m.count
        np.testing.assert_allclose(got.mean, m.mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got.var, m.var, rtol=1e-4, atol=1e-5)


def test_bare_state_dict_cannot_be_measured(tmp_path):
    """issue 17: a bare state_dict has no forward: refused with what to pass instead."""
    src = source(save_npz(tmp_path / "d.npz", images(4, h=32, w=32)))
    with pytest.raises(BnfoldError) as info:
        measure(load_model(SAMPLES / "convnet.state_dict.pt"), src)
    assert "pass --arch" in info.value.one_line()


def test_data_that_does_not_fit_the_model_is_one_error(tmp_path):
    """issue 17: inputs of the wrong shape or dtype are a BnfoldError naming the input, the
    shape (and dtype) given and the shape the model's first layer takes, not a crash."""
    src = source(save_npz(tmp_path / "d.npz", images(4, c=5)))
    with pytest.raises(BnfoldError) as info:
        measure(loaded_module(chain()), src)
    line = info.value.one_line()
    assert "input 0 (x) has shape [2, 5, 8, 8] (float32)" in line
    assert "the model's first layer takes (batch, 3, size, size)" in line
    ints = source(save_npz(tmp_path / "i.npz", images(4).astype(np.int64)))
    with pytest.raises(BnfoldError) as info:
        measure(loaded_module(chain()), ints)
    assert "input 0 (x) has shape [2, 3, 8, 8] (int64)" in info.value.one_line()


# --------------------------------------------------------------------------- drift


def _lone_with(mean, var, c=4) -> nn.Module:
    model = Lone(c).eval()
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.tensor(mean))
        model.bn.running_var.copy_(torch.tensor(var))
    return model


def test_drift_codes_fire_on_the_channels_that_drift(tmp_path):
    """issue 17: running statistics equal to the data's raise nothing; a mean 1 std off in
    two channels (2 stds in channel 1, whose variance is 3x off) is one stats_drift naming
    both counts and the worst channels (channel 1 for both: 2/sqrt(3) and 1/3)."""
    x = images(64, c=4, h=6, w=6, seed=3)
    mean, var = reference_stats(x)
    src = source(save_npz(tmp_path / "d.npz", x))
    exact = _lone_with(mean.tolist(), var.tolist())
    layer = inspect_model(loaded_module(exact), data=measure(loaded_module(exact), src)).layers[0]
    assert not set(layer.warnings) & set(DATA_CODES)
    assert layer.mean_shift is not None and layer.mean_shift.max < 1e-5
    assert layer.var_ratio is not None and abs(layer.var_ratio.max - 1) < 1e-5
    off_mean = mean + np.sqrt(var) * np.array([1.0, -2.0, 0.25, 0.0])
    off_var = var * np.array([1.0, 3.0, 1.0, 1.0])
    model = _lone_with(off_mean.tolist(), off_var.tolist())
    report = inspect_model(loaded_module(model), data=measure(loaded_module(model), src))
    layer = report.layers[0]
    assert DATA_CODES == ("stats_drift",)
    drifts = [d.message for d in layer.diagnostics if d.code in DATA_CODES]
    assert len(drifts) == 1  # num_batches_tracked is 0 too: stale_stats beside it
    message = drifts[0]
    assert "(channel 1), over 0.5 in 2 of 4 channels" in message
    assert "(worst: channel 1), outside 1/2..2 in 1 of 4 channels" in message
    assert report.summary.warnings_by_code["stats_drift"] == 1
    # the largest standardised mean shift, the range of the variance ratio, worst channels
    shift = np.abs(mean - off_mean) / np.sqrt(off_var + 1e-5)
    ratio = (var + 1e-5) / (off_var + 1e-5)
    assert layer.mean_shift is not None and layer.var_ratio is not None
    assert layer.mean_shift.max == pytest.approx(shift.max(), rel=1e-5)
    assert (layer.var_ratio.min, layer.var_ratio.max) == pytest.approx(
        (ratio.min(), ratio.max()), rel=1e-5
    )
    assert (layer.mean_shift_channel, layer.var_ratio_channel) == (1, 1)
    assert report.thresholds["drift_mean"] == 0.5 and report.data is not None
    raised = Thresholds().with_overrides({"drift_mean": 2.0, "drift_var": 4.0})
    quiet = inspect_model(loaded_module(model), raised, data=measure(loaded_module(model), src))
    assert not set(quiet.layers[0].warnings) & set(DATA_CODES)


def test_worst_channels_by_log_distance_from_one():
    """issue 17: the worst variance ratio is the furthest from 1 either way (0.2 beats 3),
    NaN channels are skipped, and all-NaN gives no channel."""
    from bnfold.data import worst_channels

    shift = np.array([0.1, np.nan, 0.7, 0.3])
    ratio = np.array([3.0, 0.2, np.nan, 1.0])
    assert worst_channels(shift, ratio) == (2, 1)
    assert worst_channels(np.array([np.nan]), np.array([np.nan])) == (None, None)


def test_thresholds_without_data_stay_as_before():
    """issue 17: the drift thresholds appear in a report only when data was measured."""
    report = inspect_model(loaded_module(randomize_all(Lone(3))))
    assert "drift_mean" not in report.thresholds and report.data is None
    assert report.layers[0].mean_shift is None
    with pytest.raises(ValueError, match="drift_var is a factor"):
        Thresholds().with_overrides({"drift_var": 0.5})


# --------------------------------------------------------------------------- re-estimation


def _batches(x: np.ndarray, size: int) -> list[list[torch.Tensor]]:
    return [[torch.from_numpy(x[i : i + size])] for i in range(0, len(x), size)]


def batch_average(batches: list[list[torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's momentum=None statistics of a BN on the input, in float64: the average
    of the batch means and of the unbiased batch variances."""
    stats = [reference_stats(b[0].numpy()) for b in batches]
    return np.mean([m for m, _ in stats], axis=0), np.mean([v for _, v in stats], axis=0)


def pytorch_momentum_none(model: nn.Module, batches: list[list[torch.Tensor]]) -> nn.Module:
    """A copy of ``model`` re-estimated by PyTorch itself: every BN reset, momentum=None,
    alone in training mode (dropout and the rest in eval), the batches run through."""
    ref = copy.deepcopy(model).eval()
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
            m.train()
    with torch.no_grad():
        for batch in batches:
            ref(*batch)
    return ref


@settings(max_examples=25)
@given(size=st.integers(2, 9), seed=st.integers(0, 2**16))
def test_cumulative_method_on_a_lone_bn_averages_the_batch_statistics(size, seed):
    """issue 17: for a BN on the input the default method writes the average of the batch
    means and of the unbiased batch variances, whatever the batch size (uneven batches
    included), and num_batches_tracked = batches, as PyTorch's momentum=None does."""
    x = images(19, c=3, h=3, w=2, seed=seed)
    if len(x) % size == 1:  # no lone sample in the last batch
        x = x[:-1]
    model = randomize_all(Lone(3), seed)
    batches = _batches(x, size)
    report = recalibrate_module(model, batches)
    mean, var = batch_average(batches)
    np.testing.assert_allclose(model.bn.running_mean.numpy(), mean, atol=1e-6)
    np.testing.assert_allclose(model.bn.running_var.numpy(), var, rtol=1e-5)
    assert int(model.bn.num_batches_tracked) == report.batches == math.ceil(len(x) / size)
    assert report.complete and report.updated == 1 and report.passes == 1
    assert report.method == "cumulative"


@pytest.mark.parametrize(("model", "size"), [(Chain, 12), (Chain, 7), (Twice, 5)])
def test_cumulative_method_is_pytorch_train_mode_with_momentum_none(model, size):
    """issue 17: the default method gives, in every BN, what PyTorch's own train-mode
    update with momentum=None gives on the same batches (BN layers alone in training mode,
    dropout in eval), to float32 rounding; num_batches_tracked equal (a BN called twice
    per pass counts both calls, as PyTorch does); weights, gamma and beta bit-identical;
    flags and momenta restored."""
    torch.manual_seed(0)
    net = randomize_all(model(), 4).eval()
    x = images(24, h=6, w=6, seed=2)
    x[:12] += 1.5  # batches whose statistics differ
    batches = _batches(x, size)
    ref = pytorch_momentum_none(net, batches)
    params = {k: v.clone() for k, v in net.named_parameters()}
    report = recalibrate_module(net, batches)
    assert report.complete
    got, want = net.state_dict(), ref.state_dict()
    for key in want:
        if key.endswith("num_batches_tracked"):
            assert int(got[key]) == int(want[key]) > 0, key
        elif key.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(got[key], want[key], rtol=2e-6, atol=1e-7, err_msg=key)
    for name, p in net.named_parameters():
        assert torch.equal(p, params[name]), name  # bit-identical
    assert not any(m.training for m in net.modules())
    assert all(m.momentum == 0.1 for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_dropout_stays_in_eval_during_the_pass():
    """issue 17: with dropout in training mode the statistics after it would be random;
    two runs on the same data give bit-identical statistics, equal to PyTorch's with
    the dropout in eval."""
    batches = _batches(images(24, h=6, w=6, seed=7), 8)
    first, second = chain(5), chain(5)
    recalibrate_module(first, batches)
    recalibrate_module(second, batches)
    assert torch.equal(first.bn2.running_var, second.bn2.running_var)
    ref = pytorch_momentum_none(chain(5), batches)
    np.testing.assert_allclose(first.bn2.running_var, ref.bn2.running_var, rtol=2e-6)


def test_cumulative_and_sequential_variances_differ_by_the_spread_of_batch_means():
    """issue 17: batches whose means differ: the cumulative method averages the per-batch
    variances (PyTorch's convention); the sequential one pools all the data, which adds
    the spread of the batch means ((1.5 / 2)^2 = 0.56)."""
    x = images(24, h=4, w=4, seed=3)
    x[:12] += 1.5
    batches = _batches(x, 12)
    cumulative, sequential = randomize_all(Lone(3)), randomize_all(Lone(3))
    recalibrate_module(cumulative, batches)
    recalibrate_module(sequential, batches, method="sequential")
    np.testing.assert_allclose(cumulative.bn.running_var.numpy(), batch_average(batches)[1], 1e-5)
    np.testing.assert_allclose(sequential.bn.running_var.numpy(), reference_stats(x)[1], 1e-5)
    assert (sequential.bn.running_var.numpy() > cumulative.bn.running_var.numpy() + 0.5).all()


@pytest.mark.parametrize("spec", ["convnet.state_dict.pt", "convnet.pt2", "convnet.onnx"])
def test_sequential_method_leaves_no_drift(tmp_path, spec):
    """issue 17: after --method sequential, the data measured as at inference has the new
    running statistics exactly (mean shift ~0, variance ratio ~1) in every layer."""
    x = images(24, h=32, w=32, seed=5)
    src = source(save_npz(tmp_path / "d.npz", x), batch_size=10)
    loaded = load_model(SAMPLES / spec, arch=ARCH if spec.endswith(".pt") else None)
    report = recalibrate(loaded, src, method="sequential")
    assert report.complete and report.passes == 6 and report.updated == 6
    after = inspect_model(loaded, data=measure(loaded, src))
    for layer in after.layers:
        assert layer.mean_shift is not None and layer.var_ratio is not None
        assert layer.mean_shift.max < 1e-4, layer.name
        assert abs(layer.var_ratio.min - 1) < 1e-4 and abs(layer.var_ratio.max - 1) < 1e-4


@pytest.mark.parametrize("spec", ["convnet.pt2", "convnet.onnx"])
def test_cumulative_method_agrees_across_formats(tmp_path, spec):
    """issue 17: the cumulative method on a .pt2 or .onnx writes what it writes on the
    eager model (same statistics to float32 rounding)."""
    x = images(20, h=32, w=32, seed=6)
    src = source(save_npz(tmp_path / "d.npz", x), batch_size=10)
    eager = load_model(SAMPLES / "convnet.state_dict.pt", arch=ARCH)
    recalibrate(eager, src)
    other = load_model(SAMPLES / spec)
    recalibrate(other, src)
    a = inspect_model(eager).layers
    b = inspect_model(other).layers
    for la, lb in zip(a, b, strict=True):
        for field in ("running_var", "running_mean"):
            got, want = getattr(lb, field), getattr(la, field)
            assert (got.min, got.median, got.max) == pytest.approx(
                (want.min, want.median, want.max), rel=1e-4, abs=1e-6
            )


def test_failure_mid_pass_restores_every_statistic():
    """issue 17: an error in the third batch leaves the module exactly as it was."""
    model = chain(2)
    before = state_fingerprint(model)
    x = images(30, h=5, w=5)
    batches = _batches(x, 10)
    batches[2] = [torch.zeros(10, 7, 5, 5)]  # wrong channels: the model raises
    for method in ("cumulative", "sequential"):
        with pytest.raises(BnfoldError, match="does not run on the data"):
            recalibrate_module(model, batches, method=method)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), method
        assert model.bn1.momentum == 0.1 and not model.training


class Interrupted(Chain):
    """Ctrl-C arrives during the second forward pass."""

    calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return super().forward(x)


@pytest.mark.parametrize("method", ["cumulative", "sequential"])
def test_ctrl_c_mid_pass_restores_everything_and_stops(method):
    """issue 17: a KeyboardInterrupt inside a pass is not swallowed; the statistics, flags
    and momenta are as they were."""
    torch.manual_seed(0)
    model = randomize_all(Interrupted())
    before = state_fingerprint(model)
    with pytest.raises(KeyboardInterrupt):
        recalibrate_module(model, _batches(images(12, h=4, w=4), 4), method=method)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(m.training for m in model.modules()) and model.bn1.momentum == 0.1


class Mixed(nn.Module):
    """A frozen BN, a BN without running statistics, one never called, a timm BNAct."""

    def __init__(self):
        super().__init__()
        from timm.layers import BatchNormAct2d
        from torchvision.ops import FrozenBatchNorm2d

        self.frozen = FrozenBatchNorm2d(3)
        self.plain = nn.BatchNorm2d(3, track_running_stats=False)
        self.act = BatchNormAct2d(3)
        self.unused = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.act(self.plain(self.frozen(x)))


def test_layers_that_keep_their_statistics_say_why():
    """issue 17: frozen (cumulative method only), no_running_stats and not_called layers keep
    their statistics with a reason; a layer never reached makes the run incomplete."""
    model = randomize_all(Mixed())
    before = state_fingerprint(model)
    x = images(8, h=4, w=4)
    report = recalibrate_module(model, _batches(x, 4))
    after = model.state_dict()
    for key in ("frozen.running_mean", "frozen.running_var", "unused.running_mean",
                "unused.running_var", "unused.num_batches_tracked"):  # fmt: skip
        assert torch.equal(after[key], before[key]), key  # kept means kept
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert reasons == {
        "frozen": "frozen",
        "plain": "no_running_stats",
        "act": None,
        "unused": "not_called",
    }
    assert not report.complete
    assert not model.act.training and not model.act.act.training
    sequential = recalibrate_module(Mixed().eval(), _batches(x, 4), method="sequential")
    assert {layer.name: layer.reason for layer in sequential.layers}["frozen"] is None


def test_timm_bn_act_is_re_estimated_on_its_input():
    """issue 17: BatchNormAct2d's statistics are those of its input, before its activation."""
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(BatchNormAct2d(3)).eval()
    x = images(10, h=4, w=4, seed=9)
    recalibrate_module(model, _batches(x, 5))
    mean, var = batch_average(_batches(x, 5))
    np.testing.assert_allclose(model[0].running_mean.numpy(), mean, atol=1e-6)
    np.testing.assert_allclose(model[0].running_var.numpy(), var, rtol=1e-5)


@pytest.mark.parametrize("method", ["cumulative", "sequential"])
def test_nonfinite_data_keeps_the_old_statistics(method):
    """issue 17: NaN in the data gives no NaN statistics: the layer keeps its old ones
    (all three buffers), reason nonfinite."""
    model = randomize_all(Lone(3))
    before = state_fingerprint(model)
    x = images(8, h=2, w=2)
    x[3, 1, 0, 0] = np.nan
    report = recalibrate_module(model, _batches(x, 4), method=method)
    assert report.layers[0].reason == "nonfinite" and not report.complete
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_cumulative_method_refuses_a_single_sample_batch():
    """issue 17: training-mode BN cannot normalise one sample: the cumulative method says so and
    the sequential one works."""
    x = images(1, h=2, w=2)
    with pytest.raises(BnfoldError, match="at least 2 samples"):
        recalibrate_module(randomize_all(Lone(3)), _batches(x, 1))
    model = randomize_all(Lone(3))
    assert recalibrate_module(model, _batches(x, 1), method="sequential").complete


# --------------------------------------------------------------------------- writing back


FORMATS = [
    ("convnet.state_dict.pt", ARCH),
    ("convnet.checkpoint.pt", ARCH),
    ("convnet.lightning.ckpt", ARCH),
    ("convnet.safetensors", ARCH),
    ("convnet.pt2", None),
    ("convnet.onnx", None),
]


@pytest.mark.parametrize(("name", "arch"), FORMATS)
def test_written_model_has_the_new_statistics_and_nothing_else_changed(tmp_path, name, arch):
    """issue 17: the model is written in its own format; loaded again it has the new BN
    statistics, every other tensor is bit-identical, the input file is untouched."""
    original = (SAMPLES / name).read_bytes()
    src = source(save_npz(tmp_path / "d.npz", images(20, h=32, w=32, seed=4)), batch_size=10)
    loaded = load_model(SAMPLES / name, arch=arch)
    report = recalibrate(loaded, src)
    out = tmp_path / f"out.{name}"
    write_model(loaded, report, out)
    assert (SAMPLES / name).read_bytes() == original
    before = inspect_model(load_model(SAMPLES / name, arch=arch))
    again = load_model(out, arch=arch)
    assert again.format is loaded.format
    after = inspect_model(again)
    expected = inspect_model(loaded)
    for old, new, want in zip(before.layers, after.layers, expected.layers, strict=True):
        assert new.running_mean == want.running_mean and new.running_var == want.running_var
        assert new.running_var != old.running_var
        assert new.gamma == old.gamma and new.beta == old.beta
    if again.state_dict is not None:
        first = load_model(SAMPLES / name, arch=arch).state_dict
        assert first is not None and set(first) == set(again.state_dict)
        for key, value in first.items():
            if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
                assert torch.equal(value, again.state_dict[key]), key


def test_checkpoint_keeps_its_other_entries_and_key_prefixes(tmp_path):
    """issue 17: a training checkpoint keeps its optimizer state, epoch and 'module.' keys."""
    src = source(save_npz(tmp_path / "d.npz", images(8, h=32, w=32)))
    loaded = load_model(SAMPLES / "convnet.checkpoint.pt", arch=ARCH)
    write_model(loaded, recalibrate(loaded, src), tmp_path / "c.pt")
    old = torch.load(SAMPLES / "convnet.checkpoint.pt", weights_only=True)
    new = torch.load(tmp_path / "c.pt", weights_only=True)
    assert set(new) == set(old) and new["epoch"] == old["epoch"]
    assert set(new["model_state_dict"]) == set(old["model_state_dict"])
    assert not torch.equal(
        new["model_state_dict"]["module.stem.1.running_var"],
        old["model_state_dict"]["module.stem.1.running_var"],
    )


def test_safetensors_keeps_its_metadata(tmp_path):
    """issue 17: safetensors is written as safetensors with the original metadata."""
    from safetensors import safe_open

    src = source(save_npz(tmp_path / "d.npz", images(8, h=32, w=32)))
    loaded = load_model(SAMPLES / "convnet.safetensors", arch=ARCH)
    write_model(loaded, recalibrate(loaded, src), tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_pickled_module_is_written_as_a_module(tmp_path, monkeypatch):
    """issue 17: a whole pickled module (trusted) is written back as one."""
    monkeypatch.syspath_prepend(str(SAMPLES))
    src = source(save_npz(tmp_path / "d.npz", images(8, h=32, w=32)))
    loaded = load_model(SAMPLES / "convnet.module.pt", trust_pickle=True)
    write_model(loaded, recalibrate(loaded, src), tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.equal(again.stem[1].running_var, loaded.module.stem[1].running_var)


def test_onnx_shared_statistics_get_private_copies(tmp_path):
    """issue 17: BNs sharing one running_var initializer (exporters deduplicate equal ones)
    are re-estimated separately; the file passes onnx's checker and runs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    c = 2
    inits = [numpy_helper.from_array(np.ones(c, np.float32), n) for n in ("one", "var")]
    inits.append(numpy_helper.from_array(np.zeros(c, np.float32), "zero"))
    w = numpy_helper.from_array(np.array([[[[2.0]], [[0.0]]], [[[0.0]], [[3.0]]]], np.float32), "w")
    nodes = [
        helper.make_node(
            "BatchNormalization", ["x", "one", "zero", "zero", "var"], ["a"], name="bn1"
        ),
        helper.make_node("Conv", ["a", "w"], ["b"]),
        helper.make_node(
            "BatchNormalization", ["b", "one", "zero", "zero", "var"], ["y"], name="bn2"
        ),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", c, 3, 3])], [*inits, w],
    )  # fmt: skip
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), path)
    x = images(10, c=c, h=3, w=3, seed=8) * 2 + 1
    src = source(save_npz(tmp_path / "d.npz", x), batch_size=5)
    loaded = load_model(path)
    report = recalibrate(loaded, src, method="sequential")
    write_model(loaded, report, tmp_path / "out.onnx")
    written = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(written, full_check=True)
    after = load_model(tmp_path / "out.onnx")
    drifts = inspect_model(after, data=measure(after, src)).layers
    assert [layer.name for layer in drifts] == ["bn1", "bn2"]
    for layer in drifts:
        assert layer.mean_shift is not None and layer.mean_shift.max < 1e-4
    session = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    assert np.isfinite(session.run(None, {"x": x[:2]})[0]).all()


def test_write_refuses_the_input_and_an_existing_file(tmp_path):
    """issue 17: --out may not be the model; an existing file needs force."""
    src = source(save_npz(tmp_path / "d.npz", images(4, h=32, w=32)))
    loaded = load_model(SAMPLES / "convnet.pt2")
    report = recalibrate(loaded, src)
    with pytest.raises(OutputError, match="refusing to overwrite the input"):
        write_model(loaded, report, SAMPLES / "convnet.pt2")
    (tmp_path / "x.pt2").write_bytes(b"keep")
    with pytest.raises(OutputError, match="exists"):
        write_model(loaded, report, tmp_path / "x.pt2")
    assert (tmp_path / "x.pt2").read_bytes() == b"keep"
    write_model(loaded, report, tmp_path / "x.pt2", force=True)
    assert load_model(tmp_path / "x.pt2").format is ModelFormat.EXPORTED_PROGRAM


class RandomStack(nn.Module):
    """conv/linear + BN blocks with ReLUs, sizes drawn by hypothesis."""

    def __init__(self, widths: list[int], dims: int, eps: float, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        conv = {1: nn.Conv1d, 2: nn.Conv2d}.get(dims)
        bn = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers.append(conv(a, b, 3, padding=1) if conv else nn.Linear(a, b))
            layers += [bn(b, eps=eps), nn.ReLU()]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


@settings(max_examples=20)
@given(
    widths=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    dims=st.sampled_from([0, 1, 2]),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    batch=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_sequential_statistics_are_what_each_bn_receives(widths, dims, eps, batch, seed):
    """issue 17: on random conv/linear + BN stacks, after the sequential method every BN's
    running statistics equal the mean and variance of its inputs at inference (measured
    again in eval mode), whatever the batch size."""
    model = randomize_all(RandomStack(widths, dims, eps, seed), seed)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((11, widths[0], *[5] * dims)) * 2 + 1).astype(np.float32)
    report = recalibrate_module(model, _batches(x, batch), method="sequential")
    assert report.complete and report.passes == len(widths) - 1
    with tempfile.TemporaryDirectory() as folder:
        src = source(save_npz(Path(folder) / "d.npz", x), batch_size=batch)
        moments = measure(loaded_module(model), src).moments
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            got = moments[name]
            # float32 storage rounds a mean by up to 6e-8 of itself: a near-constant channel
            # (widths of 1 after a ReLU) needs that much room
            scale = np.sqrt(got.var) + 1e-6 + np.abs(got.mean) * 1e-2
            assert np.all(np.abs(m.running_mean.numpy() - got.mean) <= 1e-5 * scale), name
            assert np.all(np.abs(m.running_var.numpy() - got.var) <= 1e-4 * got.var + 1e-9), name

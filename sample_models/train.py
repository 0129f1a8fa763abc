"""Train the sample models on synthetic data and save them in every format bnfold reads.

Run from anywhere:  python sample_models/train.py
Outputs are written next to this file. Deterministic: same files, same tensors on every
run on the same machine/torch version (2 threads, fixed seeds, deterministic algorithms).
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from archs import ARCHS, INPUT_SHAPES  # noqa: E402
from torch import nn  # noqa: E402

MAX_FILE_BYTES = 1 << 20  # every saved file must stay at or below 1 MiB
N_SAVED_INPUTS = 8
ONNX_TOL = 1e-4

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit deprecation chatter
warnings.filterwarnings("ignore", category=DeprecationWarning)


# ----------------------------------------------------------------------------- data
def make_shapes(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, 32, 32) images of one shape on a noisy background; 10 classes = 5 shapes x 2 hues.

    shape: 0 square, 1 disk, 2 ring, 3 plus, 4 triangle; hue: 0 warm (red/yellow), 1 cold
    (blue/cyan). Position, size, exact colour, background and noise are random.
    """
    y = torch.randint(0, 10, (n,), generator=g)
    shape, hue = y % 5, y // 5
    grid = torch.arange(32, dtype=torch.float32)
    yy, xx = grid.view(1, 32, 1), grid.view(1, 1, 32)
    cx = (10 + 12 * torch.rand(n, generator=g)).view(n, 1, 1)
    cy = (10 + 12 * torch.rand(n, generator=g)).view(n, 1, 1)
    r = (5 + 4 * torch.rand(n, generator=g)).view(n, 1, 1)
    dx, dy = xx - cx, yy - cy
    dist = torch.sqrt(dx**2 + dy**2)
    masks = torch.stack(
        [
            (dx.abs() < r) & (dy.abs() < r),
            dist < r,
            (dist < r) & (dist > r - 2.5),
            ((dx.abs() < r / 3.5) & (dy.abs() < r)) | ((dy.abs() < r / 3.5) & (dx.abs() < r)),
            (dy.abs() < r) & (dx.abs() < (dy + r) / 2),
        ],
        dim=1,
    )  # (n, 5, 32, 32)
    mask = masks[torch.arange(n), shape].unsqueeze(1).float()  # (n, 1, 32, 32)

    # foreground colour: warm = high red, cold = high blue, other channels random
    a, b = 0.7 + 0.3 * torch.rand(n, generator=g), 0.6 * torch.rand(n, generator=g)
    low = 0.3 * torch.rand(n, generator=g)
    warm = torch.stack([a, b, low], dim=1)
    cold = torch.stack([low, b, a], dim=1)
    fg = torch.where(hue.view(n, 1) == 0, warm, cold).view(n, 3, 1, 1)
    bg = (0.15 + 0.25 * torch.rand(n, 1, 1, 1, generator=g)).expand(n, 3, 1, 1)
    img = mask * fg + (1 - mask) * bg
    img = img + 0.15 * torch.randn(n, 3, 32, 32, generator=g)
    return ((img - 0.4) / 0.3).float(), y


def make_tabular(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 20) Gaussian features; 4 classes from an XOR of two projections and a radius."""
    proj = torch.randn(20, 2, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, 20, generator=g)
    z = x @ proj
    xor = (z[:, 0] * z[:, 1] > 0).long()
    radius = (x[:, :5] ** 2).sum(1) > 4.35  # ~ median of chi2(5)
    y = 2 * xor + radius.long()
    return x, y


def make_tokens(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 16, 8) tokens; class c plants 3 tokens +-2.5*p_c (random sign) among noise tokens.

    The random sign makes the plain mean of the tokens useless: the per-token nonlinearity
    has to detect the prototype before the mean pooling.
    """
    protos = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(4321)))[0]
    protos = 2.5 * protos[:4]  # 4 orthogonal prototypes of norm 2.5
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 16, 8, generator=g)
    pos = torch.rand(n, 16, generator=g).argsort(dim=1)[:, :3]  # 3 distinct token slots
    sign = torch.randint(0, 2, (n, 3, 1), generator=g).float() * 2 - 1
    planted = sign * protos[y].unsqueeze(1) + 0.7 * torch.randn(n, 3, 8, generator=g)
    x[torch.arange(n).unsqueeze(1), pos] = planted
    return x, y


# name -> (data maker, n_train, n_test, epochs, batch size, lr)
TASKS = {
    "convnet": (make_shapes, 5000, 1000, 5, 64, 4e-3),
    "mlp": (make_tabular, 8000, 2000, 20, 128, 3e-3),
    "tokennet": (make_tokens, 8000, 2000, 20, 128, 3e-3),
}
# Training runs single-threaded. On an idle 2-core machine 2 threads train the convnet
# ~1.7x faster, but when anything else is busy on the machine every OpenMP parallel region
# waits for both threads to be scheduled and training got 4-10x slower (65 s instead of
# 16 s for the convnet, 20 s instead of 1.7 s for the MLP). One fixed thread count is just
# as deterministic. Export, verification and everything else run with 2 threads.
TRAIN_THREADS = 1
OTHER_THREADS = 2


# ----------------------------------------------------------------------------- training
@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 500) -> float:
    model.eval()
    correct = sum(
        (model(x[i : i + bs]).argmax(1) == y[i : i + bs]).sum().item() for i in range(0, len(x), bs)
    )
    return correct / len(x)


def train(name: str, seed: int) -> dict:
    maker, n_train, n_test, epochs, bs, lr = TASKS[name]
    torch.set_num_threads(TRAIN_THREADS)
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = maker(n_train, g)
    x_test, y_test = maker(n_test, g)

    torch.manual_seed(seed)
    model = ARCHS[name]()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(n_train / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2
    )
    t0 = time.perf_counter()
    step = 0
    for _epoch in range(epochs):
        model.train()
        perm = torch.randperm(n_train, generator=g)
        for i in range(0, n_train, bs):
            idx = perm[i : i + bs]
            if len(idx) < 2:  # BatchNorm needs more than one sample per channel
                continue
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    train_time = time.perf_counter() - t0
    model.eval()
    acc = accuracy(model, x_test, y_test)
    torch.set_num_threads(OTHER_THREADS)
    return {
        "model": model,
        "optimizer": opt,
        "epochs": epochs,
        "global_step": step,
        "train_time": train_time,
        "accuracy": acc,
        "inputs": x_test[:N_SAVED_INPUTS].contiguous(),
        "n_classes": int(y_test.max()) + 1,
    }


# ----------------------------------------------------------------------------- saving
def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    """ONNX export that keeps every BatchNormalization node (weights inside the file).

    torch's dynamo exporter folds BN into Conv/Gemm/ConvTranspose only in its optimizer
    (onnxscript's fuse_batchnorm rewrite rules), so export with optimize=False and run just
    constant folding + clean-up passes (no rewrite rules) ourselves. Falls back to the
    legacy TorchScript exporter with TrainingMode.PRESERVE (which, on an eval model, skips
    the eval peephole pass that fuses Conv+BN).
    """
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        import onnx_ir.passes.common as common_passes
        import onnxscript.optimizer

        prog = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            optimize=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
        ir_model = prog.model
        onnxscript.optimizer.fold_constants_ir(ir_model)
        common_passes.RemoveUnusedNodesPass()(ir_model)
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(
            ir_model
        )
        common_passes.DeduplicateInitializersPass()(ir_model)
        common_passes.CommonSubexpressionEliminationPass()(ir_model)
        prog.save(str(path), external_data=False)
        return "dynamo exporter, optimize=False + constant folding only"
    except Exception as exc:  # noqa: BLE001 - fallback for other torch versions
        print(f"    dynamo ONNX export failed ({type(exc).__name__}: {exc}); using legacy exporter")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
        return "legacy exporter, training=TrainingMode.PRESERVE"


def check_onnx(path: Path, model: nn.Module, inputs: torch.Tensor) -> float:
    import onnx
    import onnxruntime as ort
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    inits = {t.name for t in proto.graph.initializer}
    # the legacy exporter dedupes equal tensors into Identity(initializer) nodes
    inits |= {
        n.output[0] for n in proto.graph.node if n.op_type == "Identity" and n.input[0] in inits
    }
    assert not any(uses_external_data(t) for t in proto.graph.initializer), "external data"
    bns = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == _bn_count(model), f"{len(bns)} BN nodes, model has {_bn_count(model)}"
    for n in bns:
        assert all(i in inits for i in n.input[1:]), f"BN {n.name} params not initializers"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: inputs.numpy()})[0]
    with torch.no_grad():
        ref = model(inputs).numpy()
    err = float(np.abs(out - ref).max())
    assert err <= ONNX_TOL, f"onnxruntime differs from eager by {err}"
    return err


def save_all(name: str, res: dict) -> tuple[list[Path], str]:
    from safetensors.torch import save_file

    model: nn.Module = res["model"].eval()
    sd = model.state_dict()
    # batch of 2 so that torch.export can keep the batch dimension dynamic (1 specializes)
    shape = (2, *INPUT_SHAPES[name][1:])
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    out: list[Path] = []

    def p(suffix: str) -> Path:
        path = HERE / f"{name}.{suffix}"
        out.append(path)
        return path

    torch.save(sd, p("state_dict.pt"))
    torch.save(
        {
            "epoch": res["epochs"],
            "model_state_dict": {"module." + k: v for k, v in sd.items()},
            "optimizer_state_dict": res["optimizer"].state_dict(),
            "accuracy": res["accuracy"],
        },
        p("checkpoint.pt"),
    )
    torch.save(
        {
            "epoch": res["epochs"] - 1,  # Lightning counts epochs from 0
            "global_step": res["global_step"],
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {"model." + k: v for k, v in sd.items()},
        },
        p("lightning.ckpt"),
    )
    torch.save(model, p("module.pt"))
    try:
        scripted = torch.jit.script(model)
    except Exception as exc:  # noqa: BLE001 - fall back to tracing, and say so
        print(f"    torch.jit.script failed ({exc}); tracing instead")
        scripted = torch.jit.trace(model, example)
    torch.jit.save(scripted, str(p("torchscript.pt")))
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(p("pt2")))
    save_file(
        {k: v.detach().contiguous() for k, v in sd.items()},
        str(p("safetensors")),
        metadata={"format": "pt"},  # one key only: safetensors writes a dict in random order
    )
    onnx_how = export_onnx(model, example, p("onnx"))
    np.savez(p("inputs.npz"), input=res["inputs"].numpy().astype(np.float32))
    return out, onnx_how


def verify_reload(name: str, model: nn.Module, inputs: torch.Tensor) -> None:
    """Reload every file and check it reproduces the eager model on the saved inputs."""
    from safetensors.torch import load_file

    with torch.no_grad():
        ref = model(inputs)

    def fresh(sd: dict) -> nn.Module:
        m = ARCHS[name]()
        m.load_state_dict(sd)
        return m.eval()

    def strip(sd: dict, prefix: str) -> dict:
        return {k.removeprefix(prefix): v for k, v in sd.items()}

    f = HERE / name
    wo = {"weights_only": True}
    candidates = {
        "state_dict": fresh(torch.load(f"{f}.state_dict.pt", **wo)),
        "checkpoint": fresh(
            strip(torch.load(f"{f}.checkpoint.pt", **wo)["model_state_dict"], "module.")
        ),
        "lightning": fresh(strip(torch.load(f"{f}.lightning.ckpt", **wo)["state_dict"], "model.")),
        "module": torch.load(f"{f}.module.pt", weights_only=False),
        "torchscript": torch.jit.load(f"{f}.torchscript.pt"),
        "pt2": torch.export.load(f"{f}.pt2").module(),
        "safetensors": fresh(load_file(f"{f}.safetensors")),
    }
    for label, m in candidates.items():
        assert not getattr(m, "training", False) or label == "pt2", f"{label} saved in train mode"
        with torch.no_grad():
            err = (m(inputs) - ref).abs().max().item()
        assert err <= 1e-5, f"{name}.{label}: differs from eager by {err}"
    saved = np.load(f"{f}.inputs.npz")["input"]
    assert saved.dtype == np.float32 and np.array_equal(saved, inputs.numpy())


def digest(sd: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> int:
    torch.set_num_threads(OTHER_THREADS)
    torch.use_deterministic_algorithms(True)
    # deterministic mode also NaN-fills every fresh tensor; that only guards against reading
    # uninitialised memory and costs ~40% of the conv training time on CPU
    torch.utils.deterministic.fill_uninitialized_memory = False
    t_all = time.perf_counter()
    for seed, name in enumerate(ARCHS, start=1):
        res = train(name, seed)
        model = res["model"]
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert all(int(m.num_batches_tracked) > 0 for m in bns), "BN stats not populated"
        files, onnx_how = save_all(name, res)
        onnx_err = check_onnx(HERE / f"{name}.onnx", model, res["inputs"])
        verify_reload(name, model, res["inputs"])
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"{name:9s} params={n_params:6d}  train {res['train_time']:5.1f}s "
            f"({res['epochs']} epochs, {res['global_step']} steps)  "
            f"held-out accuracy {res['accuracy']:.4f} (chance {1 / res['n_classes']:.2f})  "
            f"BN layers={len(bns)}  state_dict sha256[:16]={digest(model.state_dict())}"
        )
        print(f"    onnx: {onnx_how}; onnxruntime max |diff| = {onnx_err:.2e}")
        for path in files:
            size = path.stat().st_size
            assert size <= MAX_FILE_BYTES, f"{path.name} is {size} bytes (> 1 MiB)"
            print(f"    {path.name:28s} {size:8d} bytes")
    print(f"total {time.perf_counter() - t_all:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

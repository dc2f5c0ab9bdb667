"""Lab 01 - PyTorch basics: tensors, autograd, devices (curriculum days 1-2).

What you learn
  Tensors   creation, dtype and device, indexing and slicing, broadcasting, views vs copies
            (strides, `contiguous`), in-place operations, the NumPy bridge.
  Autograd  the graph `backward` walks, gradient accumulation and zeroing, `no_grad`/`detach`,
            a gradient derived by hand (logistic regression) and checked against autograd, and a
            custom `torch.autograd.Function` (SiLU) checked with `gradcheck`.
  Devices   choosing a device, moving data, and a matrix-multiply benchmark over several sizes
            (`torch.utils.benchmark`, which warms up and synchronises the accelerator for you),
            CPU vs the accelerator, as a table, a plot and numbers in metrics.json. With no
            accelerator the lab says so and reports the CPU alone.
  This lab trains nothing and downloads nothing (`--data-dir` is accepted but unused), so it has
  no --precision flag: the training labs (02 on) pick mixed precision.

Run it
  Terminal:  python week1_pytorch/01_pytorch_basics.py            (add --smoke for a quick pass)
             python week1_pytorch/01_pytorch_basics.py --sizes 512,2048,8192 --bench-seconds 1
  Colab:     Runtime > Change runtime type > GPU, upload this file and run
             `!python 01_pytorch_basics.py`, or paste the file into a cell (figures show inline).
  Notebook:  `jupytext --to notebook 01_pytorch_basics.py` makes one cell per `# %%` section; the
             last cell runs main() with the defaults; for flags, call e.g. main(["--smoke"]).
  Bad input (a flag out of range, --device cuda on a machine without one, --out-dir naming a file)
  ends with one line saying what to change, never a traceback.
  Outputs in --out-dir (default runs/01_pytorch_basics): metrics.json, matmul_benchmark.png,
  silu_gradient.png.

Measured (default run, `python week1_pytorch/01_pytorch_basics.py`, torch 2.14.1, float32)
  2-core CPU, no accelerator (median of 3 runs): 12.2 s wall for the whole process, 9.9 s of it
  inside the lab (starting Python and importing torch is the rest); nothing is trained.
  The hand gradient equals autograd's to 0.0e+00 in float64, the custom SiLU passes gradcheck.
  Matmul: 37-60 GFLOP/s at n=64 (call overhead dominates), 140-150 GFLOP/s from n=256 to 4096
  (n=4096 takes 0.96-0.98 s a product): two cores are saturated from n=256 on.
  GPU: not measured yet.
  Smoke run (`--smoke`, median of 3): 5.9 s wall on the 2-core CPU, 3.1 s of it inside the lab.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

LAB_NAME = "01_pytorch_basics"


# %%
# Plumbing: the same text in every lab of the course (CONTRIBUTING.md, "The same plumbing in every
# lab"; tests/test_lab_contract.py checks that the copies are identical). A LabError is a problem you
# can fix, printed as one line; the device; the mixed-precision policy; flags checked before anything
# runs; files written whole (a temporary file, then a rename), so a stopped run never leaves half a file.
class LabError(Exception):
    """Something the learner can fix (a flag, missing data, a bad checkpoint); main() prints it."""


def in_notebook() -> bool:
    return "ipykernel" in sys.modules


def one_line(err: Exception, limit: int = 300) -> str:
    """An exception's message on one short line (PyTorch's own can span many)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def pick_device(name: str) -> torch.device:
    """--device NAME as a torch.device; auto = the accelerator if there is one, else the CPU."""
    if name == "auto":
        if torch.accelerator.is_available():
            return torch.accelerator.current_accelerator()
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LabError("--device cuda was asked for, but this machine has no CUDA GPU that PyTorch "
                       f"can use (torch {torch.__version__}). Use --device auto or --device cpu; in "
                       "Colab pick Runtime > Change runtime type > GPU.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise LabError("--device mps was asked for, but Apple's Metal backend is not available here. "
                       "Use --device auto or --device cpu.")
    return torch.device(name)


def folder(path, flag: str) -> Path:
    """--data-dir and --out-dir are folders (created when missing), never files."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise LabError(f"{flag} {path} is a file, not a folder; give a folder (it is created if missing).")
    return folder


# Mixed precision. On CUDA, --precision auto picks bf16 where the GPU runs it natively (Ampere and
# newer) and fp16 with a GradScaler elsewhere: a T4 reports bf16 support only when emulation is
# counted, and emulated bf16 runs slowly. CPU and MPS compute in fp32.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_precision(name: str, device: torch.device):
    """The autocast dtype for --precision NAME on DEVICE, or None for plain fp32."""
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if name != "fp32" and device.type != "cuda":
        raise LabError(f"--precision {name} is for CUDA GPUs; on {device.type} use --precision auto or fp32.")
    return PRECISIONS[name]


def autocast(device: torch.device, dtype):
    """Run the forward pass (and loss) inside this; a no-op when dtype is None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device: torch.device, dtype) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; with bf16 or fp32 the scaler does nothing."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


# Flags: each number is checked by its type= function, so a value out of range is refused before
# anything runs (ArgumentParser below turns argparse's complaint into a one-line LabError).
def number(kind, *, at_least=None, above=None, below=None, at_most=None):
    """A type= function: text -> a finite int or float within the bounds given."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        too_low = (at_least is not None and value < at_least) or (above is not None and value <= above)
        too_high = (below is not None and value >= below) or (at_most is not None and value > at_most)
        if not math.isfinite(value) or too_low or too_high:
            limits = {"at least": at_least, "above": above, "below": below, "at most": at_most}
            wanted = " and ".join(f"{words} {bound}" for words, bound in limits.items() if bound is not None)
            raise argparse.ArgumentTypeError(f"must be {'a whole number' if kind is int else 'a finite number'} "
                                             f"{wanted}, got {text!r}")
        return value
    return parse


positive_int = number(int, at_least=1)
whole_number = number(int, at_least=0)
positive_float = number(float, above=0)
probability = number(float, at_least=0, below=1)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a LabError: one line, no usage dump."""

    def error(self, message):
        raise LabError(f"{message} (--help lists the flags)")


def write_json_atomically(data: dict, path: Path) -> None:
    """metrics.json and friends: the whole file or, if the run stops, the previous one."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2))
    os.replace(temporary, path)


def torch_save_atomically(checkpoint: dict, path: Path) -> None:
    """A checkpoint: the whole file or, if the run stops, the previous one."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, temporary)
    os.replace(temporary, path)


# %%
# Setup: figures. The device comes from pick_device in the plumbing cell above: `auto` takes the
# accelerator PyTorch finds (CUDA, MPS, XPU...), else the CPU; asking for a device that is not there
# is an error you can act on, not a crash.
def pyplot():
    """matplotlib's pyplot, drawing to files (Agg) unless we are in a notebook."""
    import matplotlib
    if not in_notebook():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> None:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    if in_notebook():
        pyplot().show()
    pyplot().close(fig)


# %%
# Tensors 1: creation, dtype and device. A tensor is a block of numbers plus three facts about
# it: its shape, its dtype (what each number is) and its device (which memory it lives in).
def tour_of_creation(device: torch.device) -> None:
    print("\n== Tensors: creation, dtype, device ==")
    from_list = torch.tensor([[1, 2, 3], [4, 5, 6]])          # (2, 3), dtype inferred: int64
    zeros = torch.zeros(2, 3)                                   # float32 is PyTorch's default
    steps = torch.arange(0, 10, 2)                              # like range(): [0, 2, 4, 6, 8]
    grid = torch.linspace(-1, 1, steps=5)                       # 5 evenly spaced points, ends included
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))  # N(0, 1), reproducible
    like = torch.ones_like(noise)                               # same shape, dtype, device as noise
    for name, t in [("tensor", from_list), ("zeros", zeros), ("arange", steps),
                    ("linspace", grid), ("randn", noise), ("ones_like", like)]:
        print(f"  {name:9s} shape={tuple(t.shape)!s:8s} dtype={t.dtype!s:13s} device={t.device}")
    # Mixing dtypes promotes to the wider one; .to() converts explicitly.
    print(f"  int64 + float32 -> {(from_list + zeros).dtype};  .to(float16) -> {zeros.to(torch.float16).dtype}")
    # Create directly on the device: cheaper than making it on the CPU and copying it over.
    on_device = torch.zeros(2, 3, device=device)
    print(f"  torch.zeros(2, 3, device='{device}') lives on {on_device.device}")


# %%
# Tensors 2: indexing, slicing and broadcasting. Slicing works like NumPy. Broadcasting lines up
# shapes from the right; a dimension of size 1 is stretched to match, without copying memory.
def tour_of_indexing_and_broadcasting() -> None:
    print("\n== Tensors: indexing, slicing, broadcasting ==")
    x = torch.arange(12).reshape(3, 4)                          # (3, 4)
    print(f"  x =\n{x}")
    print(f"  x[1] = {x[1].tolist()}   x[:, 2] = {x[:, 2].tolist()}   x[-1, ::2] = {x[-1, ::2].tolist()}")
    print(f"  boolean mask x[x % 5 == 0] = {x[x % 5 == 0].tolist()}")
    print(f"  fancy index x[[0, 2], [1, 3]] = {x[[0, 2], [1, 3]].tolist()}  (picks (0,1) and (2,3))")
    column = torch.tensor([[10], [20], [30]])                   # (3, 1)
    row = torch.tensor([1, 2, 3, 4])                            # (4,) -> treated as (1, 4)
    table = column + row                                        # (3, 1) + (1, 4) -> (3, 4)
    print(f"  (3, 1) + (4,) broadcasts to {tuple(table.shape)}:\n{table}")
    # The stretch costs no memory: expand() makes a view whose stride along the new axis is 0.
    stretched = column.expand(3, 4)
    print(f"  column.expand(3, 4).stride() = {stretched.stride()}  (0: every column reads the same number)")


# %%
# Tensors 3: views vs copies. A view is a new shape over the SAME memory (the storage); writing
# through a view changes the original. Strides say how many elements to skip per step along each
# dimension; transpose only swaps strides, so the result is no longer contiguous in memory.
def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two tensors read the same block of memory (one is a view of the other)."""
    # Exercise shares_storage: return True when tensors a and b read the same memory block. A view
    # (view, t, slicing, expand) keeps the base's storage and only changes shape/strides/offset,
    # so compare where the two storages start (the storage, not the tensor's own first element:
    # base[1:] starts later in memory but is still a view). clone()/contiguous() copies must give False.
    # Docs: https://pytorch.org/docs/stable/generated/torch.Tensor.untyped_storage.html
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def tour_of_views_and_copies() -> None:
    print("\n== Tensors: views vs copies, strides, contiguous ==")
    base = torch.arange(6.0).reshape(2, 3)                      # (2, 3), strides (3, 1)
    viewed = base.view(3, 2)                                    # same memory, new shape
    transposed = base.t()                                       # (3, 2), strides (1, 3)
    print(f"  base       stride={base.stride()}  contiguous={base.is_contiguous()}")
    print(f"  base.t()   stride={transposed.stride()}  contiguous={transposed.is_contiguous()}"
          f"  shares memory with base: {shares_storage(base, transposed)}")
    viewed[0, 0] = 100.0                                        # write through the view...
    print(f"  after viewed[0, 0] = 100: base[0, 0] = {base[0, 0].item():.0f}  (the view wrote into base)")
    try:
        transposed.view(6)
    except RuntimeError as err:
        print(f"  base.t().view(6) fails: {str(err).splitlines()[0][:80]}...")
    packed = transposed.contiguous()                            # copies into a fresh, row-major block
    print(f"  base.t().contiguous(): stride={packed.stride()}  shares memory: {shares_storage(base, packed)}")
    print(f"  reshape() views when it can and copies when it must; clone() always copies: "
          f"{shares_storage(base, base.clone())}")


# %%
# Tensors 4: in-place operations (a trailing underscore: add_, mul_, zero_) overwrite memory instead
# of allocating. They save memory but can destroy values autograd still needs, so PyTorch guards them.
def tour_of_in_place() -> None:
    print("\n== Tensors: in-place operations ==")
    x = torch.ones(3)
    address = x.data_ptr()
    x.add_(1).mul_(3)                                           # (1 + 1) * 3, in the same memory
    print(f"  x.add_(1).mul_(3) = {x.tolist()}  same memory: {x.data_ptr() == address}")
    leaf = torch.ones(3, requires_grad=True)
    try:
        leaf.add_(1)
    except RuntimeError as err:
        print(f"  on a leaf that requires grad: {str(err)[:70]}...")
    w = torch.ones(3, requires_grad=True)
    y = w.exp()                                                 # exp's backward reuses its output y
    y.mul_(2)                                                   # ...which we now overwrite
    try:
        y.sum().backward()
    except RuntimeError as err:
        print(f"  overwriting a value saved for backward: {str(err)[:70]}...")


# %%
# Tensors 5: the NumPy bridge. torch.from_numpy and .numpy() share memory with the array (CPU only),
# so a change on one side shows on the other; torch.tensor(array) copies.
def tour_of_numpy_bridge() -> None:
    print("\n== Tensors: the NumPy bridge ==")
    array = np.zeros(3, dtype=np.float32)
    shared = torch.from_numpy(array)
    copied = torch.tensor(array)
    array[0] = 7.0
    print(f"  array[0] = 7 -> from_numpy sees {shared[0].item():.0f}, torch.tensor copy sees {copied[0].item():.0f}")
    back = shared.numpy()
    back[1] = 5.0
    print(f"  tensor.numpy()[1] = 5 -> tensor is {shared.tolist()}")
    print("  a GPU tensor must come to the CPU first: t.cpu().numpy(); one that requires grad: "
          "t.detach().cpu().numpy()")


# %%
# Autograd 1: the graph. Every operation on a tensor that requires grad records a node (grad_fn);
# backward() walks those nodes from the output back to the leaves and stores .grad on each leaf.
def graph_lines(tensor: torch.Tensor) -> list[str]:
    """The chain of grad_fn nodes below a tensor, one line per node, leaves last."""
    lines, frontier, seen = [], [(tensor.grad_fn, 0)], set()
    while frontier:
        node, depth = frontier.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        lines.append("  " + "  " * depth + type(node).__name__)
        frontier.extend((child, depth + 1) for child, _ in reversed(node.next_functions))
    return lines


def tour_of_autograd() -> None:
    print("\n== Autograd: the graph, backward, accumulation, no_grad/detach ==")
    x = torch.tensor(2.0, requires_grad=True)
    w = torch.tensor(3.0, requires_grad=True)
    y = (w * x + 1) ** 2                                        # y = (wx + 1)^2 = 49
    print(f"  y = (w*x + 1)^2 = {y.item():.0f}; the graph backward() will walk:")
    print("\n".join(graph_lines(y)))
    y.backward()
    # dy/dw = 2(wx + 1) x = 28, dy/dx = 2(wx + 1) w = 42
    print(f"  dy/dw = {w.grad.item():.0f} (2(wx+1)x = 28)   dy/dx = {x.grad.item():.0f} (2(wx+1)w = 42)")

    # Gradients ADD UP across backward() calls (handy for accumulating over micro-batches),
    # so a training loop clears them each step: optimizer.zero_grad() sets them to None.
    ((w * x + 1) ** 2).backward()
    print(f"  a second backward without zeroing: dy/dw = {w.grad.item():.0f} (28 + 28)")
    optimizer = torch.optim.SGD([w, x], lr=0.1)
    optimizer.zero_grad()
    print(f"  after optimizer.zero_grad(): w.grad = {w.grad}")

    with torch.no_grad():                                       # evaluation, weight updates: no graph
        z = w * x
    print(f"  under no_grad: z.requires_grad = {z.requires_grad}")
    detached = (w * x).detach()                                 # same numbers, cut from the graph
    print(f"  (w*x).detach(): requires_grad = {detached.requires_grad}, value = {detached.item():.0f}")


# %%
# Autograd 2: a gradient derived by hand. Logistic regression, p = sigmoid(Xw + b), with the mean
# binary cross-entropy L = -mean(y log p + (1 - y) log(1 - p)). The chain rule gives
# dL/dz_i = (p_i - y_i) / N for the logits z = Xw + b, hence
#   dL/dw = X^T (p - y) / N        dL/db = sum(p - y) / N
# We check it against autograd through PyTorch's own loss, in float64 so only rounding remains.
def logistic_gradients_by_hand(X, y, w, b):
    """(dL/dw, dL/db) of the mean BCE of logistic regression. X (N, D), y (N,), w (D,), b scalar."""
    # Exercise logistic_gradients_by_hand: without autograd, return (dL/dw of shape (D,), dL/db a
    # 0-dim tensor) from the derivation above: the error p - y with p = sigmoid(Xw + b), then
    # dL/dw = X^T (p - y) / N and dL/db = sum(p - y) / N. The test compares with autograd in float64.
    # Docs: https://pytorch.org/docs/stable/generated/torch.nn.functional.binary_cross_entropy_with_logits.html
    error = torch.sigmoid(X @ w + b) - y                        # (N,)
    return X.T @ error / len(y), error.sum() / len(y)           # (D,), scalar


def logistic_gradients_by_autograd(X, y, w, b):
    w = w.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    F.binary_cross_entropy_with_logits(X @ w + b, y).backward()
    return w.grad, b.grad


def check_hand_gradient(seed: int, samples: int = 64, features: int = 5) -> float:
    """Largest absolute difference between the hand-derived and the autograd gradients."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(samples, features, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 2, (samples,), generator=generator).double()
    w = torch.randn(features, generator=generator, dtype=torch.float64)
    b = torch.randn((), generator=generator, dtype=torch.float64)
    by_hand = logistic_gradients_by_hand(X, y, w, b)
    by_autograd = logistic_gradients_by_autograd(X, y, w, b)
    return max((h - a).abs().max().item() for h, a in zip(by_hand, by_autograd))


# %%
# Autograd 3: a custom torch.autograd.Function. You write forward and backward yourself, which is
# how new operations (or faster/stabler versions of old ones) join autograd. SiLU(x) = x * sigmoid(x);
# with s = sigmoid(x) its derivative is s + x s (1 - s) = s (1 + x (1 - s)).
# gradcheck compares our backward with finite differences; it needs float64 to be meaningful.
class SiLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        # Exercise silu_forward: return x * sigmoid(x) (same shape as x), and keep on ctx what
        # backward will need to compute the derivative (the input x, via ctx.save_for_backward).
        # Docs: https://pytorch.org/docs/stable/generated/torch.autograd.Function.forward.html
        ctx.save_for_backward(x)                                # backward needs the input
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad_output):
        # Exercise silu_backward: read x back from ctx.saved_tensors and return dL/dx, shape of x:
        # the chain rule multiplies grad_output (dL/dSiLU) by dSiLU/dx = s (1 + x (1 - s)),
        # s = sigmoid(x). gradcheck compares it with finite differences in float64.
        # Docs: https://pytorch.org/docs/stable/notes/extending.html#extending-torch-autograd
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad_output * s * (1 + x * (1 - s))


def silu(x: torch.Tensor) -> torch.Tensor:
    return SiLUFunction.apply(x)


def check_custom_function(seed: int) -> tuple[bool, float]:
    """(gradcheck passed, largest |our gradient - PyTorch F.silu's gradient|)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    passed = torch.autograd.gradcheck(silu, (x,))
    (ours,) = torch.autograd.grad(silu(x).sum(), x)
    (theirs,) = torch.autograd.grad(F.silu(x).sum(), x)
    return passed, (ours - theirs).abs().max().item()


def plot_silu_gradient(path: Path) -> None:
    x = torch.linspace(-6, 6, 241, requires_grad=True)
    (ours,) = torch.autograd.grad(silu(x).sum(), x)
    (theirs,) = torch.autograd.grad(F.silu(x).sum(), x)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    grid = x.detach()
    ax.plot(grid, silu(grid), label="SiLU(x) = x·sigmoid(x)")
    ax.plot(grid, ours, label="d/dx from our backward()", linewidth=3, alpha=0.6)
    ax.plot(grid, theirs, "k--", label="d/dx from autograd on F.silu")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set(xlabel="x", title="A custom autograd.Function and its gradient")
    ax.legend()
    save_figure(fig, path)


# %%
# Devices: moving data. .to(device) returns a copy on that device (a no-op if it is already there).
# All tensors in one operation must share a device. On CUDA, copies from pinned (page-locked) host
# memory can run asynchronously with non_blocking=True, overlapping the copy with compute.
def tour_of_devices(device: torch.device) -> None:
    print("\n== Devices: selection and moving data ==")
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    print(f"  accelerator PyTorch sees: {accelerator or 'none'};  this run uses: {device}")
    batch = torch.randn(256, 128)
    if device.type == "cuda":
        batch = batch.pin_memory()
    on_device = batch.to(device, non_blocking=device.type == "cuda")
    model = torch.nn.Linear(128, 10).to(device)                 # modules move their parameters in place
    logits = model(on_device)                                   # (256, 10)
    print(f"  batch on {on_device.device}, weights on {model.weight.device}, logits on {logits.device}")
    print(f"  back to the CPU for printing/NumPy: logits.cpu() is on {logits.cpu().device}")


# %%
# Devices: a matrix-multiply benchmark. GPU work is queued asynchronously, so a timer must wait
# for it to finish (synchronise), and first calls pay one-off costs (kernel selection, memory pools),
# so we warm up first. torch.utils.benchmark.Timer does both and reports the median of many runs.
# An n x n matmul costs 2 n^3 floating-point operations, so GFLOP/s = 2 n^3 / seconds / 1e9.
def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def benchmark_matmul(sizes: list[int], device: torch.device, seconds_per_size: float, seed: int) -> list[dict]:
    """Median time and GFLOP/s of a float32 (n, n) @ (n, n) product on `device`, for each n."""
    # Imported here, not at the top: on a machine with a CUDA toolkit but no GPU, importing it logs a
    # warning, which would spoil the one-line message of a run refused for a bad flag.
    from torch.utils import benchmark
    rows = []
    generator = torch.Generator().manual_seed(seed)
    for n in sizes:
        a = torch.randn(n, n, generator=generator).to(device)
        b = torch.randn(n, n, generator=generator).to(device)
        for _ in range(2):                                      # explicit warm-up (Timer adds its own)
            a @ b
        synchronize(device)
        timer = benchmark.Timer(stmt="a @ b", globals={"a": a, "b": b},
                                num_threads=torch.get_num_threads(),  # Timer defaults to 1 thread
                                label="matmul", sub_label=f"{n}x{n}", description=str(device))
        measurement = timer.blocked_autorange(min_run_time=seconds_per_size)
        rows.append({"size": n, "median_ms": measurement.median * 1e3, "iqr_ms": measurement.iqr * 1e3,
                     "gflops": 2 * n**3 / measurement.median / 1e9,
                     "timed_calls": len(measurement.times) * measurement.number_per_run})
        print(f"  {device.type:>5s} {n:5d} x {n:<5d} {measurement.median * 1e3:10.3f} ms "
              f"{rows[-1]['gflops']:9.1f} GFLOP/s")
    return rows


def print_benchmark_table(results: dict[str, list[dict]]) -> None:
    devices = list(results)
    header = f"  {'size':>6s}" + "".join(f" {d + ' ms':>12s} {d + ' GFLOP/s':>14s}" for d in devices)
    if len(devices) == 2:
        header += f" {'speed-up':>9s}"
    print(header)
    for i, row in enumerate(results[devices[0]]):
        line = f"  {row['size']:6d}"
        for d in devices:
            line += f" {results[d][i]['median_ms']:12.3f} {results[d][i]['gflops']:14.1f}"
        if len(devices) == 2:
            line += f" {row['median_ms'] / results[devices[1]][i]['median_ms']:8.1f}x"
        print(line)


def plot_benchmark(results: dict[str, list[dict]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in results.items():
        ax.plot([r["size"] for r in rows], [r["gflops"] for r in rows], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="matrix size n (n x n @ n x n, float32)", ylabel="GFLOP/s (median)",
           title="Matrix multiply throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


# %%
# Putting it together: flags, the tours in order, the benchmark, and the files this run writes.
# A flag out of range is refused by its type= function, before anything runs, as one line (the
# plumbing cell's ArgumentParser turns argparse's complaint into a LabError). --sizes is a comma list,
# so it has its own type= function here.
def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"every matrix size must be a positive whole number, got {text!r}")
    return sorted(set(sizes))


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where the tensors and the benchmark run; auto = the accelerator if any, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="random seed for every generated tensor")
    parser.add_argument("--data-dir", default="./data", help="unused: this lab needs no dataset")
    parser.add_argument("--out-dir", default=f"runs/{LAB_NAME}", help="where metrics.json and the figures go")
    parser.add_argument("--smoke", action="store_true",
                        help="quick pass over every code path: small matrices, short timings")
    parser.add_argument("--sizes", type=parse_sizes, default=None,
                        help="comma-separated matrix sizes n to benchmark "
                             "(default 64,128,256,512,1024,2048,4096; smoke 32,64,128)")
    parser.add_argument("--bench-seconds", type=positive_float, default=None,
                        help="seconds of timed runs per size and device, > 0 (default 0.3; smoke 0.02)")
    return parser


def run(args) -> None:
    started = time.perf_counter()
    device = pick_device(args.device)
    folder(args.data_dir, "--data-dir")                         # unused, but a file there is a mistake
    out_dir = folder(args.out_dir, "--out-dir")
    torch.manual_seed(args.seed)
    sizes = args.sizes or ([32, 64, 128] if args.smoke else [64, 128, 256, 512, 1024, 2048, 4096])
    seconds_per_size = args.bench_seconds or (0.02 if args.smoke else 0.3)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"Lab {LAB_NAME}: torch {torch.__version__}, device {device}, "
          f"{torch.get_num_threads()} CPU threads{' (smoke run)' if args.smoke else ''}")

    tour_of_creation(device)
    tour_of_indexing_and_broadcasting()
    tour_of_views_and_copies()
    tour_of_in_place()
    tour_of_numpy_bridge()
    tour_of_autograd()

    print("\n== Autograd: gradients by hand vs autograd ==")
    hand_difference = check_hand_gradient(args.seed)
    verdict = "rounding only: the derivation is right" if hand_difference < 1e-10 else "they DISAGREE"
    print(f"  logistic regression, float64: largest |hand - autograd| = {hand_difference:.1e} ({verdict})")
    gradcheck_passed, silu_difference = check_custom_function(args.seed)
    print(f"  custom SiLUFunction: gradcheck passed = {gradcheck_passed}; "
          f"largest |ours - F.silu's gradient| = {silu_difference:.1e}")
    plot_silu_gradient(out_dir / "silu_gradient.png")

    tour_of_devices(device)

    print(f"\n== Benchmark: float32 matmul, {seconds_per_size:g} s of timed runs per size ==")
    devices = [torch.device("cpu")] + ([device] if device.type != "cpu" else [])
    if len(devices) == 1:
        reason = "no accelerator found" if args.device == "auto" else "--device cpu chosen"
        print(f"  {reason}: reporting the CPU alone (run on a GPU to see the comparison)")
    results = {d.type: benchmark_matmul(sizes, d, seconds_per_size, args.seed) for d in devices}
    print()
    print_benchmark_table(results)
    plot_benchmark(results, out_dir / "matmul_benchmark.png")
    cpu_best = max(row["gflops"] for row in results["cpu"])

    metrics = {
        "lab": LAB_NAME, "smoke": args.smoke, "device": str(device), "torch_version": torch.__version__,
        "wall_time_s": 0.0, "train_time_s": 0.0, "steps": len(sizes),
        "cpu_threads": torch.get_num_threads(),
        "accelerator": str(devices[1]) if len(devices) == 2 else None,
        "hand_vs_autograd_max_abs_diff": hand_difference,
        "custom_function_gradcheck_passed": gradcheck_passed,
        "silu_vs_pytorch_max_abs_diff": silu_difference,
        "benchmark_seconds_per_size": seconds_per_size,
        "benchmark": results,
        "cpu_peak_gflops": cpu_best,
    }
    if len(devices) == 2:
        accelerator_rows = results[device.type]
        metrics["accelerator_peak_gflops"] = max(row["gflops"] for row in accelerator_rows)
        metrics["speedup_at_largest_size"] = results["cpu"][-1]["median_ms"] / accelerator_rows[-1]["median_ms"]
    metrics["wall_time_s"] = time.perf_counter() - started
    write_json_atomically(metrics, out_dir / "metrics.json")

    print("\nSummary")
    print(f"  hand-derived gradient vs autograd: {hand_difference:.1e}; custom SiLU passes gradcheck")
    print(f"  matmul peak: CPU {cpu_best:.1f} GFLOP/s", end="")
    if len(devices) == 2:
        print(f", {device.type} {metrics['accelerator_peak_gflops']:.1f} GFLOP/s "
              f"({metrics['speedup_at_largest_size']:.1f}x faster at n={sizes[-1]})", end="")
    print(f"\n  outputs in {out_dir}/: metrics.json, matmul_benchmark.png, silu_gradient.png "
          f"({metrics['wall_time_s']:.1f} s in all)")
    print("  next: rerun with --sizes 512,2048,8192 --bench-seconds 1 to push the hardware further")


# %%
# Predict, then run. Write your prediction down before each command; the lab prints the answer.
# 1. Run: python week1_pytorch/01_pytorch_basics.py --sizes 512,1024 --bench-seconds 1
#    Predict: n=1024 is 8 times the arithmetic of n=512 (2n^3): how many times longer does one product
#    take, and does the GFLOP/s figure go up, down or stay?
#    Answer: the "cpu ms" and "cpu GFLOP/s" columns of the table; benchmark.cpu in metrics.json.
# 2. Run: python week1_pytorch/01_pytorch_basics.py --sizes 16,64,256
#    Predict: how many times fewer GFLOP/s does a 16 x 16 product reach than a 256 x 256 one, and why?
#    Answer: the "cpu GFLOP/s" column (the cost of a call, not the arithmetic, dominates small sizes).
# 3. Run: python week1_pytorch/01_pytorch_basics.py --sizes 2048   (after adding torch.set_num_threads(1)
#    as the first line of run(), then without it)
#    Predict: how much lower is one thread's GFLOP/s than all the cores'?
#    Answer: the first line ("... N CPU threads") and the "cpu GFLOP/s" column; cpu_threads and
#    cpu_peak_gflops in metrics.json.
# 4. Run: python week1_pytorch/01_pytorch_basics.py --device cuda --sizes 64,4096   (on a GPU: Colab)
#    Predict: is the GPU faster at n=64? How many times faster is it at n=4096?
#    Answer: the "speed-up" column; speedup_at_largest_size in metrics.json.


# %%
# The entry point: a terminal run, a notebook cell and the tests all call main().
def main(argv=None) -> None:
    try:
        args, _unknown = build_parser().parse_known_args(argv)   # Colab adds -f kernel.json
        run(args)
    except LabError as err:
        if not in_notebook():
            sys.exit(f"error: {err}")
        print(f"error: {err}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Lab 02 - Neural networks: nn.Module, a layer by hand, losses, optimizers, MNIST (curriculum days 3-4).

What you learn
  nn.Module    subclassing it: an MLP (multi-layer perceptron) whose layers become registered
               parameters that optimizers, `.to(device)` and `state_dict` all find by themselves.
  By hand      one Linear+ReLU layer's forward AND backward pass written with plain tensor maths,
               shown equal to what autograd computes.
  Losses       cross-entropy as log-softmax + negative log-likelihood, and a custom loss written by
               hand (label-smoothed cross-entropy) shown equal to F.cross_entropy(label_smoothing=).
  Optimizers   SGD with momentum vs Adam from the same start, on the same batches, for the same
               number of steps: one plot of both loss curves.
  MNIST        a classifier through torchvision.datasets.MNIST, trained with AdamW and a one-cycle
               learning-rate schedule; a confusion matrix (seaborn) and a grid of the digits it gets
               wrong, so you see *how* it fails, not only how often.

Run it
  Terminal:  python week1_pytorch/02_neural_network.py          (downloads MNIST, ~11 MB, into ./data)
             python week1_pytorch/02_neural_network.py --smoke  (generated digits, no network)
             python week1_pytorch/02_neural_network.py --epochs 3 --lr 1e-3 --batch-size 256
             tensorboard --logdir runs/02_neural_network/tensorboard
  Colab:     upload this file and run `!python 02_neural_network.py`, or paste it into a cell
             (figures then show inline). Runtime > Change runtime type > GPU makes it faster.
  Notebook:  `jupytext --to notebook 02_neural_network.py`; the last cell runs main() with the
             defaults, or call e.g. main(["--smoke"]).
  GPU:       --precision auto (the default) trains in bf16 where the GPU has it natively (Ampere
             and newer) and in fp16 with a GradScaler elsewhere (a T4); --precision fp32 turns
             mixed precision off, --precision fp16 tries a T4's path on any CUDA GPU. The data
             lives on the GPU as one tensor and losses are read once per epoch, so no step waits
             for the GPU (but for the fp16 GradScaler's own overflow check).
  Bad input (missing data offline, --device cuda without a GPU, a flag out of range, --data-dir
  or --out-dir naming a file) ends with one line saying what to change, never a traceback.
  Progress: a bar over each epoch's batches in a terminal or notebook (hidden under --smoke or
  when the output is not a terminal); TensorBoard shows the loss of every step, the learning
  rate, test accuracy per epoch, the first layer's weights as 28x28 pictures and the digits the
  model gets wrong.
  Outputs in --out-dir (default runs/02_neural_network): metrics.json, optimizer_comparison.png,
  confusion_matrix.png, misclassified.png, mlp_mnist.pt (model + config + sample predictions),
  tensorboard/.

Measured (torch 2.14.1)
  2-core CPU, default run (`python week1_pytorch/02_neural_network.py`):
    test accuracy 98.57% after 8 epochs (143 of 10,000 wrong; target 98.0%) in 49 s wall in all,
    35 s of it training the classifier and 7 s the optimizer comparison (after 400 steps: SGD with
    momentum 96.51%, Adam 96.26%; Adam cut the loss faster over the first 50 steps). A repeat run
    gave the same figures in 39 s: wall time moves with the machine's load, results do not.
  GPU: not measured yet.
  Smoke run (`--smoke`): 5.5-6.3 s wall.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

LAB_NAME = "02_neural_network"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # pixel mean and std of the 60,000 training images
DOWNLOAD_TIMEOUT_S = 20  # a network that silently drops packets should fail in seconds, not minutes


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
# The settings of a run.
@dataclass
class Config:
    """Every hyper-parameter of the default run, in one place, with its unit."""
    hidden_sizes: tuple = (512, 256)  # widths of the hidden layers
    dropout: float = 0.2              # probability of zeroing a hidden unit while training
    epochs: int = 8                   # passes over the 60,000 training images
    batch_size: int = 128             # images per optimizer step
    lr: float = 2e-3                  # peak learning rate of the one-cycle schedule
    weight_decay: float = 1e-4        # AdamW's decoupled pull of the weights towards zero
    label_smoothing: float = 0.1      # share of each target spread evenly over the 10 classes
    compare_steps: int = 400          # optimizer comparison: steps for SGD and for Adam (~0.85 epoch)
    seed: int = 0
    smoke: bool = False


# %%
# Setup: TF32 matmuls and figures that go to files (and inline in a notebook). The device, the
# precision policy and the flag checks are in the plumbing cell above.
@contextlib.contextmanager
def tf32_matmuls(device: torch.device):
    """float32 matmuls in TF32 on CUDA (Ampere and newer run them on tensor cores; older GPUs ignore
    it), and the kernel's own setting back afterwards. No cudnn.benchmark: an MLP runs no convolutions."""
    previous = torch.backends.cuda.matmul.fp32_precision
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous


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
# nn.Module: subclass it, create layers in __init__, say how data flows in forward().
# Assigning a layer to `self.something` registers its weights, so model.parameters(),
# model.to(device) and model.state_dict() find them without any bookkeeping of ours.
class MLP(nn.Module):
    """784 pixels -> [Linear -> ReLU -> Dropout] per hidden size -> 10 class scores (logits)."""

    def __init__(self, hidden_sizes=(512, 256), dropout: float = 0.2,
                 in_features: int = 28 * 28, num_classes: int = 10):
        super().__init__()
        layers, width = [], in_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        self.hidden = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.flatten(start_dim=1)        # (B, 1, 28, 28) -> (B, 784)
        return self.head(self.hidden(x))       # (B, 10) logits; softmax lives inside the loss


def build_model(config: dict) -> MLP:
    """The architecture a checkpoint's config describes (the tests rebuild saved models with it)."""
    return MLP(hidden_sizes=tuple(config["hidden_sizes"]), dropout=config["dropout"])


def describe_model(model: nn.Module) -> None:
    print(model)
    for name, parameter in model.named_parameters():
        print(f"  {name:16s} {str(tuple(parameter.shape)):12s} {parameter.numel():>9,d} numbers")
    total = sum(p.numel() for p in model.parameters())
    print(f"  {total:,d} trainable numbers, all found through model.parameters()")


# %%
# One layer by hand: y = relu(x W^T + b). The backward pass is the chain rule applied to that
# line: the ReLU lets gradient through only where its input was positive; then the three
# matrix products below give dL/dx, dL/dW and dL/db. Autograd does exactly this for us.
def linear_relu_forward(x, weight, bias):
    # Exercise linear_relu_forward: x (B, in), weight (out, in) as nn.Linear stores it, bias (out,).
    # Return (y, cache): y = relu(x W^T + b), shape (B, out), and cache = (x, weight, pre_activation)
    # where pre_activation = x W^T + b is kept for the backward pass (ReLU's derivative needs its sign).
    # Docs: https://pytorch.org/docs/stable/generated/torch.nn.Linear.html
    pre_activation = x @ weight.T + bias            # (B, in) @ (in, out) -> (B, out)
    return pre_activation.clamp(min=0), (x, weight, pre_activation)


def linear_relu_backward(grad_output, cache):
    """Given dL/dy, return (dL/dx, dL/dW, dL/db) for y = relu(x W^T + b)."""
    # Exercise linear_relu_backward: unpack cache = (x, weight, pre_activation). First through the
    # ReLU: dL/dpre = grad_output where pre_activation > 0, else 0 (0 at exactly 0, as autograd).
    # Then one matrix product each: dL/dx (B, in), dL/dW (out, in), and dL/db (out,), the sum over
    # the batch because b was added to every row. Match the shapes and the products follow.
    # Docs: https://pytorch.org/docs/stable/notes/autograd.html
    x, weight, pre_activation = cache
    grad_pre = grad_output * (pre_activation > 0)   # (B, out): ReLU's derivative is 0 or 1
    grad_x = grad_pre @ weight                      # (B, out) @ (out, in) -> (B, in)
    grad_weight = grad_pre.T @ x                    # (out, B) @ (B, in) -> (out, in)
    grad_bias = grad_pre.sum(dim=0)                 # (out,): b was added to every row
    return grad_x, grad_weight, grad_bias


def check_layer_against_autograd(seed: int, batch: int = 16, fan_in: int = 784, fan_out: int = 64) -> float:
    """Largest |hand - autograd| over the output and the three gradients (float64, so only rounding)."""
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(fan_in, fan_out).double()
    x = torch.randn(batch, fan_in, dtype=torch.float64, generator=generator, requires_grad=True)
    grad_output = torch.randn(batch, fan_out, dtype=torch.float64, generator=generator)

    y_autograd = F.relu(layer(x))
    y_autograd.backward(grad_output)                # autograd: dL/d(everything), given dL/dy
    with torch.no_grad():
        y_hand, cache = linear_relu_forward(x, layer.weight, layer.bias)
        grads_hand = linear_relu_backward(grad_output, cache)
    pairs = [(y_hand, y_autograd), (grads_hand[0], x.grad),
             (grads_hand[1], layer.weight.grad), (grads_hand[2], layer.bias.grad)]
    return max((hand - auto).abs().max().item() for hand, auto in pairs)


# %%
# Losses. Cross-entropy = log-softmax, then the negative log-probability of the right class.
# Label smoothing trains towards a softened target, (1 - eps) on the true class plus eps/K on
# every class, which stops the model pushing its logits to extremes: a mild regulariser.
def label_smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    # Exercise label_smoothed_cross_entropy: logits (B, K), targets (B,) class indices -> the mean
    # loss over the batch, a 0-dim tensor, equal to F.cross_entropy(..., label_smoothing=smoothing).
    # Per example: (1 - eps) * (-log p(true class)) + eps * (-mean over the K classes of log p(k)),
    # with log p from log_softmax (stable, unlike log(softmax)); gather picks the true class.
    # Docs: https://pytorch.org/docs/stable/generated/torch.nn.CrossEntropyLoss.html
    log_probs = logits.log_softmax(dim=-1)                          # (B, K)
    nll = -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)     # (B,): -log p(true class)
    uniform = -log_probs.mean(dim=-1)                               # (B,): -mean_k log p(k)
    return ((1 - smoothing) * nll + smoothing * uniform).mean()


def check_losses_against_pytorch(seed: int, smoothing: float) -> dict:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, 10, dtype=torch.float64, generator=generator) * 3
    targets = torch.randint(0, 10, (64,), generator=generator)
    two_steps = F.nll_loss(F.log_softmax(logits, dim=-1), targets)
    return {
        "cross_entropy_vs_logsoftmax_nll": (F.cross_entropy(logits, targets) - two_steps).abs().item(),
        "label_smoothing_hand_vs_pytorch": (label_smoothed_cross_entropy(logits, targets, smoothing)
                                            - F.cross_entropy(logits, targets, label_smoothing=smoothing)).abs().item(),
    }


# %%
# Data. MNIST comes through torchvision, which downloads and checks the files (md5). Then we
# keep all 70,000 images as ONE uint8 tensor (55 MB; 220 MB as float32) instead of a per-image
# Dataset: on the 2-core CPU this lab was measured on, one epoch through torchvision's usual
# per-image PIL + ToTensor pipeline took 9.8 s (5.6 s with 2 workers), slicing random batches
# out of one tensor 0.04 s, and training the MLP for an epoch ~3 s. Lab 03 builds the Dataset
# and DataLoader way you need when data does not fit in memory.
def load_mnist(data_dir: Path) -> dict:
    """MNIST as uint8 image tensors (N, 28, 28) and int64 labels (N,), downloaded on first use."""
    from torchvision.datasets import MNIST     # here, not at the top: --smoke runs never pay for the import
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        train = MNIST(data_dir, train=True, download=True)
        test = MNIST(data_dir, train=False, download=True)
    except (RuntimeError, OSError) as err:  # torchvision's own error, or a network error it lets through
        files = ", ".join(name.removesuffix(".gz") for name, _md5 in MNIST.resources)
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise LabError(
            f"MNIST is not under {data_dir} and could not be downloaded from {MNIST.mirrors[0]} "
            f"(nor {', '.join(MNIST.mirrors[1:])}): {reason}. Connect to the network and rerun, or put "
            f"the files there yourself: {data_dir / 'MNIST' / 'raw'}/ holding {files} (or their .gz "
            f"archives). To try the lab without data, run it with --smoke (generated digits).") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return {"train_images": train.data, "train_labels": train.targets,
            "test_images": test.data, "test_labels": test.targets}


def make_smoke_digits(train_count: int = 1024, test_count: int = 256, seed: int = 0) -> dict:
    """Generated stand-ins with MNIST's shapes and dtypes: each class is a fixed blob pattern,
    shifted by up to 2 pixels and noised, so a model can learn it in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(10, 1, 6, 6, generator=generator) > 0.55).float()
    templates = F.pad(F.interpolate(coarse, size=(20, 20), mode="bilinear"), (4, 4, 4, 4))[:, 0]  # (10, 28, 28)
    count = train_count + test_count
    labels = torch.randint(0, 10, (count,), generator=generator)
    shifts = torch.randint(-2, 3, (count, 2), generator=generator).tolist()
    images = torch.stack([templates[label].roll(shift, dims=(0, 1)) for label, shift in zip(labels.tolist(), shifts)])
    images = (images * 200 + torch.rand(count, 28, 28, generator=generator) * 55).to(torch.uint8)
    return {"train_images": images[:train_count], "train_labels": labels[:train_count],
            "test_images": images[train_count:], "test_labels": labels[train_count:]}


def normalize(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), mean ~0 and std ~1 per pixel over MNIST."""
    return ((images.to(device).float() / 255 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


# %%
# Training and evaluation. One epoch = shuffle the indices, then for each batch: forward,
# loss, zero the old gradients, backward, optimizer step, scheduler step. Losses stay on the
# device as tensors (no .item() per step, which would wait for a GPU) and are checked once per
# epoch. With fp16 the GradScaler multiplies the loss before backward (so small gradients do not
# underflow to zero) and divides the gradients back before the step; otherwise it does nothing.
def raise_if_not_finite(step_losses: torch.Tensor, first_step: int) -> None:
    bad = (~torch.isfinite(step_losses)).nonzero()
    if len(bad):
        index = bad[0].item()
        raise LabError(f"the loss became {step_losses[index].item()} at step {first_step + index}: "
                       "training diverged. Lower --lr (or --batch-size) and rerun.")


def train_one_epoch(model, optimizer, images, labels, *, batch_size, generator, label_smoothing,
                    device, dtype, scaler, scheduler=None, max_steps=None, first_step=0,
                    lr_history=None, grad_norms=None, progress="", show_progress=False, bug=None) -> torch.Tensor:
    """Returns the loss of every step, shape (steps,). With a scheduler, the LR each step used is
    appended to lr_history; with a list as grad_norms, each step's gradient norm (a tensor on the
    device); progress names the bar (steps, rate, time left) shown if show_progress; bug is --bug."""
    model.train()                                    # dropout on
    order = torch.randperm(len(labels), generator=generator).to(device)
    step_losses = []
    batch_starts = range(0, len(labels), batch_size)[:max_steps]   # [:None] keeps them all
    # disable=None hides the bar where the output is not a terminal (tests, log files)
    bar = tqdm(batch_starts, desc=progress, unit="batch", leave=False, disable=None if show_progress else True)
    for start in bar:
        batch = order[start:start + batch_size]
        with autocast(device, dtype):
            logits = model(images[batch])            # (B, 10)
        loss = F.cross_entropy(logits.float(), labels[batch], label_smoothing=label_smoothing)
        if bug != "no-zero-grad":
            # Drill: --bug no-zero-grad skips this line, so each backward() adds its gradient to all the
            # earlier ones. Symptom: the gradient norm grows over training instead of shrinking (the
            # "gradient norm" line, grad_norm_growth in metrics.json) and the loss stops falling. Find it
            # by watching the gradient norm, or with a breakpoint() here: p.grad before backward() should be None.
            optimizer.zero_grad(set_to_none=True)    # gradients add up unless cleared
        scaler.scale(loss).backward()
        if grad_norms is not None:
            scaler.unscale_(optimizer)               # the true gradients, not fp16's scaled ones
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            grad_norms.append(torch.nn.utils.get_total_norm(grads))   # stays on the device: no wait
        scaler.step(optimizer)                       # skips the step if fp16 gradients overflowed
        scaler.update()
        if scheduler is not None:
            lr_history.append(scheduler.get_last_lr()[0])   # a Python float: no GPU read
            scheduler.step()
        step_losses.append(loss.detach())
    step_losses = torch.stack(step_losses).cpu()
    raise_if_not_finite(step_losses, first_step)
    return step_losses


@torch.no_grad()
def predict(model, images, device, dtype, batch_size: int = 2000) -> torch.Tensor:
    model.eval()                                     # dropout off: use every unit
    predictions = []
    for start in range(0, len(images), batch_size):
        with autocast(device, dtype):
            predictions.append(model(images[start:start + batch_size]).argmax(dim=1))
    return torch.cat(predictions).cpu()


def gradient_norm_growth(grad_norms: torch.Tensor) -> dict:
    """The gradient norm over the last steps against the first ones (a quarter of the steps, at most 50
    each): below 1 when training settles, far above 1 when gradients pile up (--bug no-zero-grad)."""
    window = min(50, max(1, len(grad_norms) // 4))
    first, last = grad_norms[:window].mean().item(), grad_norms[-window:].mean().item()
    return {"grad_norm_first_steps": first, "grad_norm_last_steps": last, "grad_norm_growth": last / first,
            "grad_norm_window": window}


# %%
# TensorBoard (`tensorboard --logdir runs/02_neural_network/tensorboard`): everything against the
# optimizer step. The loss of every step was read from the device once at the end of the epoch,
# so logging it costs no extra wait. The first layer's weights are shown as 28x28 pictures: each
# hidden unit's template of the pixels it responds to (noise at the start, strokes later).
def first_layer_pictures(model: MLP, count: int = 64) -> torch.Tensor:
    weights = model.hidden[0].weight[:count].detach().float().cpu().view(-1, 1, 28, 28)   # (count, 1, 28, 28)
    low = weights.amin(dim=(1, 2, 3), keepdim=True)
    high = weights.amax(dim=(1, 2, 3), keepdim=True)
    return (weights - low) / (high - low + 1e-12)      # each picture stretched to 0..1 on its own


def log_epoch(writer: SummaryWriter, model: MLP, step_losses: torch.Tensor, lrs: list, test_accuracy: float,
              steps_before: int) -> None:
    for offset, (loss, lr) in enumerate(zip(step_losses.tolist(), lrs), start=1):
        writer.add_scalar("loss/train", loss, steps_before + offset)
        writer.add_scalar("lr", lr, steps_before + offset)
    steps_done = steps_before + len(lrs)
    writer.add_scalar("accuracy/test", test_accuracy, steps_done)
    writer.add_images("first_layer_weights", first_layer_pictures(model), steps_done)
    writer.flush()


# %%
# Optimizers: same model start, same batches, same number of steps; only the update rule
# differs. SGD+momentum follows an averaged gradient with one global step size; Adam also
# scales each weight's step by how large its recent gradients were.
def compare_optimizers(config: Config, data: dict, device: torch.device, dtype, path: Path,
                       writer: SummaryWriter, bug=None) -> dict:
    torch.manual_seed(config.seed)
    start = MLP(config.hidden_sizes, config.dropout).to(device)
    contenders = {
        "SGD, momentum 0.9, lr 0.05": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        "Adam, lr 1e-3": lambda params: torch.optim.Adam(params, lr=1e-3),
    }
    results, curves = {}, {}
    for name, make_optimizer in contenders.items():
        model = copy.deepcopy(start)
        optimizer = make_optimizer(model.parameters())
        scaler = grad_scaler(device, dtype)
        torch.manual_seed(config.seed)               # same dropout masks for both
        generator = torch.Generator().manual_seed(config.seed)  # same batches for both
        losses = torch.empty(0)
        while len(losses) < config.compare_steps:
            epoch_losses = train_one_epoch(model, optimizer, data["train_x"], data["train_y"],
                                           batch_size=config.batch_size, generator=generator, device=device,
                                           dtype=dtype, scaler=scaler,
                                           label_smoothing=0.0, max_steps=config.compare_steps - len(losses),
                                           first_step=len(losses), progress=name.split(",")[0],
                                           show_progress=not config.smoke, bug=bug)
            losses = torch.cat([losses, epoch_losses])
        for step, loss in enumerate(losses.tolist(), start=1):   # both curves on one TensorBoard chart
            writer.add_scalars("optimizer_comparison/loss", {name.split(",")[0]: loss}, step)
        accuracy = (predict(model, data["test_x"], device, dtype) == data["test_y"].cpu()).float().mean().item()
        curves[name] = losses
        results[name] = {"steps": len(losses), "first_50_steps_loss": losses[:50].mean().item(),
                         "last_50_steps_loss": losses[-50:].mean().item(), "test_accuracy": accuracy}
        print(f"  {name:28s} mean loss: first 50 steps {results[name]['first_50_steps_loss']:.3f}, "
              f"last 50 steps {results[name]['last_50_steps_loss']:.3f}; test accuracy {accuracy:.2%}")
    quicker = min(results, key=lambda name: results[name]["first_50_steps_loss"])
    better = max(results, key=lambda name: results[name]["test_accuracy"])
    print(f"  notice: {quicker.split(',')[0]} cut the loss faster over the first 50 steps; after "
          f"{config.compare_steps} steps {better.split(',')[0]} tests better. A different lr can flip either: try it.")

    plt = pyplot()
    window = min(20, config.compare_steps)           # running mean: single batches are noisy
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        smooth = losses.unfold(0, window, 1).mean(dim=1)
        ax.plot(range(window, len(losses) + 1), smooth,
                label=f"{name} (test acc {results[name]['test_accuracy']:.2%})")
    ax.set(xlabel="optimizer step", ylabel=f"training loss (mean of {window} steps)", yscale="log",
           title=f"Same start, same batches, {config.compare_steps} steps each")
    ax.legend()
    save_figure(fig, path)
    return results


def train_classifier(model, config: Config, data: dict, device: torch.device, dtype, writer: SummaryWriter,
                     train_model=None, bug=None) -> tuple[list, torch.Tensor]:
    """AdamW + one-cycle LR: warm up to --lr, then anneal to ~0, stepping once per batch. Returns the
    history (one record per epoch) and the gradient norm of every step (steps,)."""
    train_model = train_model or model
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = grad_scaler(device, dtype)
    steps_per_epoch = math.ceil(len(data["train_y"]) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr,
                                                    total_steps=config.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(config.seed)
    history, grad_norms, started = [], [], time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        epoch_started, first_step, epoch_lrs, epoch_norms = time.perf_counter(), (epoch - 1) * steps_per_epoch, [], []
        losses = train_one_epoch(train_model, optimizer, data["train_x"], data["train_y"],
                                 batch_size=config.batch_size, generator=generator, device=device,
                                 dtype=dtype, scaler=scaler,
                                 label_smoothing=config.label_smoothing, scheduler=scheduler,
                                 first_step=first_step, lr_history=epoch_lrs, grad_norms=epoch_norms,
                                 progress=f"epoch {epoch}/{config.epochs}", show_progress=not config.smoke, bug=bug)
        epoch_norms = torch.stack(epoch_norms).cpu()                # read once per epoch, with the losses
        grad_norms.append(epoch_norms)
        # We look at the test set after every epoch only to show progress; lab 03 holds out a
        # validation split so that no decision is ever made on the test set.
        accuracy = (predict(model, data["test_x"], device, dtype) == data["test_y"].cpu()).float().mean().item()
        seconds = time.perf_counter() - epoch_started
        elapsed = time.perf_counter() - started
        history.append({"epoch": epoch, "train_loss": losses.mean().item(), "test_accuracy": accuracy,
                        "seconds": seconds})
        print(f"  epoch {epoch:2d}/{config.epochs}  train loss {losses.mean():.4f}  "
              f"test accuracy {accuracy:.2%}  {len(data['train_y']) / seconds:,.0f} images/s  "
              f"~{elapsed / epoch * (config.epochs - epoch):.0f} s left")
        log_epoch(writer, model, losses, epoch_lrs, accuracy, first_step)
        for offset, norm in enumerate(epoch_norms.tolist(), start=1):
            writer.add_scalar("grad_norm", norm, first_step + offset)
    return history, torch.cat(grad_norms)


# %%
# Looking at the mistakes: the confusion matrix counts (true digit, predicted digit) pairs,
# so the off-diagonal cells show which digits get mixed up; the grid shows the images.
def plot_confusion_matrix(true_labels, predicted, path: Path) -> torch.Tensor:
    import seaborn as sns
    confusion = torch.bincount(true_labels * 10 + predicted, minlength=100).reshape(10, 10)  # rows: true
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    sns.heatmap(confusion.numpy(), annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax,
                annot_kws={"fontsize": 8})
    ax.set(xlabel="predicted digit", ylabel="true digit",
           title=f"Confusion matrix, {len(true_labels):,d} test images")
    save_figure(fig, path)
    return confusion


def plot_misclassified(images, true_labels, predicted, path: Path, count: int = 32) -> int:
    wrong = (true_labels != predicted).nonzero().squeeze(1)
    plt = pyplot()
    columns = 8
    rows = max(1, math.ceil(min(count, len(wrong)) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.2, rows * 1.45), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, wrong[:count].tolist()):
        ax.imshow(images[index], cmap="gray_r")
        ax.set_title(f"{true_labels[index].item()} as {predicted[index].item()}", fontsize=9, color="firebrick")
    fig.suptitle(f"{len(wrong)} of {len(true_labels):,d} test digits misclassified "
                 "(title: true digit as predicted)")
    save_figure(fig, path)
    return len(wrong)


# %%
# Saving: the weights (state_dict), the config that rebuilds the architecture, and a few
# inputs with the predictions they gave, so a reloaded model can be checked. Written to a
# temporary file first, then renamed: a crash mid-write never leaves a broken checkpoint.
# The file holds CPU tensors, so it loads on a machine without a GPU.
def save_checkpoint(model, config: Config, sample_inputs: torch.Tensor, path: Path) -> None:
    model.eval()
    model_device = next(model.parameters()).device
    with torch.no_grad():
        sample_outputs = model(sample_inputs.to(model_device))   # inputs go where the weights are
    saved_config = asdict(config) | {"hidden_sizes": list(config.hidden_sizes)}
    torch_save_atomically({"model": model.state_dict(), "config": saved_config,
                           "sample_inputs": sample_inputs.cpu(), "sample_outputs": sample_outputs.cpu()}, path)


def reload_and_check(path: Path) -> bool:
    saved = torch.load(path, map_location="cpu", weights_only=True)  # weights only: no code runs
    model = build_model(saved["config"])
    model.load_state_dict(saved["model"])
    model.eval()
    with torch.no_grad():
        return torch.allclose(model(saved["sample_inputs"]), saved["sample_outputs"], atol=1e-5)


# %%
# The command line, and the run that ties the sections together.
def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to train; auto = the accelerator if there is one, else cpu")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed for the weights, dropout and batch order")
    parser.add_argument("--data-dir", default="./data", help="MNIST is read from (or downloaded to) DATA_DIR/MNIST/raw")
    parser.add_argument("--out-dir", default=f"runs/{LAB_NAME}",
                        help="where metrics.json, the figures and the checkpoint go")
    parser.add_argument("--smoke", action="store_true",
                        help="quick pass over every code path on generated digits (no network); numbers are not results")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help=f"passes over the training set, > 0 (default {defaults.epochs}; smoke 2)")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                        help="images per optimizer step, > 0")
    parser.add_argument("--lr", type=positive_float, default=defaults.lr,
                        help="peak learning rate of the one-cycle schedule, > 0")
    parser.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                        help="mixed precision on CUDA: auto = bf16 where the GPU has it natively, else fp16 "
                             "with a GradScaler; fp32 = off. CPU and MPS train in fp32")
    parser.add_argument("--compile", action="store_true",
                        help="train through torch.compile (pays off on a GPU; a C++ compiler is needed on CPU)")
    parser.add_argument("--bug", default=None, choices=["no-zero-grad"],
                        help="debugging drill: plant a bug and watch its symptom (no-zero-grad: gradients are "
                             "never cleared; see the '# Drill:' comment in train_one_epoch)")
    return parser


def run(args) -> None:
    """Everything a learner can get wrong (device, precision, folders) is checked first, before any
    download or file; the lesson then runs with TF32 matmuls on CUDA (see tf32_matmuls)."""
    started = time.perf_counter()
    device = pick_device(args.device)
    dtype = pick_precision(args.precision, device)
    data_dir, out_dir = folder(args.data_dir, "--data-dir"), folder(args.out_dir, "--out-dir")
    with tf32_matmuls(device):
        run_lesson(args, device, dtype, data_dir, out_dir, started)


def run_lesson(args, device: torch.device, dtype, data_dir: Path, out_dir: Path, started: float) -> None:
    config = Config(epochs=args.epochs or (2 if args.smoke else Config.epochs), batch_size=args.batch_size,
                    lr=args.lr, seed=args.seed, smoke=args.smoke,
                    compare_steps=16 if args.smoke else Config.compare_steps)
    raw = make_smoke_digits(seed=args.seed) if args.smoke else load_mnist(data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16 with a GradScaler"}[dtype]
    print(f"Lab {LAB_NAME}: torch {torch.__version__}, device {device}, {precision}, "
          f"{torch.get_num_threads()} CPU threads"
          f"{' (smoke run: generated digits, numbers are not results)' if args.smoke else ''}")
    data = {"train_x": normalize(raw["train_images"], device), "train_y": raw["train_labels"].to(device),
            "test_x": normalize(raw["test_images"], device), "test_y": raw["test_labels"].to(device)}
    print(f"  data: {len(data['train_y']):,d} training and {len(data['test_y']):,d} test images, "
          f"held as one tensor {tuple(data['train_x'].shape)} on {device}")

    print("\n== nn.Module: the MLP ==")
    torch.manual_seed(config.seed)
    model = MLP(config.hidden_sizes, config.dropout).to(device)
    describe_model(model)

    print("\n== One layer by hand: Linear + ReLU, forward and backward ==")
    layer_difference = check_layer_against_autograd(config.seed)
    print(f"  largest |hand - autograd| over y, dL/dx, dL/dW, dL/db (float64): {layer_difference:.1e}"
          f" -> {'the same up to rounding' if layer_difference < 1e-10 else 'they DISAGREE'}")

    print("\n== Losses ==")
    loss_checks = check_losses_against_pytorch(config.seed, config.label_smoothing)
    print(f"  F.cross_entropy vs log_softmax + nll_loss: |difference| = "
          f"{loss_checks['cross_entropy_vs_logsoftmax_nll']:.1e} (one is the other, fused)")
    print(f"  label-smoothed cross-entropy by hand vs F.cross_entropy(label_smoothing={config.label_smoothing}): "
          f"|difference| = {loss_checks['label_smoothing_hand_vs_pytorch']:.1e}")

    writer = SummaryWriter(out_dir / "tensorboard")
    try:
        print(f"\n== Optimizers: SGD with momentum vs Adam, {config.compare_steps} steps each ==")
        comparison_started = time.perf_counter()
        comparison = compare_optimizers(config, data, device, dtype, out_dir / "optimizer_comparison.png", writer,
                                        bug=args.bug)
        comparison_seconds = time.perf_counter() - comparison_started

        print(f"\n== Training the MNIST classifier: AdamW, one-cycle LR (peak {config.lr:g}), "
              f"{config.epochs} epochs of {config.batch_size}-image batches ==")
        train_model = torch.compile(model) if args.compile else model
        train_started = time.perf_counter()
        history, grad_norms = train_classifier(model, config, data, device, dtype, writer, train_model, bug=args.bug)
        train_seconds = time.perf_counter() - train_started
        drill = gradient_norm_growth(grad_norms)
        print(f"  gradient norm: {drill['grad_norm_first_steps']:.3g} over the first {drill['grad_norm_window']} steps, "
              f"{drill['grad_norm_last_steps']:.3g} over the last {drill['grad_norm_window']} "
              f"(x{drill['grad_norm_growth']:.2f}"
              f"{'; --bug no-zero-grad: each step adds its gradient to all the earlier ones' if args.bug else ''})")

        predicted = predict(model, data["test_x"], device, dtype)
        true_labels = data["test_y"].cpu()
        test_accuracy = (predicted == true_labels).float().mean().item()
        confusion = plot_confusion_matrix(true_labels, predicted, out_dir / "confusion_matrix.png")
        errors = plot_misclassified(raw["test_images"], true_labels, predicted, out_dir / "misclassified.png")
        wrong = (true_labels != predicted).nonzero().squeeze(1)[:32]
        if len(wrong):                                  # pixels 0..1, as MNIST stores them
            writer.add_images("misclassified_test_digits", raw["test_images"][wrong].unsqueeze(1).float() / 255,
                              config.epochs * math.ceil(len(data["train_y"]) / config.batch_size))
    finally:
        writer.close()
    off_diagonal = confusion.clone().fill_diagonal_(0)
    true_digit, predicted_digit = divmod(off_diagonal.argmax().item(), 10)
    print(f"  most common mistake: {true_digit} read as {predicted_digit} "
          f"({off_diagonal.max().item()} times); see confusion_matrix.png and misclassified.png")

    checkpoint = out_dir / "mlp_mnist.pt"
    save_checkpoint(model, config, data["test_x"][:8], checkpoint)
    if not reload_and_check(checkpoint):
        raise LabError(f"{checkpoint} did not reproduce its predictions after reloading")

    metrics = {
        "lab": LAB_NAME, "smoke": args.smoke, "device": str(device), "torch_version": torch.__version__,
        "wall_time_s": 0.0, "train_time_s": train_seconds, "epochs": config.epochs, "precision": precision,
        "test_accuracy": test_accuracy, "test_errors": errors,
        "config": asdict(config) | {"hidden_sizes": list(config.hidden_sizes)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "layer_hand_vs_autograd_max_abs_diff": layer_difference,
        **loss_checks,
        "optimizer_comparison": comparison, "optimizer_comparison_time_s": comparison_seconds,
        "bug": args.bug, **drill,
        "history": history,
    }
    metrics["wall_time_s"] = time.perf_counter() - started
    write_json_atomically(metrics, out_dir / "metrics.json")

    print("\nSummary")
    print(f"  trained an MLP {config.hidden_sizes} ({metrics['parameters']:,d} weights) for {config.epochs} epochs "
          f"in {train_seconds:.0f} s: test accuracy {test_accuracy:.2%} ({errors} of {len(true_labels):,d} wrong)")
    print(f"  outputs in {out_dir}/: metrics.json, optimizer_comparison.png, confusion_matrix.png, "
          f"misclassified.png, mlp_mnist.pt, tensorboard/ ({metrics['wall_time_s']:.0f} s in all)")
    print("  next: try --lr 1e-2 (too high?) or --epochs 3, or find the planted bug of --bug no-zero-grad; "
          "lab 03 adds validation and checkpoints to resume from")


# %%
# Predict, then run. Write your prediction down before each command; the lab prints the answer.
# 1. Run: python week1_pytorch/02_neural_network.py --lr 2e-2
#    Predict: ten times the peak learning rate: does test accuracy rise, fall or stay, and by how much?
#    Answer: the "epoch ... test accuracy" lines and the Summary; test_accuracy in metrics.json.
# 2. Run: python week1_pytorch/02_neural_network.py --batch-size 32 --epochs 2
#    Predict: a quarter of the batch: how many times as many steps per epoch, and how do images/s change?
#    Answer: the "images/s" figure on each epoch line; train_time_s in metrics.json.
# 3. Run: python week1_pytorch/02_neural_network.py --epochs 1
#    Predict: how far below the 8-epoch run's accuracy does one epoch land, and which digit pair is the
#    most common mistake?
#    Answer: the Summary's test accuracy and the "most common mistake" line; test_errors in metrics.json.
# 4. Run: python week1_pytorch/02_neural_network.py --bug no-zero-grad --epochs 2
#    Predict: what happens to the gradient norm between the first and the last steps, and to accuracy?
#    Answer: the "gradient norm" line; grad_norm_growth and test_accuracy in metrics.json.


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

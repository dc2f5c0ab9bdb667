"""Lab 03 - The training loop you will reuse: data pipeline, validation, checkpoints, TensorBoard (days 5-7).

What you learn
  Data         a custom `Dataset` and a `DataLoader` (shuffling with a seeded generator, workers,
               `pin_memory`, and a collate function that turns a list of samples into one batch,
               with random-shift augmentation done on the whole batch at once).
  Validation   a seeded train/validation split: every choice (best epoch, when to stop) is made
               on validation data, and the test set is used once, at the end.
  Control      early stopping on the validation loss; a one-cycle learning-rate schedule, with
               the learning rate of every step plotted.
  Checkpoints  last.pt and best.pt, each holding the model, optimizer, scheduler, epoch,
               early-stopping state and every RNG state, so `--resume PATH` carries on exactly
               where a run stopped: a run stopped after k epochs and resumed ends with bitwise the
               same weights on CPU as one that never stopped (tests/test_03_training_loop.py).
  TensorBoard  loss/accuracy/learning-rate scalars, weight histograms, sample images, the model graph.

Run it
  Terminal:  python week1_pytorch/03_training_loop.py           (downloads MNIST, ~11 MB, into ./data)
             python week1_pytorch/03_training_loop.py --smoke   (generated digits, no network)
             python week1_pytorch/03_training_loop.py --stop-after 3        (pretend it crashed...)
             python week1_pytorch/03_training_loop.py --resume runs/03_training_loop/last.pt
             tensorboard --logdir runs/03_training_loop/tensorboard
  Colab:     upload this file and run `!python 03_training_loop.py`, or paste it into a cell;
             `%load_ext tensorboard` then `%tensorboard --logdir runs` shows the logs inline.
  Outputs in --out-dir (default runs/03_training_loop): metrics.json, training_curves.png,
  lr_schedule.png, last.pt, best.pt, tensorboard/.

Measured (torch 2.14.1)
  2-core CPU, default run (`python week1_pytorch/03_training_loop.py --data-dir /tmp/labdata`):
    test accuracy 99.08% (target 98.5%) with the weights of the best validation epoch (15 of 15,
    validation accuracy 98.92%; early stopping did not fire) in 93 s wall in all, 87 s of it
    training, at 8,300-11,300 training images/s with num_workers=0.
  GPU: not measured yet.
  Smoke run (`--smoke`): 5.6-6.1 s wall; with --compile, 24 s (most of it compiling).
"""
import argparse
import json
import math
import os
import random
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, random_split
from torch.utils.tensorboard import SummaryWriter
from torchvision.datasets import MNIST
from tqdm import tqdm

LAB_NAME = "03_training_loop"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # pixel mean and std of the 60,000 training images
DOWNLOAD_TIMEOUT_S = 20  # a network that silently drops packets should fail in seconds, not minutes
TRAINING_CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "epoch", "early_stopping", "rng",
                            "config", "history", "sample_inputs", "sample_outputs"}


class LabError(Exception):
    """Something the learner can fix (a flag, missing data, a bad checkpoint); main() prints it."""


@dataclass
class Config:
    """Every setting that defines a run, with its unit. A checkpoint stores it; --resume reuses it."""
    hidden_sizes: tuple = (512, 512)  # widths of the MLP's hidden layers
    dropout: float = 0.2              # probability of zeroing a hidden unit while training
    epochs: int = 15                  # most passes over the training split (early stopping may end sooner)
    batch_size: int = 128             # images per optimizer step
    lr: float = 2e-3                  # peak learning rate of the one-cycle schedule
    weight_decay: float = 1e-4        # AdamW's decoupled pull of the weights towards zero
    label_smoothing: float = 0.1      # share of each training target spread over all 10 classes
    max_shift: int = 2                # training images move by up to this many pixels each way
    val_size: int = 5000              # images held out of the 60,000 for validation
    patience: int = 3                 # epochs without a better validation loss before stopping
    seed: int = 0
    smoke: bool = False


# %%
# Setup: the device, mixed precision, figures. Same helpers as lab 02 (each lab stands alone).
def pick_device(name: str) -> torch.device:
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


def autocast_for(device: torch.device):
    """bf16 mixed precision on CUDA GPUs that support it; plain float32 elsewhere."""
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def in_notebook() -> bool:
    return "ipykernel" in sys.modules


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
# Raw data: MNIST through torchvision (download + md5 check on first use), or generated digits
# for --smoke. Both give uint8 images (N, 28, 28) and int64 labels (N,).
def load_mnist(data_dir: Path) -> dict:
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
            f"(nor {', '.join(MNIST.mirrors[1:])}): {reason}\n"
            f"  Connect to the network and rerun, or put the files there yourself: "
            f"{data_dir / 'MNIST' / 'raw'}/ holding {files} (or their .gz archives).\n"
            f"  To try the lab without data, run it with --smoke (generated digits).") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return {"train_images": train.data, "train_labels": train.targets,
            "test_images": test.data, "test_labels": test.targets}


def make_smoke_digits(train_count: int = 1280, test_count: int = 256, seed: int = 0) -> dict:
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


# %%
# The Dataset answers two questions: how many samples (__len__) and what is sample i
# (__getitem__). Here the images already sit in memory as uint8; for data on disk,
# __getitem__ would open file i instead, and nothing else in this lab would change.
class MNISTDataset(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels    # (N, 28, 28) uint8, (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]  # (28, 28) uint8, () int64


def random_shift(images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Move every image (B, H, W) by its own random offset of up to max_shift pixels each way,
    filling the uncovered border with black: one batched gather, no loop over images."""
    batch, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4)                         # (B, H + 2s, W + 2s)
    corners = torch.randint(0, 2 * max_shift + 1, (batch, 2))        # top-left of each crop
    rows = (corners[:, 0:1] + torch.arange(height))[:, :, None]      # (B, H, 1)
    cols = (corners[:, 1:2] + torch.arange(width))[:, None, :]       # (B, 1, W)
    return padded[torch.arange(batch)[:, None, None], rows, cols]    # (B, H, W)


class Collate:
    """The DataLoader hands this a list of (image, label) samples; it returns one batch:
    stack -> scale to [0, 1] -> shift (training only) -> normalise. Working on the stacked batch
    makes augmentation a few tensor operations instead of one Python call per image. It is a
    class rather than a closure so that worker processes can receive it (they pickle it)."""

    def __init__(self, max_shift: int = 0):
        self.max_shift = max_shift

    def __call__(self, samples):
        images = torch.stack([image for image, _label in samples]).float() / 255   # (B, 28, 28)
        labels = torch.stack([label for _image, label in samples])                  # (B,)
        if self.max_shift:
            images = random_shift(images, self.max_shift)
        return ((images - MNIST_MEAN) / MNIST_STD).unsqueeze(1), labels             # (B, 1, 28, 28)


# %%
# Splits and loaders. random_split with its own seeded generator gives the same 55,000/5,000
# split in every run (and in a resumed one). The training loader shuffles with a generator
# whose state goes into every checkpoint: resuming replays the same batch order. Each time an
# epoch's iterator starts, the DataLoader also draws from that generator the base seed of its
# worker processes, and seeds worker i's torch and `random` with base_seed + i: so random
# augmentation inside workers is reproduced on resume too, with no worker_init_fn needed.
# num_workers: worker processes prepare batches in parallel with training. On the 2-core CPU
# this lab was measured on they do not pay: a training epoch took 4.7 s with num_workers=0 and
# 6.0-6.5 s with 2 workers, which fight the training's two threads for the same two cores. On a
# GPU machine with spare cores, workers overlap data preparation with the GPU's work.
# pin_memory puts batches in page-locked memory, which CUDA can copy from asynchronously.
def make_loaders(raw: dict, config: Config, device: torch.device, num_workers: int,
                 shuffle_generator: torch.Generator) -> dict:
    full_train = MNISTDataset(raw["train_images"], raw["train_labels"])
    train_split, val_split = random_split(full_train, [len(full_train) - config.val_size, config.val_size],
                                          generator=torch.Generator().manual_seed(config.seed))
    common = {"num_workers": num_workers, "pin_memory": device.type == "cuda"}
    return {
        "train": DataLoader(train_split, batch_size=config.batch_size, shuffle=True, generator=shuffle_generator,
                            collate_fn=Collate(config.max_shift), **common),
        "val": DataLoader(val_split, batch_size=1000, collate_fn=Collate(), **common),
        "test": DataLoader(MNISTDataset(raw["test_images"], raw["test_labels"]), batch_size=1000,
                           collate_fn=Collate(), **common),
    }


# %%
# The model: lab 02's MLP, a little wider. The pipeline, not the model, is this lab's lesson.
class MLP(nn.Module):
    """784 pixels -> [Linear -> ReLU -> Dropout] per hidden size -> 10 class scores (logits)."""

    def __init__(self, hidden_sizes=(512, 512), dropout: float = 0.2,
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
        return self.head(self.hidden(x))       # (B, 10) logits


def build_model(config: dict) -> MLP:
    """The architecture a checkpoint's config describes (the tests rebuild saved models with it)."""
    return MLP(hidden_sizes=tuple(config["hidden_sizes"]), dropout=config["dropout"])


# %%
# Early stopping: remember the best validation loss; after `patience` epochs without beating
# it, stop. Its state (best so far, epochs waited) must survive a resume like everything else.
class EarlyStopping:
    def __init__(self, patience: int):
        self.patience, self.best_loss, self.bad_epochs = patience, math.inf, 0

    def step(self, val_loss: float) -> bool:
        """Record one epoch's validation loss; True when it is the best so far."""
        if val_loss < self.best_loss:
            self.best_loss, self.bad_epochs = val_loss, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"patience": self.patience, "best_loss": self.best_loss, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.patience, self.best_loss, self.bad_epochs = state["patience"], state["best_loss"], state["bad_epochs"]


# %%
# Checkpoints. Everything that decides what happens next goes in: weights, optimizer moments,
# the scheduler's position, the epoch, early stopping, and the random number generators (torch's,
# CUDA's, Python's and the loader's shuffling generator). No NumPy state: nothing here uses it,
# and torch.load(weights_only=True), which refuses to run code from a file, would refuse it.
# Written to a temporary file and renamed, so a crash mid-save never leaves a broken last.pt.
def rng_state(shuffle_generator: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "loader": shuffle_generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_state(state: dict, shuffle_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    shuffle_generator.set_state(state["loader"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, *, model, optimizer, scheduler, epoch, early_stopping, shuffle_generator,
                    config: Config, history: list, sample_inputs: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        sample_outputs = model(sample_inputs)
    checkpoint = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": epoch, "early_stopping": early_stopping.state_dict(), "rng": rng_state(shuffle_generator),
        "config": asdict(config) | {"hidden_sizes": list(config.hidden_sizes)}, "history": history,
        "sample_inputs": sample_inputs.cpu(), "sample_outputs": sample_outputs.float().cpu(),
    }
    temporary = path.with_suffix(".tmp")
    torch.save(checkpoint, temporary)
    os.replace(temporary, path)


def load_training_checkpoint(path: Path) -> dict:
    """Read a last.pt/best.pt of this lab, or explain why it cannot be resumed from."""
    if not path.is_file():
        raise LabError(f"--resume {path}: no such file. This lab writes OUT_DIR/last.pt and OUT_DIR/best.pt "
                       f"(by default runs/{LAB_NAME}/); pass one of those.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # weights only: no code runs
    except Exception as err:  # truncated zip, not a torch file at all, or an object weights_only refuses
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LabError(f"--resume {path}: cannot be read as a checkpoint ({detail}). The file is probably "
                       "truncated (a copy cut short) or not a checkpoint of this lab; resume from the other "
                       "one of last.pt/best.pt, or start afresh without --resume.") from None
    missing = TRAINING_CHECKPOINT_KEYS - set(checkpoint) if isinstance(checkpoint, dict) else TRAINING_CHECKPOINT_KEYS
    if missing:
        raise LabError(f"--resume {path}: this is not a training checkpoint of {LAB_NAME} "
                       f"(it lacks {', '.join(sorted(missing))}).")
    return checkpoint


# %%
# One epoch of training and one pass of evaluation. Losses stay on the device as tensors
# (no .item() per step, which would make the CPU wait for a GPU) and are checked for NaN/inf
# once per epoch, before anything is saved, naming the step where training diverged.
def raise_if_not_finite(step_losses: torch.Tensor, first_step: int) -> None:
    bad = (~torch.isfinite(step_losses)).nonzero()
    if len(bad):
        index = bad[0].item()
        raise LabError(f"the loss became {step_losses[index].item()} at step {first_step + index}: "
                       "training diverged. Lower --lr (or --batch-size) and rerun; nothing from this epoch was saved.")


def train_one_epoch(model, loader, optimizer, scheduler, device, *, label_smoothing: float, epoch: int,
                    epochs: int, first_step: int, lr_history: list) -> tuple[float, float]:
    model.train()                                              # dropout on
    step_losses, correct = [], torch.zeros((), device=device)
    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", leave=False, disable=None, unit="batch")
    for images, labels in bar:
        images = images.to(device, non_blocking=True)          # non_blocking: overlaps with pinned memory
        labels = labels.to(device, non_blocking=True)
        with autocast_for(device):
            logits = model(images)                             # (B, 10)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_history.append(scheduler.get_last_lr()[0])          # the LR this step used
        scheduler.step()                                       # one-cycle moves the LR every step
        step_losses.append(loss.detach())
        correct += (logits.argmax(dim=1) == labels).sum()
        if len(step_losses) % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    step_losses = torch.stack(step_losses).cpu()
    raise_if_not_finite(step_losses, first_step)
    return step_losses.mean().item(), correct.item() / len(loader.dataset)


@torch.no_grad()
def evaluate(model, loader, device, label_smoothing: float) -> tuple[float, float]:
    """Mean loss and accuracy over the loader. The loss is the one training minimises (label-smoothed):
    plain cross-entropy would reward the over-confidence that label smoothing deliberately removes,
    and was measured to jump around from epoch to epoch while accuracy climbed."""
    model.eval()                                               # dropout off
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast_for(device):
            logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum", label_smoothing=label_smoothing)
        correct += (logits.argmax(dim=1) == labels).sum()
    return loss_sum.item() / len(loader.dataset), correct.item() / len(loader.dataset)


# %%
# TensorBoard: scalars each epoch (and the LR each step), a histogram of every weight tensor
# each epoch (watch them spread out as training goes), a batch of augmented training images
# and the model graph. Everything is logged against the number of optimizer steps taken.
# `purge_step` hides whatever an earlier run logged from that step on: a resumed run's curves
# join without overlap, and a fresh run into the same folder replaces the old curves.
def start_tensorboard(log_dir: Path, steps_done: int, model, sample_batch: torch.Tensor) -> SummaryWriter:
    writer = SummaryWriter(log_dir=str(log_dir), purge_step=steps_done + 1)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # add_graph traces with torch.jit, now deprecated
        writer.add_graph(model, sample_batch)
    images = sample_batch * MNIST_STD + MNIST_MEAN               # undo the normalisation for display
    writer.add_images("samples/augmented_training_batch", images.clamp(0, 1), steps_done + 1)
    return writer


def log_epoch(writer: SummaryWriter, model, record: dict, lr_steps: list, steps_before: int) -> None:
    for offset, lr in enumerate(lr_steps, start=1):
        writer.add_scalar("lr", lr, steps_before + offset)
    steps_done = steps_before + len(lr_steps)
    for split in ("train", "val"):
        writer.add_scalar(f"loss/{split}", record[f"{split}_loss"], steps_done)
        writer.add_scalar(f"accuracy/{split}", record[f"{split}_accuracy"], steps_done)
    for name, parameter in model.named_parameters():
        writer.add_histogram(f"weights/{name}", parameter.detach().float().cpu(), steps_done)
    writer.flush()


# %%
# Figures: the learning curves, and the learning rate of every step (the one-cycle shape:
# a warm-up to the peak, then a long cosine descent to almost zero).
def plot_training_curves(history: list, path: Path) -> None:
    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (loss_ax, accuracy_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loss_ax.plot(epochs, [r["train_loss"] for r in history], "o-", label="train (augmented, dropout on)")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="label-smoothed cross-entropy", title="Loss")
    accuracy_ax.plot(epochs, [100 * r["train_accuracy"] for r in history], "o-", label="train (augmented, dropout on)")
    accuracy_ax.plot(epochs, [100 * r["val_accuracy"] for r in history], "o-", label="validation")
    accuracy_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (loss_ax, accuracy_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_lr_schedule(lr_steps: list, steps_per_epoch: int, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(len(lr_steps)), lr_steps)
    for boundary in range(steps_per_epoch, len(lr_steps), steps_per_epoch):
        ax.axvline(boundary, color="grey", alpha=0.2)
    ax.set(xlabel=f"optimizer step (grey lines: epochs of {steps_per_epoch} steps)", ylabel="learning rate",
           title="One-cycle schedule: warm up, then anneal")
    save_figure(fig, path)


def write_json_atomically(data: dict, path: Path) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2))
    os.replace(temporary, path)


# %%
# The command line. Hyper-parameters out of range are refused before anything runs.
def positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
        return value
    return parse


def whole_number(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be 0 or a positive whole number, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to train; auto = the accelerator if there is one, else cpu")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed for the split, the weights, dropout, augmentation and batch order")
    parser.add_argument("--data-dir", default="./data", help="MNIST is read from (or downloaded to) DATA_DIR/MNIST/raw")
    parser.add_argument("--out-dir", default=None,
                        help=f"where metrics.json, figures, last.pt/best.pt and tensorboard/ go "
                             f"(default runs/{LAB_NAME}; with --resume, the checkpoint's folder)")
    parser.add_argument("--smoke", action="store_true",
                        help="quick pass over every code path on generated digits (no network); numbers are not results")
    parser.add_argument("--epochs", type=positive(int), default=None,
                        help=f"most epochs to train, > 0 (default {defaults.epochs}; smoke 3)")
    parser.add_argument("--batch-size", type=positive(int), default=defaults.batch_size,
                        help="images per optimizer step, > 0")
    parser.add_argument("--lr", type=positive(float), default=defaults.lr,
                        help="peak learning rate of the one-cycle schedule, > 0")
    parser.add_argument("--num-workers", type=whole_number, default=0, metavar="N",
                        help="DataLoader worker processes (default 0: measured fastest on a 2-core CPU)")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="continue the run saved in this last.pt/best.pt, with that run's settings")
    parser.add_argument("--stop-after", type=positive(int), default=None, metavar="EPOCH",
                        help="stop once this epoch is done, as if interrupted (then try --resume OUT_DIR/last.pt)")
    parser.add_argument("--compile", action="store_true",
                        help="train through torch.compile (pays off on a GPU; a C++ compiler is needed on CPU)")
    return parser


# %%
# The run: everything that can fail on bad input (device, checkpoint, data) is checked before
# the first file is written, so a failing run never overwrites what an earlier one saved.
def run(args) -> None:
    started = time.perf_counter()
    device = pick_device(args.device)
    resumed = load_training_checkpoint(Path(args.resume)) if args.resume else None
    if resumed:
        try:
            config = Config(**(resumed["config"] | {"hidden_sizes": tuple(resumed["config"]["hidden_sizes"])}))
        except (TypeError, KeyError) as err:
            raise LabError(f"--resume {args.resume}: its config does not describe this lab's run ({err}).") from None
    else:
        config = Config(epochs=args.epochs or (3 if args.smoke else Config.epochs), batch_size=args.batch_size,
                        lr=args.lr, seed=args.seed, smoke=args.smoke,
                        val_size=256 if args.smoke else Config.val_size)

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = build_model(asdict(config)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    raw = make_smoke_digits(seed=config.seed) if config.smoke else load_mnist(Path(args.data_dir))
    shuffle_generator = torch.Generator().manual_seed(config.seed)
    loaders = make_loaders(raw, config, device, args.num_workers, shuffle_generator)
    steps_per_epoch = len(loaders["train"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr,
                                                    total_steps=config.epochs * steps_per_epoch)
    early_stopping = EarlyStopping(config.patience)
    history, lr_steps, start_epoch = [], [], 0
    if resumed:
        try:
            model.load_state_dict(resumed["model"])
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise LabError(f"--resume {args.resume}: its saved states do not fit this lab's model and "
                           f"optimizer ({str(err).splitlines()[0]}).") from None
        early_stopping.load_state_dict(resumed["early_stopping"])
        history, start_epoch = resumed["history"], resumed["epoch"]
        lr_steps = [lr for record in history for lr in record["lr_steps"]]

    out_dir = Path(args.out_dir or (Path(args.resume).parent if resumed else f"runs/{LAB_NAME}"))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"Lab {LAB_NAME}: torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads, "
          f"{args.num_workers} loader workers{' (smoke run: generated digits, numbers are not results)' if config.smoke else ''}")
    print(f"  split: {len(loaders['train'].dataset):,d} training / {len(loaders['val'].dataset):,d} validation "
          f"images (seed {config.seed}), {len(loaders['test'].dataset):,d} test images kept for the very end")
    if resumed:
        print(f"  resuming {args.resume} after epoch {start_epoch} (its settings: {config.epochs} epochs, "
              f"batch {config.batch_size}, peak lr {config.lr:g}, seed {config.seed})")

    sample_inputs = Collate()([loaders["test"].dataset[i] for i in range(8)])[0]  # (8, 1, 28, 28)
    augmented = Collate(config.max_shift)([loaders["train"].dataset[i] for i in range(32)])[0]
    writer = start_tensorboard(out_dir / "tensorboard", start_epoch * steps_per_epoch, model, augmented.to(device))
    train_model = torch.compile(model) if args.compile else model
    if resumed:
        restore_rng_state(resumed["rng"], shuffle_generator)           # last, so nothing above disturbs it
        if start_epoch >= config.epochs or early_stopping.should_stop:
            print("  that run had already finished: nothing left to train, so it is only evaluated again")

    print(f"\n== Training an MLP {config.hidden_sizes}: AdamW, one-cycle LR (peak {config.lr:g}), "
          f"up to {config.epochs} epochs, early stopping after {config.patience} without progress ==")
    train_started = time.perf_counter()
    for epoch in range(start_epoch + 1, config.epochs + 1):
        if early_stopping.should_stop:
            break
        epoch_started, first_step = time.perf_counter(), (epoch - 1) * steps_per_epoch
        epoch_lrs = []
        train_loss, train_accuracy = train_one_epoch(
            train_model, loaders["train"], optimizer, scheduler, device, label_smoothing=config.label_smoothing,
            epoch=epoch, epochs=config.epochs, first_step=first_step, lr_history=epoch_lrs)
        val_loss, val_accuracy = evaluate(model, loaders["val"], device, config.label_smoothing)
        improved = early_stopping.step(val_loss)
        record = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy,
                  "val_loss": val_loss, "val_accuracy": val_accuracy, "lr_steps": epoch_lrs,
                  "seconds": time.perf_counter() - epoch_started}
        history.append(record)
        lr_steps += epoch_lrs
        log_epoch(writer, model, record, epoch_lrs, first_step)
        state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "epoch": epoch,
                 "early_stopping": early_stopping, "shuffle_generator": shuffle_generator, "config": config,
                 "history": history, "sample_inputs": sample_inputs.to(device)}
        save_checkpoint(out_dir / "last.pt", **state)
        if improved:
            save_checkpoint(out_dir / "best.pt", **state)
        this_run = history[start_epoch:]
        seconds_left = sum(r["seconds"] for r in this_run) / len(this_run) * (config.epochs - epoch)
        print(f"  epoch {epoch:2d}/{config.epochs}  train loss {train_loss:.4f} acc {train_accuracy:.2%}  "
              f"val loss {val_loss:.4f} acc {val_accuracy:.2%}  lr {epoch_lrs[-1]:.1e}  "
              f"{len(loaders['train'].dataset) / record['seconds']:,.0f} img/s  ~{seconds_left:.0f} s left"
              f"{'  (best so far: saved best.pt)' if improved else ''}")
        if early_stopping.should_stop:
            print(f"  early stopping: no better validation loss for {config.patience} epochs")
        elif args.stop_after == epoch and epoch < config.epochs:
            print(f"  stopping after epoch {epoch} as asked (--stop-after): continue with "
                  f"--resume {out_dir / 'last.pt'}")
            break
    train_seconds = time.perf_counter() - train_started
    writer.close()
    if early_stopping.should_stop:
        stopped_by = "early stopping"
    elif len(history) < config.epochs:
        stopped_by = "--stop-after"
    else:
        stopped_by = "finished all epochs"

    # The test set, used once: with the weights of the best validation epoch (best.pt). If a run
    # was resumed into a new --out-dir that never saw a better epoch, the final weights stand in.
    best_path = out_dir / "best.pt"
    if best_path.is_file():
        best = torch.load(best_path, map_location="cpu", weights_only=True)
        model.load_state_dict(best["model"])              # copies the weights onto the model's device
        best_epoch = best["epoch"]
    else:
        best_epoch = history[-1]["epoch"]
    test_loss, test_accuracy = evaluate(model, loaders["test"], device, config.label_smoothing)
    plot_training_curves(history, out_dir / "training_curves.png")
    plot_lr_schedule(lr_steps, steps_per_epoch, out_dir / "lr_schedule.png")

    best_record = history[best_epoch - 1]
    metrics = {
        "lab": LAB_NAME, "smoke": config.smoke, "device": str(device), "torch_version": torch.__version__,
        "wall_time_s": 0.0, "train_time_s": train_seconds, "epochs": len(history),
        "test_accuracy": test_accuracy, "test_loss": test_loss,
        "best_epoch": best_epoch, "best_val_loss": best_record["val_loss"],
        "best_val_accuracy": best_record["val_accuracy"],
        "stopped_by": stopped_by, "resumed_from": args.resume,
        "num_workers": args.num_workers, "config": asdict(config) | {"hidden_sizes": list(config.hidden_sizes)},
        "history": [{k: v for k, v in r.items() if k != "lr_steps"} for r in history],
    }
    metrics["wall_time_s"] = time.perf_counter() - started
    write_json_atomically(metrics, out_dir / "metrics.json")

    print("\nSummary")
    print(f"  best epoch {best_epoch} (validation loss {best_record['val_loss']:.4f}, accuracy "
          f"{best_record['val_accuracy']:.2%}); its weights on the test set, used only now: "
          f"test accuracy {test_accuracy:.2%}")
    trained = len(history) - start_epoch
    print(f"  trained {trained} epoch{'' if trained == 1 else 's'} in {train_seconds:.0f} s this run "
          f"({metrics['wall_time_s']:.0f} s in all); stopped by: {metrics['stopped_by']}")
    print(f"  outputs in {out_dir}/: metrics.json, training_curves.png, lr_schedule.png, last.pt, best.pt")
    print(f"  look inside: tensorboard --logdir {out_dir / 'tensorboard'}")
    print(f"  try: --stop-after 3, then --resume {out_dir / 'last.pt'}; or --num-workers 2 to time the loader")


def main(argv=None) -> None:
    args, _unknown = build_parser().parse_known_args(argv)  # Colab adds -f kernel.json
    try:
        run(args)
    except LabError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()

"""Lab 03 - The training loop you will reuse: data pipeline, validation, checkpoints, TensorBoard,
and the same loop on several GPUs (days 5-7).

What you learn
  Data         a custom `Dataset` and a `DataLoader` that fetches whole batches: a `BatchSampler`
               hands the Dataset a list of indices and it answers with one gather (no Python call
               per image, no collate function); workers, `pin_memory` and `non_blocking` copies;
               random-shift augmentation done on the whole batch, on the device.
  Validation   a seeded train/validation split: every choice (best epoch, when to stop) is made
               on validation data, and the test set is used once, at the end.
  Control      early stopping on the validation loss; a one-cycle learning-rate schedule, with
               the learning rate of every step plotted.
  Checkpoints  last.pt and best.pt, each holding the model, optimizer, scheduler, GradScaler, epoch,
               early-stopping state and every RNG state, so `--resume PATH` carries on exactly
               where a run stopped: a run stopped after epoch 1 or 2 and resumed ends with bitwise
               the same checkpoint on CPU (weights, optimizer, scheduler, RNG) as one that never
               stopped (tests/test_03_training_loop.py).
  TensorBoard  loss/accuracy/learning-rate scalars, weight histograms, sample images, the model graph.
  Scale-out    the same file under `torchrun` trains on several GPUs with DistributedDataParallel.

Run it
  Terminal:  python week1_pytorch/03_training_loop.py           (downloads MNIST, ~11 MB, into ./data)
             python week1_pytorch/03_training_loop.py --smoke   (generated digits, no network)
             python week1_pytorch/03_training_loop.py --stop-after 3        (pretend it crashed...)
             python week1_pytorch/03_training_loop.py --resume runs/03_training_loop/last.pt
             tensorboard --logdir runs/03_training_loop/tensorboard
  Colab:     upload this file and run `!python 03_training_loop.py`, or paste it into a cell;
             `%load_ext tensorboard` then `%tensorboard --logdir runs` shows the logs inline.
  Notebook:  `jupytext --to notebook 03_training_loop.py`; the last cell runs main() with the
             defaults, or call e.g. main(["--smoke"]).
  GPU:       --precision auto (the default) trains in bf16 where the GPU has it natively (Ampere
             and newer) and in fp16 with a GradScaler elsewhere (a T4); --precision fp32 turns it
             off. On CUDA the loader uses min(4, CPU cores) worker processes and pinned memory.
  Bad input (missing data offline, --device cuda without a GPU, a flag out of range, --data-dir
  or --out-dir naming a file, a checkpoint that is truncated or from another lab) ends with one
  line saying what to change, never a traceback.
  Outputs in --out-dir (default runs/03_training_loop): metrics.json, training_curves.png,
  lr_schedule.png, last.pt, best.pt, tensorboard/.

Several GPUs: torchrun
  When: the GPU you have is busy all the time (watch nvidia-smi) and an epoch still takes too long,
  and the machine has more GPUs. For this MLP on MNIST one GPU is plenty: the lesson is the
  pattern, which pays off for big models and big data.
  How:  torchrun --nproc_per_node=N week1_pytorch/03_training_loop.py [the usual flags]
  torchrun starts N copies of this script. Each joins a process group (NCCL between GPUs; gloo on
  a machine without CUDA, one process per CPU share), drives one GPU (cuda:LOCAL_RANK), sees
  every N-th batch of the same shuffle (DistributedSampler), and DistributedDataParallel averages
  the gradients of all N during backward, so the N copies of the model stay identical.
  --batch-size is per process: N processes at batch B take the steps one process takes at batch
  N*B (tests/test_03_training_loop.py checks 2 processes at B against 1 at 2B, within 1e-5, with
  --dropout 0 --max-shift 0 --precision fp32, which switch off the randomness that differs).
  Only rank 0 prints, writes checkpoints, figures, TensorBoard and metrics.json; --resume works
  under torchrun with the same N. Plain `python week1_pytorch/03_training_loop.py` is one process.

Measured (torch 2.14.1)
  2-core CPU, default run (`python week1_pytorch/03_training_loop.py`):
    test accuracy 99.03% (target 98.5%) with the weights of the best validation epoch (15 of 15,
    validation accuracy 98.88%; early stopping did not fire). Its time is not measured yet: that
    run had one thread (OMP_NUM_THREADS=1) on a machine other jobs kept busy, 8 min 45 s wall.
    The earlier version of this file (another shuffle, one image at a time through a collate
    function) reached 99.08% in 93 s wall on the idle 2-core CPU, at 8,300-11,300 images/s.
  GPU: not measured yet.
  Smoke run (`--smoke`): not measured on an idle machine for this version (the earlier one:
  5.6-6.1 s wall; with --compile, 24 s).
"""
import argparse
import contextlib
import io
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
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Subset, random_split
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

LAB_NAME = "03_training_loop"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # pixel mean and std of the 60,000 training images
DOWNLOAD_TIMEOUT_S = 20  # a network that silently drops packets should fail in seconds, not minutes
TRAINING_CHECKPOINT_KEYS = {"lab", "model", "optimizer", "scheduler", "scaler", "epoch", "early_stopping",
                            "rng", "config", "history", "sample_inputs", "sample_outputs"}


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
    """Every setting that defines a run, with its unit. A checkpoint stores it; --resume reuses it."""
    hidden_sizes: tuple = (512, 512)  # widths of the MLP's hidden layers
    dropout: float = 0.2              # probability of zeroing a hidden unit while training
    epochs: int = 15                  # most passes over the training split (early stopping may end sooner)
    batch_size: int = 128             # images per optimizer step in each process (see "Several GPUs")
    lr: float = 2e-3                  # peak learning rate of the one-cycle schedule
    weight_decay: float = 1e-4        # AdamW's decoupled pull of the weights towards zero
    label_smoothing: float = 0.1      # share of each training target spread over all 10 classes
    max_shift: int = 2                # training images move by up to this many pixels each way
    val_size: int = 5000              # images held out of the 60,000 for validation
    patience: int = 3                 # epochs without a better validation loss before stopping
    world_size: int = 1               # processes training together (torchrun --nproc_per_node)
    seed: int = 0
    smoke: bool = False


# %%
# Setup: TF32 matmuls and figures (the device and folders are in the plumbing cell above).
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
# Raw data: MNIST through torchvision (download + md5 check on first use), or generated digits
# for --smoke. Both give uint8 images (N, 28, 28) and int64 labels (N,).
def load_mnist(data_dir: Path) -> dict:
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
# (__getitem__). Here the images already sit in memory as uint8, so "sample i" can just as well
# be "samples [i, j, k, ...]": indexing with a list gathers a whole batch in one operation. For
# data on disk, __getitem__ would open file i instead, and nothing else in this lab would change.
class MNISTDataset(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels    # (N, 28, 28) uint8, (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        """index: one int -> (28, 28) image and () label; a list of B ints -> (B, 28, 28) and (B,)."""
        return self.images[index], self.labels[index]


def random_shift(images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Move every image (B, H, W) by its own random offset of up to max_shift pixels each way,
    filling the uncovered border with black: one batched gather on the images' device, no loop."""
    # Exercise random_shift: images (B, H, W) -> (B, H, W), each image moved by its own random
    # offset in [-max_shift, max_shift] along each axis, the uncovered border 0 (black). One way:
    # zero-pad every side by max_shift, draw one top-left corner per image (torch.randint, on the
    # images' device), and cut every H x W window at once with advanced indexing: index tensors for
    # batch (B, 1, 1), rows (B, H, 1) and columns (B, 1, W) broadcast to (B, H, W). No Python loop.
    # Docs: https://pytorch.org/docs/stable/generated/torch.nn.functional.pad.html
    batch, height, width = images.shape
    device = images.device
    padded = F.pad(images, (max_shift,) * 4)                                    # (B, H + 2s, W + 2s)
    corners = torch.randint(0, 2 * max_shift + 1, (batch, 2), device=device)   # top-left of each crop
    rows = (corners[:, 0:1] + torch.arange(height, device=device))[:, :, None]  # (B, H, 1)
    cols = (corners[:, 1:2] + torch.arange(width, device=device))[:, None, :]   # (B, 1, W)
    return padded[torch.arange(batch, device=device)[:, None, None], rows, cols]  # (B, H, W)


def to_model_input(images: torch.Tensor, max_shift: int = 0) -> torch.Tensor:
    """uint8 (B, 28, 28) -> scaled to [0, 1] -> shifted (training only) -> normalised (B, 1, 28, 28).
    Runs where the images are: on a GPU the loader copies 1-byte pixels (4x less than float32)
    and the augmentation runs there, batched, instead of in the loader's processes."""
    images = images.float() / 255
    if max_shift:
        images = random_shift(images, max_shift)
    return ((images - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


# %%
# Splits, samplers and loaders. random_split with its own seeded generator gives the same
# 55,000/5,000 split in every run (and in a resumed one). The training order comes from a
# DistributedSampler: a fresh seeded shuffle each epoch (seed + epoch, so a resumed run replays
# it), of which process `rank` of `world_size` takes every world_size-th index. In a plain run
# world_size is 1 and it is simply a seeded shuffle; under torchrun (below) the processes split
# each epoch between them. A BatchSampler groups those indices into batches, and batch_size=None
# tells the DataLoader to hand each list to the Dataset whole: one gather per batch, no collate.
# num_workers: worker processes prepare batches in parallel with training. On a CPU they would
# compete with training for the same cores (the default is 0 there); on a GPU machine they overlap
# data preparation with the GPU's work (default min(4, CPU cores), kept alive between epochs).
# pin_memory puts batches in page-locked memory, which CUDA can copy from asynchronously.
def shard(dataset, rank: int, world_size: int):
    """Every world_size-th item from `rank` on: evaluation split between processes, nothing repeated."""
    return Subset(dataset, range(rank, len(dataset), world_size)) if world_size > 1 else dataset


def make_loaders(raw: dict, config: Config, device: torch.device, num_workers: int,
                 rank: int = 0, world_size: int = 1) -> dict:
    full_train = MNISTDataset(raw["train_images"], raw["train_labels"])
    train_split, val_split = random_split(full_train, [len(full_train) - config.val_size, config.val_size],
                                          generator=torch.Generator().manual_seed(config.seed))
    train_order = DistributedSampler(train_split, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=config.seed)

    def loader(dataset, order, batch_size: int) -> DataLoader:
        # The loader draws a seed for its workers from `generator` when an epoch starts; a private
        # one leaves the global RNG (dropout, augmentation) untouched, so a resumed run replays it.
        return DataLoader(dataset, sampler=BatchSampler(order, batch_size, drop_last=False), batch_size=None,
                          num_workers=num_workers, persistent_workers=num_workers > 0,
                          pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(config.seed))

    val_shard = shard(val_split, rank, world_size)
    test_shard = shard(MNISTDataset(raw["test_images"], raw["test_labels"]), rank, world_size)
    return {
        "train": loader(train_split, train_order, config.batch_size), "train_order": train_order,
        "val": loader(val_shard, range(len(val_shard)), 1000),
        "test": loader(test_shard, range(len(test_shard)), 1000),
        "sizes": {"train": len(train_split), "val": len(val_split), "test": len(raw["test_labels"])},
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
        # Exercise early_stopping_step: a loss strictly below self.best_loss is new best: keep it,
        # reset self.bad_epochs to 0, return True. Anything else (equal counts as no progress) adds
        # one to self.bad_epochs and returns False; should_stop reads bad_epochs against patience.
        # Docs: https://pytorch.org/docs/stable/generated/torch.optim.lr_scheduler.ReduceLROnPlateau.html
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
# the scheduler's position, the GradScaler's scale, the epoch, early stopping, and the random
# number generators of every process (torch's CPU and GPU ones, Python's). The batch order needs
# no state: it is a function of seed and epoch. No NumPy state: nothing here uses it, and
# torch.load(weights_only=True), which refuses to run code from a file, would refuse it.
# Written to a temporary file and renamed, so a crash mid-save never leaves a broken last.pt.
def rng_state(device: torch.device) -> dict:
    """This process's random generators (the GPU's: only the one this process uses)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8)}


def restore_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and len(state["cuda"]):
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, *, model, optimizer, scheduler, scaler, epoch, early_stopping, rng: list,
                    config: Config, history: list, sample_inputs: torch.Tensor) -> None:
    """rng: one rng_state() per process, in rank order. The file holds CPU tensors (it loads anywhere)."""
    model.eval()
    with torch.no_grad():
        sample_outputs = model(sample_inputs.to(next(model.parameters()).device))
    checkpoint = {
        "lab": LAB_NAME, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
        "early_stopping": early_stopping.state_dict(), "rng": rng,
        "config": asdict(config) | {"hidden_sizes": list(config.hidden_sizes)}, "history": history,
        "sample_inputs": sample_inputs.cpu(), "sample_outputs": sample_outputs.float().cpu(),
    }
    torch_save_atomically(checkpoint, path)


def load_training_checkpoint(path: Path) -> dict:
    """Read a last.pt/best.pt of this lab, or explain why it cannot be resumed from."""
    if not path.is_file():
        raise LabError(f"--resume {path}: no such file. This lab writes OUT_DIR/last.pt and OUT_DIR/best.pt "
                       f"(by default runs/{LAB_NAME}/); pass one of those.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # weights only: no code runs
    except Exception as err:  # truncated zip, not a torch file at all, or an object weights_only refuses
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        raise LabError(f"--resume {path}: cannot be read as a checkpoint ({detail}). The file is probably "
                       "truncated (a copy cut short) or damaged; resume from the other one of "
                       "last.pt/best.pt, or start afresh without --resume.") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("lab") != LAB_NAME:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get("lab"), str):
            written_by = f"lab {checkpoint['lab']}"
        else:
            parts = ", ".join(sorted(map(str, checkpoint))) if isinstance(checkpoint, dict) else ""
            written_by = f"another lab or program, or an older version of this one (it holds {parts or 'no named parts'})"
        raise LabError(f"--resume {path}: this file loads, but it is not a training checkpoint of {LAB_NAME}: "
                       f"it was written by {written_by}. Pass the last.pt or best.pt of a run of this lab.")
    missing = TRAINING_CHECKPOINT_KEYS - set(checkpoint)
    if missing:
        raise LabError(f"--resume {path}: this {LAB_NAME} checkpoint lacks {', '.join(sorted(missing))} "
                       "(edited or damaged); resume from the other one of last.pt/best.pt.")
    return checkpoint


# %%
# Scale-out: the same script as N processes under torchrun (see "Several GPUs" at the top).
# torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for each process it starts. Without torchrun the
# lab is a world of one process, and every function in this cell does nothing special.
def start_processes(device: torch.device) -> tuple[torch.device, int, int]:
    """Under torchrun: join the process group and take this process's GPU. Returns (device, rank, world size)."""
    if not (dist.is_available() and dist.is_torchelastic_launched()):
        return device, 0, 1
    local_rank = int(os.environ["LOCAL_RANK"])                  # this process's number on this machine
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise LabError(f"torchrun started process {local_rank} on this machine, but it has only "
                           f"{torch.cuda.device_count()} GPU(s): use --nproc_per_node={torch.cuda.device_count()} or fewer.")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise LabError(f"--device {device.type} under torchrun: this lab runs several processes on CUDA GPUs "
                       "(NCCL) or on the CPU (gloo); use --device cuda or --device cpu.")
    # NCCL moves tensors between GPUs directly; gloo is the CPU backend.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return device, dist.get_rank(), dist.get_world_size()


def across_processes(tensor: torch.Tensor, minimum: bool = False) -> torch.Tensor:
    """The sum (or minimum) of a tensor over all processes, which all get it back: one message, so
    the loop calls this once per epoch. In a plain run the tensor comes back as it is."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN if minimum else dist.ReduceOp.SUM)
    return tensor


def rng_states_of_all_processes(device: torch.device) -> list:
    """Every process's rng_state(), in rank order, for rank 0's checkpoint (all processes call this)."""
    if not dist.is_initialized():
        return [rng_state(device)]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state(device))
    return states


def load_data(config: Config, data_dir: Path, rank: int) -> dict:
    """Generated digits for --smoke; else MNIST, downloaded by rank 0 alone while the others wait
    (N processes writing the same files at once would trip over each other)."""
    if config.smoke:
        return make_smoke_digits(seed=config.seed)
    if not dist.is_initialized():
        return load_mnist(data_dir)
    raw, problem = None, [None]
    if rank == 0:
        try:
            raw = load_mnist(data_dir)
        except LabError as err:
            problem = [str(err)]
    dist.broadcast_object_list(problem, src=0)                  # every process learns whether it worked
    if problem[0]:
        raise LabError(problem[0])
    return raw if rank == 0 else load_mnist(data_dir)


# %%
# One epoch of training and one pass of evaluation. Nothing in the loop waits for the GPU: the
# loss and correct counts are summed on the device, and the NaN guard keeps the first step whose
# loss was not finite there too; all are read once per epoch, after the processes combined them,
# so every process takes the same decision. (A NaN stays in the weights, so nothing is missed.)
NO_BAD_STEP = 2**62                                             # "every loss so far was finite"


def note_non_finite(loss: torch.Tensor, step: int, first_bad: torch.Tensor) -> torch.Tensor:
    """first_bad, lowered to `step` if this loss is NaN or infinite; on the device, nothing waits."""
    return torch.where(torch.isfinite(loss), first_bad, first_bad.clamp(max=step))


def raise_if_diverged(first_bad: torch.Tensor) -> None:
    step = first_bad.item()
    if step != NO_BAD_STEP:
        raise LabError(f"the loss became NaN or infinite at step {step}: training diverged. Lower --lr "
                       "(or --batch-size) and rerun; nothing from this epoch was saved.")


def train_one_epoch(model, loader, optimizer, scheduler, scaler, device, dtype, *, label_smoothing: float,
                    max_shift: int, epoch: int, epochs: int, first_step: int, lr_history: list,
                    show_progress: bool = True) -> tuple[float, float]:
    # Exercise train_one_epoch: one pass over `loader`, one optimizer step per batch; return (mean
    # loss per image, accuracy) over the epoch as Python floats. model.train() first (dropout on).
    # Per batch, numbered from first_step + 1: to the device, to_model_input(images, max_shift), the
    # logits under autocast(device, dtype), F.cross_entropy on logits.float() with label_smoothing;
    # clear the old gradients, backward and step through the GradScaler (scale, step, update), append
    # the LR this step used to lr_history, then step the scheduler (it moves the LR every batch).
    # No per-step .item(): sum loss, correct and images in a device tensor, track the first
    # non-finite loss with note_non_finite, and after the loop call raise_if_diverged and read the
    # sums, each through across_processes (a no-op without torchrun). A tqdm bar is optional.
    # Docs: https://pytorch.org/docs/stable/optim.html#taking-an-optimization-step
    model.train()                                              # dropout on
    totals = torch.zeros(3, device=device)                     # loss sum, correct, images
    first_bad = torch.full((), NO_BAD_STEP, device=device)
    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", leave=False, disable=None if show_progress else True,
               unit="batch")
    for step, (images, labels) in enumerate(bar, start=first_step + 1):
        images = images.to(device, non_blocking=True)          # non_blocking: overlaps with pinned memory
        labels = labels.to(device, non_blocking=True)
        images = to_model_input(images, max_shift)             # (B, 1, 28, 28), shifted on the device
        with autocast(device, dtype):
            logits = model(images)                             # (B, 10)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()                          # under torchrun, DDP averages gradients here
        scaler.step(optimizer)                                 # skips the step if fp16 gradients overflowed
        scaler.update()
        lr_history.append(scheduler.get_last_lr()[0])          # the LR this step used
        scheduler.step()                                       # one-cycle moves the LR every step
        first_bad = note_non_finite(loss, step, first_bad)
        totals[0] += loss.detach() * len(labels)
        totals[1] += (logits.argmax(dim=1) == labels).sum()
        totals[2] += len(labels)
    raise_if_diverged(across_processes(first_bad, minimum=True))
    loss_sum, correct, images_seen = across_processes(totals).tolist()
    return loss_sum / images_seen, correct / images_seen


@torch.no_grad()
def evaluate(model, loader, device, dtype, label_smoothing: float, bug=None) -> tuple[float, float]:
    """Mean loss and accuracy over the loader (under torchrun: over every process's share). The loss
    is the one training minimises (label-smoothed): plain cross-entropy would reward the
    over-confidence that label smoothing deliberately removes, and was measured to jump around from
    epoch to epoch while accuracy climbed. bug is --bug (the debugging drill)."""
    if bug != "no-eval-mode":
        # Drill: --bug no-eval-mode skips this line, so the model stays in training mode and dropout
        # keeps zeroing units while it is evaluated. Symptom: two evaluations of the same weights
        # disagree (the "evaluated twice" line; val_loss_repeat_difference in metrics.json, exactly 0
        # in a clean run). Find it with a breakpoint() here: model.training should be False.
        model.eval()                                           # dropout off
    totals = torch.zeros(3, device=device)                     # loss sum, correct, images
    for images, labels in loader:
        images = to_model_input(images.to(device, non_blocking=True))
        labels = labels.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(images).float()
        totals[0] += F.cross_entropy(logits, labels, reduction="sum", label_smoothing=label_smoothing)
        totals[1] += (logits.argmax(dim=1) == labels).sum()
        totals[2] += len(labels)
    loss_sum, correct, images_seen = across_processes(totals).tolist()
    return loss_sum / images_seen, correct / images_seen


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


# %%
# The command line. A flag out of range is refused by its type= function (positive_int and the
# others of the plumbing cell) before anything runs, as one line.
def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to train; auto = the accelerator if there is one, else cpu "
                             "(under torchrun: each process takes GPU number LOCAL_RANK)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed for the split, the weights, dropout, augmentation and batch order")
    parser.add_argument("--data-dir", default="./data", help="MNIST is read from (or downloaded to) DATA_DIR/MNIST/raw")
    parser.add_argument("--out-dir", default=None,
                        help=f"where metrics.json, figures, last.pt/best.pt and tensorboard/ go "
                             f"(default runs/{LAB_NAME}; with --resume, the checkpoint's folder)")
    parser.add_argument("--smoke", action="store_true",
                        help="quick pass over every code path on generated digits (no network); numbers are not results")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help=f"most epochs to train, > 0 (default {defaults.epochs}; smoke 3)")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                        help="images per optimizer step in each process, > 0 (under torchrun with N processes, "
                             "a step sees N times as many)")
    parser.add_argument("--lr", type=positive_float, default=defaults.lr,
                        help="peak learning rate of the one-cycle schedule, > 0")
    parser.add_argument("--dropout", type=probability, default=defaults.dropout,
                        help="probability of zeroing a hidden unit while training, 0 <= p < 1 (0: no dropout)")
    parser.add_argument("--max-shift", type=whole_number, default=defaults.max_shift, metavar="PIXELS",
                        help="augmentation: training images move by up to this many pixels each way (0: none)")
    parser.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                        help="mixed precision on CUDA: auto = bf16 where the GPU has it natively, else fp16 "
                             "with a GradScaler; fp32 = off. CPU and MPS train in fp32")
    parser.add_argument("--num-workers", type=whole_number, default=None, metavar="N",
                        help="DataLoader worker processes (default: min(4, CPU cores) on CUDA; 0 on a CPU, "
                             "where workers would compete with training for the cores)")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="continue the run saved in this last.pt/best.pt, with that run's settings "
                             "(under torchrun: with as many processes as that run had)")
    parser.add_argument("--stop-after", type=positive_int, default=None, metavar="EPOCH",
                        help="stop once this epoch is done, as if interrupted (then try --resume OUT_DIR/last.pt)")
    parser.add_argument("--compile", action="store_true",
                        help="train through torch.compile (pays off on a GPU; a C++ compiler is needed on CPU)")
    parser.add_argument("--bug", default=None, choices=["no-eval-mode"],
                        help="debugging drill: plant a bug and watch its symptom (no-eval-mode: dropout stays "
                             "on while evaluating; see the '# Drill:' comment in evaluate)")
    return parser


# %%
# The run: everything that can fail on bad input (device, precision, folders, checkpoint, data)
# is checked before the first file is written, so a failing run never overwrites what an earlier
# one saved. Under torchrun every process runs this same code; only rank 0 prints and writes.
def run(args) -> None:
    started = time.perf_counter()
    device = pick_device(args.device)
    dtype = pick_precision(args.precision, device)
    data_dir = folder(args.data_dir, "--data-dir")
    out_dir = folder(args.out_dir or (Path(args.resume).parent if args.resume else f"runs/{LAB_NAME}"), "--out-dir")
    device, rank, world_size = start_processes(device)
    only_rank_0_prints = contextlib.redirect_stdout(io.StringIO()) if rank else contextlib.nullcontext()
    try:
        with tf32_matmuls(device), only_rank_0_prints:
            train_and_report(args, started, device, dtype, data_dir, out_dir, rank, world_size)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train_and_report(args, started: float, device: torch.device, dtype, data_dir: Path, out_dir: Path,
                     rank: int, world_size: int) -> None:
    resumed = load_training_checkpoint(Path(args.resume)) if args.resume else None
    if resumed:
        try:
            config = Config(**(resumed["config"] | {"hidden_sizes": tuple(resumed["config"]["hidden_sizes"])}))
        except (TypeError, KeyError) as err:
            raise LabError(f"--resume {args.resume}: its config does not describe this lab's run ({err}).") from None
        if config.world_size != world_size:
            how = "plain python" if config.world_size == 1 else f"torchrun --nproc_per_node={config.world_size}"
            raise LabError(f"--resume {args.resume}: that run trained as {config.world_size} process(es), this one "
                           f"is {world_size}; the batch order and the schedule depend on it: resume with {how}.")
    else:
        config = Config(epochs=args.epochs or (3 if args.smoke else Config.epochs), batch_size=args.batch_size,
                        lr=args.lr, dropout=args.dropout, max_shift=args.max_shift, seed=args.seed,
                        smoke=args.smoke, val_size=256 if args.smoke else Config.val_size, world_size=world_size)

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = build_model(asdict(config)).to(device)                 # the same start in every process
    if rank:
        torch.manual_seed(config.seed + rank)                      # but each its own dropout masks and shifts
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    raw = load_data(config, data_dir, rank)
    num_workers = args.num_workers
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1) if device.type == "cuda" else 0
    loaders = make_loaders(raw, config, device, num_workers, rank, world_size)
    steps_per_epoch = len(loaders["train"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr,
                                                    total_steps=config.epochs * steps_per_epoch)
    scaler = grad_scaler(device, dtype)
    early_stopping = EarlyStopping(config.patience)
    history, lr_steps, start_epoch = [], [], 0
    if resumed:
        try:
            model.load_state_dict(resumed["model"])
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
            if resumed["scaler"] and scaler.is_enabled():          # empty when that run used no fp16
                scaler.load_state_dict(resumed["scaler"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise LabError(f"--resume {args.resume}: its saved states do not fit this lab's model and "
                           f"optimizer ({str(err).splitlines()[0]}).") from None
        early_stopping.load_state_dict(resumed["early_stopping"])
        history, start_epoch = resumed["history"], resumed["epoch"]
        lr_steps = [lr for record in history for lr in record["lr_steps"]]
    # Under torchrun, DDP wraps the model: it starts every process from rank 0's weights and averages
    # the gradients in backward. Evaluation and checkpoints use the plain model underneath.
    train_model = model
    if dist.is_initialized():
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16 with a GradScaler"}[dtype]
    print(f"Lab {LAB_NAME}: torch {torch.__version__}, device {device}, {precision}, "
          f"{torch.get_num_threads()} CPU threads, {num_workers} loader workers"
          f"{f', {world_size} processes (torchrun)' if world_size > 1 else ''}"
          f"{' (smoke run: generated digits, numbers are not results)' if config.smoke else ''}")
    sizes = loaders["sizes"]
    print(f"  split: {sizes['train']:,d} training / {sizes['val']:,d} validation images (seed {config.seed}), "
          f"{sizes['test']:,d} test images kept for the very end")
    if resumed:
        print(f"  resuming {args.resume} after epoch {start_epoch} (its settings: {config.epochs} epochs, "
              f"batch {config.batch_size}, peak lr {config.lr:g}, seed {config.seed})")

    sample_inputs = to_model_input(raw["test_images"][:8])         # (8, 1, 28, 28), for the checkpoints
    writer = None
    if rank == 0:
        first_images = loaders["train"].dataset[list(range(32))][0].to(device)
        writer = start_tensorboard(out_dir / "tensorboard", start_epoch * steps_per_epoch, model,
                                   to_model_input(first_images, config.max_shift))
    try:  # the TensorBoard files are closed however training ends
        if resumed:
            restore_rng_state(resumed["rng"][rank], device)             # last, so nothing above disturbs it
            if start_epoch >= config.epochs or early_stopping.should_stop:
                print("  that run had already finished: nothing left to train, so it is only evaluated again")

        print(f"\n== Training an MLP {config.hidden_sizes}: AdamW, one-cycle LR (peak {config.lr:g}), "
              f"up to {config.epochs} epochs, early stopping after {config.patience} without progress ==")
        train_started = time.perf_counter()
        for epoch in range(start_epoch + 1, config.epochs + 1):
            if early_stopping.should_stop:
                break
            epoch_started, first_step = time.perf_counter(), (epoch - 1) * steps_per_epoch
            loaders["train_order"].set_epoch(epoch)                    # this epoch's shuffle
            epoch_lrs = []
            train_loss, train_accuracy = train_one_epoch(
                train_model, loaders["train"], optimizer, scheduler, scaler, device, dtype,
                label_smoothing=config.label_smoothing, max_shift=config.max_shift, epoch=epoch, epochs=config.epochs,
                first_step=first_step, lr_history=epoch_lrs, show_progress=rank == 0)
            val_loss, val_accuracy = evaluate(model, loaders["val"], device, dtype, config.label_smoothing,
                                              bug=args.bug)
            improved = early_stopping.step(val_loss)
            record = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy,
                      "val_loss": val_loss, "val_accuracy": val_accuracy, "lr_steps": epoch_lrs,
                      "seconds": time.perf_counter() - epoch_started}
            history.append(record)
            lr_steps += epoch_lrs
            rng = rng_states_of_all_processes(device)                  # every process takes part
            if rank == 0:
                log_epoch(writer, model, record, epoch_lrs, first_step)
                state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler,
                         "epoch": epoch, "early_stopping": early_stopping, "rng": rng, "config": config,
                         "history": history, "sample_inputs": sample_inputs}
                save_checkpoint(out_dir / "last.pt", **state)
                if improved:
                    save_checkpoint(out_dir / "best.pt", **state)
            this_run = history[start_epoch:]
            seconds_left = sum(r["seconds"] for r in this_run) / len(this_run) * (config.epochs - epoch)
            print(f"  epoch {epoch:2d}/{config.epochs}  train loss {train_loss:.4f} acc {train_accuracy:.2%}  "
                  f"val loss {val_loss:.4f} acc {val_accuracy:.2%}  lr {epoch_lrs[-1]:.1e}  "
                  f"{sizes['train'] / record['seconds']:,.0f} img/s  ~{seconds_left:.0f} s left"
                  f"{'  (best so far: saved best.pt)' if improved else ''}")
            if early_stopping.should_stop:
                print(f"  early stopping: no better validation loss for {config.patience} epochs")
            elif args.stop_after == epoch and epoch < config.epochs:
                print(f"  stopping after epoch {epoch} as asked (--stop-after): continue with "
                      f"--resume {out_dir / 'last.pt'}")
                break
        train_seconds = time.perf_counter() - train_started
    finally:
        if writer:
            writer.close()
    if early_stopping.should_stop:
        stopped_by = "early stopping"
    elif len(history) < config.epochs:
        stopped_by = "--stop-after"
    else:
        stopped_by = "finished all epochs"

    # The test set, used once: with the weights of the best validation epoch (best.pt). If a run
    # was resumed into a new --out-dir that never saw a better epoch, the final weights stand in.
    if dist.is_initialized():
        dist.barrier()                                             # rank 0 has finished writing best.pt
    best_path = out_dir / "best.pt"
    if best_path.is_file():
        best = torch.load(best_path, map_location="cpu", weights_only=True)
        model.load_state_dict(best["model"])              # copies the weights onto the model's device
        best_epoch = best["epoch"]
    else:
        best_epoch = history[-1]["epoch"]
    test_loss, test_accuracy = evaluate(model, loaders["test"], device, dtype, config.label_smoothing, bug=args.bug)
    # The drill's symptom: the same weights on the same validation images, twice, in the state each
    # epoch's validation finds the model in (training mode, as train_one_epoch leaves it).
    model.train()
    val_losses = [evaluate(model, loaders["val"], device, dtype, config.label_smoothing, bug=args.bug)[0]
                  for _ in range(2)]
    repeat_difference = abs(val_losses[1] - val_losses[0])
    if rank != 0:
        return
    plot_training_curves(history, out_dir / "training_curves.png")
    plot_lr_schedule(lr_steps, steps_per_epoch, out_dir / "lr_schedule.png")

    best_record = history[best_epoch - 1]
    metrics = {
        "lab": LAB_NAME, "smoke": config.smoke, "device": str(device), "torch_version": torch.__version__,
        "wall_time_s": 0.0, "train_time_s": train_seconds, "epochs": len(history),
        "test_accuracy": test_accuracy, "test_loss": test_loss,
        "best_epoch": best_epoch, "best_val_loss": best_record["val_loss"],
        "best_val_accuracy": best_record["val_accuracy"],
        "stopped_by": stopped_by, "resumed_from": args.resume, "precision": precision,
        "bug": args.bug, "val_loss_repeat_difference": repeat_difference,
        "world_size": world_size, "num_workers": num_workers,
        "config": asdict(config) | {"hidden_sizes": list(config.hidden_sizes)},
        "history": [{k: v for k, v in r.items() if k != "lr_steps"} for r in history],
    }
    metrics["wall_time_s"] = time.perf_counter() - started
    write_json_atomically(metrics, out_dir / "metrics.json")

    print("\nSummary")
    print(f"  best epoch {best_epoch} (validation loss {best_record['val_loss']:.4f}, accuracy "
          f"{best_record['val_accuracy']:.2%}); its weights on the test set, used only now: "
          f"test accuracy {test_accuracy:.2%}")
    print(f"  the same weights evaluated twice on the validation set: loss {val_losses[0]:.6f} then "
          f"{val_losses[1]:.6f} (difference {repeat_difference:.1e}"
          f"{'; --bug no-eval-mode: dropout stays on while evaluating' if args.bug else ''})")
    trained = len(history) - start_epoch
    print(f"  trained {trained} epoch{'' if trained == 1 else 's'} in {train_seconds:.0f} s this run "
          f"({metrics['wall_time_s']:.0f} s in all); stopped by: {metrics['stopped_by']}")
    print(f"  outputs in {out_dir}/: metrics.json, training_curves.png, lr_schedule.png, last.pt, best.pt")
    print(f"  look inside: tensorboard --logdir {out_dir / 'tensorboard'}")
    print(f"  try: --stop-after 3, then --resume {out_dir / 'last.pt'}; or --num-workers 2 to time the loader; "
          "or torchrun --nproc_per_node=2 with this file")


# %%
# Predict, then run. Write your prediction down before each command; the lab prints the answer.
# 1. Run: python week1_pytorch/03_training_loop.py --dropout 0
#    Predict: will the gap between training and validation loss grow or shrink, and by how much?
#    Answer: the per-epoch lines "train loss ... val loss ..."; best_val_loss in metrics.json.
# 2. Run: python week1_pytorch/03_training_loop.py --max-shift 0
#    Predict: without shifted images, does training accuracy end higher or lower, and test accuracy?
#    Answer: the per-epoch lines "train loss ... acc"; test_accuracy in metrics.json.
# 3. Run: python week1_pytorch/03_training_loop.py --lr 2e-2
#    Predict: ten times the peak learning rate: does early stopping fire, and in which epoch is the best
#    validation loss?
#    Answer: the Summary's "best epoch" and "stopped by"; best_epoch and stopped_by in metrics.json.
# 4. Run: python week1_pytorch/03_training_loop.py --bug no-eval-mode --epochs 2   (then add --dropout 0)
#    Predict: how far apart are two evaluations of the same weights, with dropout 0.2 and with none?
#    Answer: the "evaluated twice" line; val_loss_repeat_difference in metrics.json.
# 5. Run: python week1_pytorch/03_training_loop.py --stop-after 3   (then --resume runs/03_training_loop/last.pt)
#    Predict: does the resumed run end with the same test accuracy as one that never stopped?
#    Answer: the Summary's test accuracy; test_accuracy in metrics.json of both runs.


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

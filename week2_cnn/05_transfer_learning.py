"""Lab 05 - Transfer learning: reuse an ImageNet network for your own images (curriculum days 11-14).

What this lab teaches
  1. Loading `torchvision.models.resnet50` with its ImageNet weights (`--arch`, `--weights DEFAULT|none`)
     and the preprocessing those weights were trained with (`weights.transforms()`), then replacing
     the 1000-class head with a new one for your classes.
  2. A dataset of your own in `ImageFolder` layout, `train/<class>/*` and `val/<class>/*`; by default
     the ants-vs-bees set of PyTorch's transfer-learning tutorial, downloaded on first use. Broken
     images are found before training and skipped with a warning that names them.
  3. Three strategies from the same starting weights, compared in one table and one plot:
       feature extraction   the backbone is frozen, only the new head learns;
       full fine-tuning     everything learns, earlier stages with smaller learning rates
                            (discriminative learning rates: early layers hold generic edges and
                            textures worth keeping, late layers the ImageNet-specific parts);
       gradual unfreezing   the head first, then layer4, layer3, ... on a schedule you set
                            (`--unfreeze-schedule "2:layer4,3:layer3,4:layer2"`).
     A frozen stage also keeps its batch-norm statistics (its BN layers stay in eval mode); with
     --weights none those statistics are first measured on the data, as pretraining would have.
     The best model of each strategy is saved.
  4. Feeding a GPU: DataLoader worker processes (--workers, default min(4, CPU cores), kept alive
     between epochs) decode and resize the images while the model trains; on CUDA the batches
     come in pinned memory and are copied with non_blocking=True, and the loss and accuracy are
     summed on the GPU and read once per epoch, so no step waits for the GPU.

Run it
  terminal:  python week2_cnn/05_transfer_learning.py                         # ants vs bees, resnet50
             python week2_cnn/05_transfer_learning.py --data-dir my_photos    # my_photos/train/<class>/...
             python week2_cnn/05_transfer_learning.py --smoke                 # quick check, generated images
             tensorboard --logdir runs/05_transfer_learning/tensorboard      # the strategies' curves, filters
  Colab:     paste the file into a cell (or cell by cell at the `# %%` marks); a GPU runtime
             (Runtime > Change runtime type > T4 GPU) helps a lot.
  On a GPU the forward passes run under autocast (--precision auto): bf16 where the GPU has it
  natively (Ampere and newer), fp16 with a GradScaler elsewhere (a T4 only emulates bf16, and its
  bf16 convolutions leave cuDNN for a slow path). --precision fp32, bf16 or fp16 overrides it.
  Progress: a bar over the batches of each epoch and of each validation pass (steps, rate, time
  left) that gives way to the epoch's line; hidden under --smoke and when the output is not a terminal.

What the default run reaches
  With ImageNet weights on ants vs bees: not measured here. This machine has no network, so
  neither the weights nor the dataset could be fetched; the download paths are kept for learners.
  What was measured (shared 2-core AMD EPYC CPU, torch 2.14.1) is the mechanics of the default run
  on an ImageFolder of the same size cut from the real CIFAR-10 (cat vs dog, 244 training and
  152 validation 32x32 images, upscaled to 224 by the preprocessing), with --weights none:
      python week2_cnn/05_transfer_learning.py --data-dir data/cifar_cats_dogs --weights none
    | strategy           | best val accuracy | trainable parameters (max) | time (s) |
    | feature_extraction | 0.533             |      4,098                 | 164      |
    | fine_tuning        | 0.546             | 23,512,130                 | 328      |
    | gradual_unfreezing | 0.520             | 23,286,786                 | 216      |
  Whole run 731 s; an epoch takes 30-35 s with the backbone frozen and 62-71 s with all of
  it training. (Measured with images loaded in the main process, then the CPU default; now
  --workers defaults to min(4, CPU cores): not re-measured. --workers 0 repeats that setting.)
  From random weights, 244 images teach resnet50 nothing (50% is chance): starting
  from ImageNet weights is what transfer learning adds. That the loops do learn shows on a larger
  cut (10 classes, 2,000 training and 1,000 validation images, resnet18 at 64x64, --batch-size 32,
  --weights none, 286 s): best validation accuracy 0.279 for feature extraction on random
  features, 0.351 for fine-tuning, 0.321 for gradual unfreezing (chance is 0.100).
  On a GPU: not measured.
  --smoke (generated images, resnet18, 64x64): 53 CPU-seconds on a busy 2-core machine; not
  measured on idle cores (its history: the notes cell at the end of the file).
"""
# %% Imports and the lab's constants
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
ARCHES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "head")   # input to output
STRATEGIES = ("feature_extraction", "fine_tuning", "gradual_unfreezing")


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
# Figures: saved as PNG, and shown inline in a notebook.
def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Save a figure as PNG; in a notebook also show it inline. Then free it."""
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=dpi)
    if in_notebook():
        plt.show()
    plt.close(fig)


# %% 1. Your images in ImageFolder layout
# ImageFolder turns folder names into class labels: root/train/ants/1.jpg is an ant. Before
# training, every image is decoded once: a file that does not decode would otherwise crash the run
# in the middle of an epoch. Broken files are skipped with a warning that names them.

def image_extensions():
    from torchvision.datasets.folder import IMG_EXTENSIONS
    return IMG_EXTENSIONS


def find_imagefolder_root(data_dir: Path) -> Path:
    """The folder holding train/ and val/: data_dir itself, or the ants-vs-bees set inside it."""
    if (data_dir / "train").is_dir() or (data_dir / "val").is_dir():
        return data_dir
    default = data_dir / "hymenoptera_data"
    if (default / "train").is_dir():
        return default
    from torchvision.datasets.utils import download_and_extract_archive
    try:
        download_and_extract_archive(HYMENOPTERA_URL, download_root=str(data_dir))
    except (OSError, RuntimeError, ValueError) as err:     # URLError is an OSError
        raise LabError(
            f"--data-dir {data_dir} holds no ImageFolder dataset and the default ants-vs-bees set could not be "
            f"downloaded from {HYMENOPTERA_URL} ({one_line(err)}). Expected layout: {data_dir}/train/<class>/<images> and "
            f"{data_dir}/val/<class>/<images> (one folder per class, e.g. train/ants/0013035.jpg), or the "
            f"downloaded {default}/train/... . Name such a folder with --data-dir, check the network, "
            "or try the lab with --smoke.") from None
    return default


def scan_split(split_dir: Path):
    """Check one split and list its decodable images: (class_names, [(path, class_index)], skipped)."""
    from PIL import Image, UnidentifiedImageError
    layout = f"{split_dir.parent}/train/<class>/<images> and {split_dir.parent}/val/<class>/<images>"
    if not split_dir.is_dir():
        raise LabError(f"{split_dir} is missing: an ImageFolder dataset needs {layout}")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())   # every folder is a class, as in ImageFolder
    if not classes:
        raise LabError(f"{split_dir} has no class folders: an ImageFolder dataset needs {layout}")
    extensions = image_extensions()
    samples, skipped = [], []
    for index, name in enumerate(classes):
        files = sorted(p for p in (split_dir / name).rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        if not files:
            raise LabError(f"class folder {split_dir / name} holds no images (looked for {', '.join(extensions)}); "
                           "add images or remove the folder")
        for path in files:
            try:
                with Image.open(path) as image:
                    image.load()                       # decode fully: truncated files fail here, not mid-epoch
                samples.append((str(path), index))
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
                skipped.append(str(path))
                print(f"warning: skipping {path}: it does not decode as an image ({err})", file=sys.stderr)
    return classes, samples, skipped


def load_imagefolder(root: Path, train_transform, eval_transform):
    from torchvision.datasets import ImageFolder
    train_classes, train_samples, skipped_train = scan_split(root / "train")
    val_classes, val_samples, skipped_val = scan_split(root / "val")
    if train_classes != val_classes:
        raise LabError(f"train/ and val/ under {root} have different class folders: {train_classes} vs {val_classes}")
    for classes, samples, split in ((train_classes, train_samples, "train"), (val_classes, val_samples, "val")):
        empty = [classes[i] for i in range(len(classes)) if not any(idx == i for _, idx in samples)]
        if empty:
            raise LabError(f"class folder(s) {empty} in {root / split} have no image that decodes")
    good = {path for path, _ in train_samples + val_samples}
    train = ImageFolder(root / "train", transform=train_transform, is_valid_file=lambda p: p in good)
    val = ImageFolder(root / "val", transform=eval_transform, is_valid_file=lambda p: p in good)
    return train, val, skipped_train + skipped_val


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def make_loader(dataset, batch_size: int, device: torch.device, workers: int, shuffle=False, generator=None):
    """Batches decoded and resized by worker processes while the model trains; on CUDA in pinned memory,
    so the copy to the GPU can overlap with compute (non_blocking=True). The workers stay alive
    between epochs (persistent_workers). A training loader drops a last, smaller batch."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
        drop_last=shuffle and len(dataset) > batch_size, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=device.type == "cuda")


def make_synthetic_imagefolder(root: Path, generator: torch.Generator, per_class=(12, 6), size=72):
    """Smoke mode: a tiny generated dataset, 'reds' with horizontal stripes vs 'blues' with vertical ones."""
    from PIL import Image
    for split, count in zip(("train", "val"), per_class):
        for label, name in enumerate(("blues", "reds")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                grid = torch.arange(size).float()
                stripes = torch.sin(grid / 3).view(-1, 1) if label else torch.sin(grid / 3).view(1, -1)
                image = torch.zeros(size, size, 3)
                image[..., 2 - 2 * label] = 150 + 60 * stripes.expand(size, size)   # red or blue channel
                image += 25 * torch.randn(size, size, 3, generator=generator)
                Image.fromarray(image.clamp(0, 255).to(torch.uint8).numpy()).save(folder / f"{i:03d}.png")
    return root


# %% 2. A pretrained backbone with a new head
# torchvision names a ResNet's parts conv1/bn1 (the stem), layer1..layer4 (four stages, each
# halving the resolution), and fc (the classifier). The 1000-class fc is replaced by a fresh
# Linear with as many outputs as your dataset has classes.

def load_weights(arch: str, weights_name: str):
    from torchvision.models import get_model_weights
    all_weights = get_model_weights(arch)
    return all_weights.DEFAULT if weights_name == "DEFAULT" else None


def build_model(config: dict) -> nn.Module:
    """A ResNet of config['arch'] with a head of config['num_classes'] outputs (random weights)."""
    from torchvision.models import get_model
    model = get_model(config["arch"], weights=None)
    model.fc = nn.Linear(model.fc.in_features, config["num_classes"])
    return model


def pretrained_model(arch: str, weights, num_classes: int) -> nn.Module:
    from torchvision.models import get_model
    if weights is None:
        model = get_model(arch, weights=None)
    else:
        try:
            model = get_model(arch, weights=weights)   # downloads once into torch.hub.get_dir()/checkpoints
        except (OSError, RuntimeError) as err:
            raise LabError(f"could not get the ImageNet weights {weights} from {weights.url} ({one_line(err)}). "
                           f"They are cached in {torch.hub.get_dir()}/checkpoints after the first download; "
                           "check the network, or train from scratch with --weights none, "
                           "or try the lab with --smoke.") from None
    model.fc = nn.Linear(model.fc.in_features, num_classes)   # the new head: the only random part
    return model


@torch.no_grad()
def calibrate_batch_norm(model: nn.Module, loader, device, max_batches: int = 20) -> None:
    """Random weights only: set every BN layer's running statistics from the data, as pretraining would.

    A fresh BN layer believes its inputs have mean 0 and variance 1. A frozen stage runs in eval mode
    and trusts that belief, so random activations grow layer after layer into the thousands."""
    # Exercise calibrate_batch_norm: for every nn.BatchNorm2d in the model, forget its running mean
    # and variance and set momentum to None (a plain average over the batches seen, instead of an
    # exponential one); run up to max_batches batches of the loader forward in train mode (that is
    # when BN updates its statistics; no gradients needed: the decorator turns them off), images to
    # `device` in channels_last; then put momentum back to PyTorch's default, 0.1, for training.
    # Docs: https://pytorch.org/docs/stable/generated/torch.nn.BatchNorm2d.html
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None                    # None: a plain average over the batches seen
    model.train()
    for index, (images, _) in enumerate(loader):
        if index == max_batches:
            break
        model(images.to(device, non_blocking=True, memory_format=torch.channels_last))
    for norm in norms:
        norm.momentum = 0.1                     # PyTorch's default again for training


def stage_modules(model: nn.Module) -> dict:
    return {"stem": [model.conv1, model.bn1], "layer1": [model.layer1], "layer2": [model.layer2],
            "layer3": [model.layer3], "layer4": [model.layer4], "head": [model.fc]}


def stage_parameters(model: nn.Module, stage: str):
    return [p for module in stage_modules(model)[stage] for p in module.parameters()]


def open_stages(model: nn.Module, stages) -> None:
    """Make exactly `stages` trainable; every other stage is frozen (no gradients, no updates)."""
    # Exercise open_stages: for every stage in STAGES, set requires_grad on each of its parameters
    # (stage_parameters gives them) to True when the stage is in `stages`, else False. A frozen
    # parameter then gets no .grad in backward, and the optimizer leaves it alone.
    # Docs: https://pytorch.org/docs/stable/generated/torch.Tensor.requires_grad_.html
    for stage in STAGES:
        for p in stage_parameters(model, stage):
            p.requires_grad_(stage in stages)


def set_train_mode(model: nn.Module, stages) -> None:
    """Train mode for open stages; frozen stages stay in eval so their batch-norm statistics stay put."""
    # Exercise set_train_mode: the whole model to train mode, then every module of a stage that is
    # not in `stages` (stage_modules gives them) back to eval mode: requires_grad=False stops the
    # weights, but only eval mode stops a BatchNorm layer updating its running mean and variance.
    # Docs: https://pytorch.org/docs/stable/generated/torch.nn.Module.html#torch.nn.Module.eval
    model.train()
    for stage in STAGES:
        if stage not in stages:
            for module in stage_modules(model)[stage]:
                module.eval()


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


STAGE_PREFIXES = {"stem": ("conv1.", "bn1."), "head": ("fc.",)}   # the others: "layer1." ...


def stage_weight_change(model: nn.Module, start_state: dict) -> dict:
    """How far each stage's parameters moved from start_state: |w - w0| / |w0| over the stage (0: not at all)."""
    change = {}
    for stage in STAGES:
        prefixes = STAGE_PREFIXES.get(stage, (stage + ".",))
        pairs = [(p.detach().float().cpu(), start_state[name].float())
                 for name, p in model.named_parameters() if name.startswith(prefixes)]
        moved = math.sqrt(sum(((now - then) ** 2).sum().item() for now, then in pairs))
        size = math.sqrt(sum((then ** 2).sum().item() for _now, then in pairs))
        change[stage] = moved / max(size, 1e-12)
    return change


# %% 3. Three strategies and the unfreezing schedule
# A strategy answers one question per epoch: which stages are open? Feature extraction opens only
# the head; fine-tuning opens everything; gradual unfreezing starts with the head and opens more
# stages at the epochs the schedule names. Learning rates fall by `--lr-decay` per stage going
# down from the head, so the generic early filters move least.

def parse_schedule(text: str) -> dict:
    """'2:layer4,3:layer3+layer2' -> {2: ['layer4'], 3: ['layer3', 'layer2']} (epochs count from 1)."""
    schedule = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        epoch_text, _, stages_text = item.partition(":")
        try:
            epoch = int(epoch_text)
        except ValueError:
            raise ValueError(f"'{item}' should look like EPOCH:STAGE, e.g. 2:layer4") from None
        stages = [s.strip() for s in stages_text.split("+") if s.strip()]
        unknown = [s for s in stages if s not in STAGES[:-1]]
        if epoch < 1 or not stages or unknown:
            raise ValueError(f"'{item}': epochs start at 1 and stages are {', '.join(STAGES[:-1])}")
        schedule.setdefault(epoch, []).extend(stages)
    return schedule


def stages_open_at(strategy: str, epoch: int, schedule: dict) -> list:
    """Which stages train in this epoch (1-based) under the strategy."""
    if strategy == "feature_extraction":
        return ["head"]
    if strategy == "fine_tuning":
        return list(STAGES)
    opened = {"head"}
    for when, stages in schedule.items():
        if when <= epoch:
            opened.update(stages)
    return [s for s in STAGES if s in opened]


def make_optimizer(model: nn.Module, strategy: str, lr: float, lr_decay: float, weight_decay: float, bug=None):
    """SGD with one parameter group per stage; lr * lr_decay**k for the stage k steps below the head.
    bug is --bug (the debugging drill)."""
    # Exercise make_optimizer: torch.optim.SGD (momentum 0.9, the given weight_decay) over parameter
    # groups, one dict per stage: {"params": its parameters, "lr": ..., "stage": its name}. The head
    # gets lr, the stage below it lr * lr_decay, and so on down to the stem (lr * lr_decay**5).
    # Feature extraction trains only the head, so its optimizer holds the head's group alone.
    # Docs: https://pytorch.org/docs/stable/optim.html#per-parameter-options
    stages = ["head"] if strategy == "feature_extraction" else list(STAGES)
    if bug == "optimizer-built-before-unfreezing":
        # Drill: --bug optimizer-built-before-unfreezing hands the optimizer only what is trainable
        # now (the head, at the start of gradual unfreezing). Stages opened later get gradients but the
        # optimizer never updates them. Symptom: their weights never move (the "weights moved" line;
        # late_stages_weight_change in metrics.json: exactly 0). Find it by printing each param group's
        # stage (optimizer.param_groups) after unfreezing, or the weight change per stage.
        stages = [stage for stage in stages if all(p.requires_grad for p in stage_parameters(model, stage))]
    groups = [{"params": stage_parameters(model, stage), "lr": lr * lr_decay ** (len(STAGES) - 1 - STAGES.index(stage)),
               "stage": stage} for stage in stages]
    # Frozen parameters get no gradient, and SGD skips a parameter whose .grad is None.
    return torch.optim.SGD(groups, momentum=0.9, weight_decay=weight_decay)


# %% 4. Training and evaluation
# No step waits for the GPU: images arrive with non-blocking copies from pinned memory, the loss and
# the correct answers are summed on the device, and the first non-finite loss is remembered there;
# all of it is read once, at the end of the epoch.

def progress(loader, description: str, show: bool):
    """A bar over the loader's batches (steps, rate, time left). leave=False: the finished bar makes
    way for the epoch's log line; disable=None: no bar where the output is not a terminal."""
    return tqdm(loader, desc=description, unit="batch", leave=False, disable=None if show else True)


def evaluate(model, loader, device, dtype, show_progress=False):
    """(accuracy, mean loss) over the loader, in eval mode."""
    model.eval()
    correct = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    count = 0
    with torch.no_grad():
        for images, labels in progress(loader, "validation", show_progress):
            images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, dtype):
                logits = model(images)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
            correct += (logits.argmax(1) == labels).sum()
            count += len(labels)
    return correct.item() / count, loss_sum.item() / count


def train_one_epoch(model, loader, optimizer, scheduler, scaler, device, dtype, epoch, strategy, show_progress=False):
    """One pass over the loader; returns (accuracy, mean loss) of the training batches."""
    correct = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), -1, device=device)        # the first step whose loss is not finite
    count = 0
    for step, (images, labels) in enumerate(progress(loader, f"{strategy} epoch {epoch}", show_progress), start=1):
        images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        first_bad = torch.where(~torch.isfinite(loss) & (first_bad < 0), step, first_bad)
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        count += len(labels)
    if first_bad >= 0:                                    # the one read of the guard per epoch
        raise LabError(f"{strategy}: the loss became NaN or infinite at step {int(first_bad)} of epoch {epoch}; "
                       "lower --lr")
    return correct.item() / count, loss_sum.item() / count


def save_checkpoint(path: Path, model: nn.Module, config: dict, sample_inputs: torch.Tensor, extra: dict):
    """Atomic save in the lab convention: model, config, sample inputs and the outputs they gave."""
    rebuilt = build_model(config)
    rebuilt.load_state_dict({k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                             for k, v in model.state_dict().items()})
    rebuilt.eval()
    with torch.no_grad():
        sample_outputs = rebuilt(sample_inputs)
    torch_save_atomically({"model": rebuilt.state_dict(), "config": config, "sample_inputs": sample_inputs,
                           "sample_outputs": sample_outputs, **extra}, path)


def load_checkpoint(path: Path) -> nn.Module:
    """Rebuild a saved network on the CPU and check it still gives the predictions stored with it."""
    import pickle
    if not path.is_file():
        raise LabError(f"checkpoint {path} does not exist")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise LabError(f"checkpoint {path} is truncated or corrupt: it does not load as a torch file "
                       f"({one_line(err)})") from None
    config = saved.get("config") if isinstance(saved, dict) else None
    if not isinstance(config, dict) or config.get("arch") not in ARCHES or "num_classes" not in config \
            or "model" not in saved:
        raise LabError(f"checkpoint {path} loads, but it was not written by this lab (lab 05 saves a ResNet "
                       "with config['arch'] and config['num_classes']); it belongs to another lab or program")
    try:
        model = build_model(config)
        model.load_state_dict(saved["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        raise LabError(f"checkpoint {path} holds weights of another architecture than its config "
                       f"describes (edited or damaged): {one_line(err)}") from None
    model.eval()
    with torch.no_grad():
        if not torch.allclose(model(saved["sample_inputs"]), saved["sample_outputs"], rtol=1e-4, atol=1e-5):
            raise LabError(f"checkpoint {path} does not reproduce its stored predictions")
    return model


# TensorBoard (`tensorboard --logdir runs/05_transfer_learning/tensorboard`): each strategy's
# losses, accuracies and head learning rate per epoch against the optimizer step (the numbers of
# the epoch's log line), so the strategies' curves sit side by side; and each strategy's first-layer
# filters at its end (a fine-tuned stem moves them, a frozen one does not).
def log_epoch(writer: SummaryWriter, strategy: str, record: dict, head_lr: float, steps_done: int) -> None:
    for split in ("train", "val"):
        writer.add_scalar(f"loss_{split}/{strategy}", record[f"{split}_loss"], steps_done)
        writer.add_scalar(f"accuracy_{split}/{strategy}", record[f"{split}_accuracy"], steps_done)
    writer.add_scalar(f"lr_head/{strategy}", head_lr, steps_done)
    writer.flush()


def first_layer_filters(model: nn.Module) -> torch.Tensor:
    """conv1's 7x7 RGB filters, each stretched to 0..1, enlarged 4x so the pixels can be seen."""
    weights = model.conv1.weight.detach().float().cpu()             # (64, 3, 7, 7)
    weights = weights - weights.amin(dim=(1, 2, 3), keepdim=True)
    weights = weights / weights.amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-8)
    return weights.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)


def run_strategy(strategy, start_state, args, data, device, dtype, out_dir: Path, writer: SummaryWriter):
    train_loader, val_loader, class_names, sample_inputs = data
    model = build_model({"arch": args.arch, "num_classes": len(class_names)})
    model.load_state_dict(start_state)                     # every strategy starts from the same weights
    model.to(device, memory_format=torch.channels_last)    # oneDNN and cuDNN convolutions run faster so
    open_stages(model, stages_open_at(strategy, 1, args.schedule))   # frozen first, then the optimizer
    optimizer = make_optimizer(model, strategy, args.lr, args.lr_decay, args.weight_decay, bug=args.bug)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(train_loader))
    scaler = grad_scaler(device, dtype)
    config = {"arch": args.arch, "num_classes": len(class_names)}
    history, best, start = [], -1.0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        stages = stages_open_at(strategy, epoch, args.schedule)
        open_stages(model, stages)
        set_train_mode(model, stages)
        epoch_start = time.perf_counter()
        train_accuracy, train_loss = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, device,
                                                     dtype, epoch, strategy, show_progress=not args.smoke)
        train_seconds = time.perf_counter() - epoch_start
        val_accuracy, val_loss = evaluate(model, val_loader, device, dtype, show_progress=not args.smoke)
        seconds = time.perf_counter() - epoch_start
        history.append({"epoch": epoch, "open_stages": stages, "trainable_parameters": count_trainable(model),
                        "train_loss": train_loss, "train_accuracy": train_accuracy, "val_loss": val_loss,
                        "val_accuracy": val_accuracy, "seconds": seconds, "train_seconds": train_seconds})
        improved = val_accuracy > best
        if improved:
            best = val_accuracy
            save_checkpoint(out_dir / f"best_{strategy}.pt", model, config, sample_inputs,
                            {"class_names": class_names, "strategy": strategy, "epoch": epoch,
                             "val_accuracy": val_accuracy})
        images_per_s = len(train_loader) * train_loader.batch_size / train_seconds
        print(f"  {strategy:18s} epoch {epoch}/{args.epochs}  open: {'+'.join(stages):38s} "
              f"trainable {count_trainable(model):>10,}  train loss {train_loss:.3f} acc {train_accuracy:.3f}  "
              f"val acc {val_accuracy:.3f}{' *' if improved else '  '}  {images_per_s:5.1f} train img/s  "
              f"{seconds:5.1f}s with validation", flush=True)
        log_epoch(writer, strategy, history[-1], optimizer.param_groups[-1]["lr"], epoch * len(train_loader))
    writer.add_images(f"first_layer_filters/{strategy}", first_layer_filters(model), args.epochs * len(train_loader))
    load_checkpoint(out_dir / f"best_{strategy}.pt")     # the saved best reloads and predicts as it did
    moved = stage_weight_change(model, start_state)
    print(f"  {strategy:18s} weights moved (|w - w0| / |w0| per stage): "
          + ", ".join(f"{stage} {change:.1e}" for stage, change in moved.items()))
    return {"history": history, "best_val_accuracy": best,
            "best_epoch": max(history, key=lambda h: h["val_accuracy"])["epoch"],
            "time_s": time.perf_counter() - start,
            "max_trainable_parameters": max(h["trainable_parameters"] for h in history),
            "stage_weight_change": moved}


# %% 5. One table and one plot

def comparison_table(results: dict) -> str:
    lines = ["| strategy | best val accuracy | at epoch | trainable parameters (max) | time (s) |",
             "| --- | --- | --- | --- | --- |"]
    for strategy, result in results.items():
        lines.append(f"| {strategy} | {result['best_val_accuracy']:.3f} | {result['best_epoch']} | "
                     f"{result['max_trainable_parameters']:,} | {result['time_s']:.1f} |")
    return "\n".join(lines)


def save_comparison_plot(results: dict, path: Path, title: str):
    import matplotlib.pyplot as plt
    fig, (acc_ax, params_ax, time_ax) = plt.subplots(1, 3, figsize=(15, 4.2),
                                                     gridspec_kw={"width_ratios": [2, 1, 1]})
    for strategy, result in results.items():
        epochs = [h["epoch"] for h in result["history"]]
        acc_ax.plot(epochs, [h["val_accuracy"] for h in result["history"]], marker="o", label=strategy)
    acc_ax.set_xticks(epochs)
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("validation accuracy")
    acc_ax.legend()
    acc_ax.set_title(title)
    names = list(results)
    counts = [results[n]["max_trainable_parameters"] for n in names]
    bars = params_ax.bar(names, counts, color="tab:orange")
    params_ax.bar_label(bars, labels=[f"{c:,}" for c in counts], fontsize=8)
    params_ax.set_yscale("log")          # a head has thousands, the whole network millions
    params_ax.set_ylabel("trainable parameters (most at once)")
    time_ax.bar(names, [results[n]["time_s"] for n in names], color="tab:green")
    time_ax.set_ylabel("training + validation time (s)")
    for ax in (params_ax, time_ax):
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    save_figure(fig, path)


# %% 6. Putting it together
# The command line. Every flag has a default and a help string; a value out of range is refused by
# its type= function before anything runs, as a one-line LabError (the plumbing cell's number() and
# ArgumentParser). A list of strategies and a schedule are not plain numbers: their checks are here.

def strategy_list(text: str) -> list:
    strategies = [s.strip() for s in text.split(",") if s.strip()]
    if not strategies or any(s not in STRATEGIES for s in strategies):
        raise argparse.ArgumentTypeError(f"{text!r}: take names from {', '.join(STRATEGIES)}")
    return strategies


def schedule(text: str) -> dict:
    try:
        return parse_schedule(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to train; auto picks the accelerator if there is one")
    parser.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                        help="autocast dtype on CUDA: auto = bf16 where the GPU has it natively, else fp16 "
                             "with loss scaling; CPU and MPS train in fp32")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the head, data order and augmentation")
    parser.add_argument("--data-dir", default="./data",
                        help="an ImageFolder dataset (DATA_DIR/train/<class>/*, DATA_DIR/val/<class>/*), or a folder "
                             "to hold the downloaded ants-vs-bees set (DATA_DIR/hymenoptera_data)")
    parser.add_argument("--out-dir", default="runs/05_transfer_learning",
                        help="where metrics.json, the comparison table and plot, and checkpoints go")
    parser.add_argument("--smoke", action="store_true",
                        help="a 10-second run of every code path: generated images, resnet18 without weights")
    parser.add_argument("--arch", default="resnet50", choices=ARCHES, help="which torchvision ResNet to start from")
    parser.add_argument("--weights", default="DEFAULT", choices=["DEFAULT", "none"],
                        help="DEFAULT: the best ImageNet weights torchvision has for --arch; none: random init")
    parser.add_argument("--strategies", type=strategy_list, default=list(STRATEGIES),
                        help=f"which strategies to run, comma-separated, from {', '.join(STRATEGIES)}")
    parser.add_argument("--epochs", type=positive_int, default=5, help="epochs for each strategy")
    parser.add_argument("--batch-size", type=number(int, at_least=2), default=16,
                        help="images per SGD step, at least 2 (batch norm needs two images)")
    parser.add_argument("--lr", type=number(float, above=0, at_most=10), default=0.01, help="learning rate of the new head, in (0, 10]")
    parser.add_argument("--lr-decay", type=number(float, above=0, at_most=1), default=0.3,
                        help="each stage below the head learns at this fraction of the stage above's rate, in (0, 1]")
    parser.add_argument("--weight-decay", type=number(float, at_least=0), default=1e-4, help="SGD weight decay, >= 0")
    parser.add_argument("--unfreeze-schedule", dest="schedule", type=schedule, default="2:layer4,3:layer3,4:layer2",
                        help="gradual unfreezing: EPOCH:STAGE[+STAGE],... opens those stages from that epoch on")
    parser.add_argument("--image-size", type=number(int, at_least=32), default=None,
                        help="crop size fed to the network in pixels, at least 32 (a ResNet shrinks its input "
                             "32-fold; default: the size the weights were trained at, 224)")
    parser.add_argument("--workers", type=whole_number, default=default_workers(),
                        help="DataLoader worker processes that decode and resize images beside training "
                             "(0: in the main process)")
    parser.add_argument("--bug", default=None, choices=["optimizer-built-before-unfreezing"],
                        help="debugging drill: plant a bug and watch its symptom (optimizer-built-before-unfreezing: "
                             "the optimizer holds only the head; see the '# Drill:' comment in make_optimizer)")
    return parser


def run(args):
    from torchvision import transforms
    wall_start = time.perf_counter()
    data_dir, out_dir = folder(args.data_dir, "--data-dir"), folder(args.out_dir, "--out-dir")
    device = pick_device(args.device)
    dtype = pick_precision(args.precision, device)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        # Batches of 8: two optimizer steps per epoch on the 16 generated training images.
        args.arch, args.weights, args.epochs, args.batch_size = "resnet18", "none", 3, 8
        args.image_size = args.image_size or 64
        args.schedule = {2: ["layer4"], 3: ["layer3", "layer2"]}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True      # fixed crop size: pick the fastest conv algorithms once
        torch.backends.cuda.matmul.fp32_precision = "tf32"   # fp32 matmuls on tensor cores (Ampere and newer)
    precision = "fp32" if dtype is None else str(dtype).removeprefix("torch.")
    print(f"Lab 05 on {device} in {precision} (torch {torch.__version__}): {args.arch}, weights {args.weights}"
          + ("  [SMOKE: generated images, numbers are not results]" if args.smoke else ""))

    # The weights' own preprocessing: resize, centre-crop, scale to [0, 1], normalise with ImageNet's mean/std.
    weights = load_weights(args.arch, args.weights)
    reference = load_weights(args.arch, "DEFAULT")     # its transforms need no download, even for --weights none
    preset = reference.transforms()
    crop = args.image_size or preset.crop_size[0]
    eval_transform = reference.transforms(crop_size=crop, resize_size=round(crop * preset.resize_size[0] / preset.crop_size[0]))
    train_transform = transforms.Compose([
        transforms.RandomResizedCrop(crop, scale=(0.25, 1.0)),   # new framing every epoch
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(preset.mean, preset.std)])
    print(f"  preprocessing from {reference}: {eval_transform}".replace("\n", " "))

    root = make_synthetic_imagefolder(out_dir / "smoke_imagefolder", generator, per_class=(8, 4)) if args.smoke \
        else find_imagefolder_root(data_dir)
    train_set, val_set, skipped = load_imagefolder(root, train_transform, eval_transform)
    class_names = train_set.classes
    print(f"  dataset {root}: {len(train_set)} training and {len(val_set)} validation images, "
          f"classes {class_names}" + (f"; skipped {len(skipped)} that do not decode" if skipped else ""))
    sample_inputs = torch.stack([val_set[i][0] for i in range(min(2, len(val_set)))])

    def loaders():
        """Fresh loaders: with the generator re-seeded, their workers repeat the same augmentation."""
        return (make_loader(train_set, args.batch_size, device, args.workers, shuffle=True, generator=generator),
                make_loader(val_set, args.batch_size, device, args.workers))

    start_model = pretrained_model(args.arch, weights, len(class_names))
    if weights is None:
        start_model.to(device, memory_format=torch.channels_last)
        calibrate_batch_norm(start_model, loaders()[0], device)
        print("  random weights: batch-norm statistics set from the training images, so that frozen "
              "random stages pass on sensibly scaled features")
    start_state = {k: v.detach().cpu().clone() for k, v in start_model.state_dict().items()}
    print(f"  {args.arch}: {sum(p.numel() for p in start_model.parameters()):,} parameters; new head "
          f"{start_model.fc} for {len(class_names)} classes")
    del start_model

    results = {}
    writer = SummaryWriter(out_dir / "tensorboard")
    try:
        # What the network sees: validation images after the weights' preprocessing, normalisation undone.
        shown = torch.stack([val_set[i][0] for i in range(min(16, len(val_set)))])
        mean, std = torch.tensor(preset.mean).view(1, 3, 1, 1), torch.tensor(preset.std).view(1, 3, 1, 1)
        writer.add_images("validation_images", (shown * std + mean).clamp(0, 1), 0)
        train_start = time.perf_counter()
        for strategy in args.strategies:
            print(f"\n== {strategy} ==")
            torch.manual_seed(args.seed)                 # same data order and augmentation for every strategy
            generator.manual_seed(args.seed)
            results[strategy] = run_strategy(strategy, start_state, args, (*loaders(), class_names, sample_inputs),
                                             device, dtype, out_dir, writer)
        train_time = time.perf_counter() - train_start
    finally:
        writer.close()

    table = comparison_table(results)
    print("\n" + table)
    (out_dir / "comparison.md").write_text(table + "\n")
    title = f"{args.arch}, weights {args.weights}, {root.name}"
    save_comparison_plot(results, out_dir / "strategy_comparison.png", title)
    best_strategy = max(results, key=lambda s: results[s]["best_val_accuracy"])
    # The drill's symptom: the stages gradual unfreezing opened after epoch 1 must have moved.
    late_stages = [stage for epoch, stages in args.schedule.items() if 1 < epoch <= args.epochs for stage in stages]
    late_change = None
    if "gradual_unfreezing" in results and late_stages:
        late_change = min(results["gradual_unfreezing"]["stage_weight_change"][stage] for stage in late_stages)
        print(f"\ngradual_unfreezing: the stages opened later ({', '.join(late_stages)}) moved by at least "
              f"{late_change:.1e} of their weights"
              + ("; --bug optimizer-built-before-unfreezing: the optimizer never got them" if args.bug else ""))
    wall_time = time.perf_counter() - wall_start
    metrics = {
        "lab": "05_transfer_learning", "smoke": args.smoke, "device": str(device), "precision": precision,
        "torch_version": torch.__version__,
        "wall_time_s": wall_time, "train_time_s": train_time, "epochs": args.epochs,
        "arch": args.arch, "weights": args.weights, "image_size": crop, "dataset": str(root),
        "classes": class_names, "train_images": len(train_set), "val_images": len(val_set),
        "skipped_images": skipped, "best_strategy": best_strategy,
        "val_accuracy": results[best_strategy]["best_val_accuracy"],
        "unfreeze_schedule": {str(k): v for k, v in args.schedule.items()},
        "bug": args.bug, "late_stages_weight_change": late_change,
        "strategies": results,
    }
    write_json_atomically(metrics, out_dir / "metrics.json")
    print(f"\nSummary: {args.arch} (weights {args.weights}) on {len(class_names)} classes; best validation accuracy "
          f"{results[best_strategy]['best_val_accuracy']:.3f} by {best_strategy}. Wall time {wall_time:.0f}s.\n"
          f"  Outputs in {out_dir}/: comparison.md, strategy_comparison.png, best_<strategy>.pt, metrics.json, tensorboard/.\n"
          "  Try --unfreeze-schedule \"2:layer4+layer3,4:layer2\" or --lr-decay 1 (no discriminative rates).")
    return metrics


# %%
# Notes: how the smoke run's time moved. --smoke (generated images, resnet18, 64x64) took about 10 s
# when it trained one batch of 16 per epoch; it now trains two batches of 8 (so a GPU read once per
# epoch is told apart from one per step), 53 CPU-seconds against 37 before on the same busy machine;
# not re-measured on idle cores.


# %%
# Predict, then run. Write your prediction down before each command; the lab prints the answer.
# 1. Run: python week2_cnn/05_transfer_learning.py --weights none
#    Predict: from random weights instead of ImageNet's, how far does each strategy's best validation
#    accuracy fall (chance is 0.5 on ants vs bees)?
#    Answer: the comparison table; strategies.*.best_val_accuracy in metrics.json.
# 2. Run: python week2_cnn/05_transfer_learning.py --lr-decay 1
#    Predict: every stage at the head's learning rate: does fine-tuning gain or lose, and how much?
#    Answer: the fine_tuning row of the comparison table; val_accuracy and best_strategy in metrics.json.
# 3. Run: python week2_cnn/05_transfer_learning.py --strategies feature_extraction,fine_tuning --arch resnet18
#    Predict: how many times more trainable parameters and seconds does fine-tuning take?
#    Answer: the "trainable parameters (max)" and "time (s)" columns of the comparison table.
# 4. Run: python week2_cnn/05_transfer_learning.py --strategies gradual_unfreezing --bug optimizer-built-before-unfreezing
#    Predict: layer4 opens in epoch 2: how far do its weights move by the end, against a clean run?
#    Answer: the "weights moved" line and the "stages opened later" line; late_stages_weight_change in
#    metrics.json.


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

"""Lab 06: recurrent networks, from a hand-written RNN cell to a character-level Shakespeare LSTM.

Curriculum days 15-17. What this lab teaches, in order:
  1. A vanilla RNN cell written by hand, shown equal to `nn.RNNCell` with the same weights.
  2. The vanishing gradient: how much a step t steps back still moves the last output, RNN vs LSTM.
  3. An LSTM cell written by hand (input, forget, cell and output gates), equal to `nn.LSTMCell`.
  4. An LSTM forecaster on noisy sums of sines, a multi-step forecast plotted against the truth,
     and a GRU trained the same way beside it: parameters, speed and result.
  5. A bidirectional LSTM: a walk through its shapes, and a task where seeing the future helps.
  6. Character-level language modelling on tiny Shakespeare with `nn.LSTM`: truncated
     back-propagation through time, gradient clipping, AdamW with warm-up and cosine decay,
     validation loss in nats per character, samples printed and saved.

Run it
  terminal:  python week3_rnn/06_rnn_lstm.py                    (downloads tiny Shakespeare, ~1 MB)
             python week3_rnn/06_rnn_lstm.py --smoke            (every code path in seconds, no network)
             python week3_rnn/06_rnn_lstm.py --sample-from runs/06_rnn_lstm/char_lstm.pt --prompt "ROMEO:"
             python week3_rnn/06_rnn_lstm.py --device cuda --precision fp16   (a T4's mixed precision on any GPU)
             tensorboard --logdir runs/06_rnn_lstm/tensorboard   (losses, learning rate, samples)
             python week3_rnn/06_rnn_lstm.py --bug no-zero-grad   (a debugging drill: spot the planted bug)
  Colab:     paste the file into a cell (or cell by cell at the `# %%` markers) and run it; call
             `main(["--time-budget", "300"])` to train longer. As a notebook (jupytext), figures show
             inline and a bad flag prints one line.

On a GPU (part 6; parts 1-5 are tiny and stay on the CPU): `--precision auto` autocasts to bf16
where the GPU runs it natively and to fp16 with a GradScaler elsewhere (a T4); under bf16 the LSTM
itself runs in fp32, since cuDNN would run it in fp16 without a scaler. No training step waits for
the GPU: the loss is summed there and read every `--log-every` steps, with the NaN check.

The corpus is fetched on first use from the char-rnn repository
(https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt)
into `--data-dir/tinyshakespeare/input.txt`; the first 90 % of it trains, the last 10 % validates.

What the default run reaches (measured)
  2-core CPU (AMD EPYC, torch 2.14.1), `python week3_rnn/06_rnn_lstm.py`:
    validation loss 1.491 and 1.493 nats/char in two runs (2.15 bits; target 1.88, stretch 1.70)
    from a 256-unit LSTM trained 100 s (6,220-6,546 steps, 12.7-13.4 passes over the training
    text); whole run 135-136 s in the lab, 137-138 s for the process. Part 4's 50-step forecasts:
    RMSE 0.249 (LSTM) and 0.215 (GRU) against the clean signal, where predicting zero scores 0.416
    and repeating the last value 0.602; 1,500 steps each, about 8 s (LSTM) and 25 s (GRU).
    Smoke run (`--smoke`): 5.4-5.6 s wall on an idle machine (an earlier version: the notes cell
    at the end says which).
  GPU: not measured yet.
  Training stops on a wall-clock budget (`--time-budget`, seconds), not on a step count, so the
  whole default run, all six parts, fits the lab's target of 2 min 40 s of wall time; the
  learning-rate schedule is spread over that budget. `--epochs N` trains N full passes instead.

The validation loss streams the held-out text through the LSTM with its state carried along, the
way the model is used when it writes; so most characters are predicted with a long context.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

LAB_NAME = "06_rnn_lstm"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TARGET_VAL_LOSS = 1.88  # nats per character, the lab's promise within 2 min 40 s on a 2-core CPU
TINY_SHAKESPEARE_CHARACTERS = 1_115_394  # the length of the published file


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
# Setup: figures that also show inline in a notebook, and fast CUDA kernels (the device, folders
# and the mixed-precision policy are in the plumbing cell above).
def save_figure(fig, path: Path) -> None:
    """Save a figure as PNG, show it inline in a notebook, and free it."""
    import matplotlib.pyplot as plt

    fig.savefig(path)
    if in_notebook():
        from IPython.display import display
        display(fig)
    plt.close(fig)


@contextlib.contextmanager
def fast_cuda_kernels(device: torch.device):
    """On CUDA: cuDNN autotuning (training shapes are fixed) and TF32 matmuls (Ampere and newer).
    Both are put back afterwards, so a notebook kernel is left as the lab found it."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.fp32_precision
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.fp32_precision = before


# %%
# Recurrent layers under mixed precision. PyTorch's cuDNN wrapper casts nn.LSTM/nn.GRU to fp16
# under autocast, whatever dtype was asked (CONTRIBUTING.md, "Mixed precision"); fp16 needs the
# GradScaler, which only the fp16 policy turns on. So under bf16 the layer runs in fp32 instead.
def run_recurrent(layer: nn.Module, inputs, state=None):
    """layer(inputs, state), outside autocast and in fp32 when autocast asks for bf16."""
    kind = inputs.device.type
    if not (torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16):
        return layer(inputs, state)
    if state is not None:
        state = tuple(s.float() for s in state) if isinstance(state, tuple) else state.float()
    with torch.autocast(kind, enabled=False):
        return layer(inputs.float(), state)


# %%
# Part 1. A vanilla RNN cell by hand. One step: h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh).
# The parameters carry the same names and shapes as nn.RNNCell's, so one state_dict fits both and
# we can check that our four lines compute exactly what PyTorch computes.
class ScratchRNNCell(nn.Module):
    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        bound = 1 / math.sqrt(hidden_size)  # PyTorch's default: U(-1/sqrt(H), 1/sqrt(H)) for every tensor
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(hidden_size, hidden_size).uniform_(-bound, bound))
        self.bias_ih = nn.Parameter(torch.empty(hidden_size).uniform_(-bound, bound))
        self.bias_hh = nn.Parameter(torch.empty(hidden_size).uniform_(-bound, bound))

    def forward(self, x, h=None):  # x: (B, I), h: (B, H)
        # Exercise rnn_cell: one step of the vanilla RNN. Inputs x (B, I) and the previous hidden
        # state h (B, H), or None at the first step (then start from zeros, (B, H), on x's device and
        # dtype). Return the new hidden state (B, H) = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh), with
        # the four parameters made in __init__ (a weight (H, I) is applied as x @ W.T, as nn.Linear does).
        # Docs: https://pytorch.org/docs/stable/generated/torch.nn.RNNCell.html
        if h is None:
            h = x.new_zeros(x.shape[0], self.hidden_size)
        return torch.tanh(x @ self.weight_ih.T + self.bias_ih + h @ self.weight_hh.T + self.bias_hh)  # (B, H)


def unroll(cell, inputs, state=None):
    """Run a cell over a sequence (B, T, I) step by step; returns the hidden state after every step."""
    hiddens = []
    for t in range(inputs.shape[1]):
        state = cell(inputs[:, t], state)
        hiddens.append(state[0] if isinstance(state, tuple) else state)
    return torch.stack(hiddens, dim=1)  # (B, T, H)


def compare_cells(scratch_cell, torch_cell, inputs):
    """Copy PyTorch's weights into ours, unroll both over the same inputs, return the max difference."""
    scratch_cell.load_state_dict(torch_cell.state_dict())
    with torch.no_grad():
        return (unroll(scratch_cell, inputs) - unroll(torch_cell, inputs)).abs().max().item()


# %%
# Part 2. The vanishing gradient. Feed random inputs, take the last output, and ask how strongly
# the input d steps back still moves it: ||d out_T / d x_{T-d}||. In a vanilla RNN that signal is
# multiplied by W_hh and tanh' at every step, so it shrinks geometrically. An LSTM's cell state is
# updated additively (c = f*c + i*g): the gradient along it is scaled only by the forget gate f,
# which the network can learn to hold near 1. We measure it at initialisation, for the RNN, the
# LSTM with PyTorch's default init (f ~ 0.5) and the LSTM with the common forget-bias-1 init.
def gradient_vs_distance(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Mean gradient norm of the last output w.r.t. each input, indexed by distance back in time."""
    # Exercise gradient_vs_distance: let autograd measure how far back the last output still feels
    # the input. Take a copy of inputs (B, T, I) that requires grad, run the batch-first recurrent
    # `model` on it (it returns outputs (B, T, H) and its final state), backpropagate the sum of the
    # last step's outputs, and reduce inputs.grad (B, T, I) to one number per time step: the L2 norm
    # over features, averaged over the batch. Return (T,), reversed so entry d is the input d steps
    # before the last (entry 0: the last input itself).
    # Docs: https://pytorch.org/docs/stable/generated/torch.Tensor.backward.html
    inputs = inputs.clone().requires_grad_(True)
    outputs, _ = model(inputs)  # (B, T, H)
    outputs[:, -1].sum().backward()
    return inputs.grad.norm(dim=2).mean(dim=0).flip(0)  # (T,): entry d is the input d steps back


def open_forget_gate(lstm: nn.LSTM, bias: float = 1.0) -> nn.LSTM:
    """Set the forget-gate biases (second quarter of each bias vector, gate order i, f, g, o)."""
    hidden = lstm.hidden_size
    with torch.no_grad():
        for name, param in lstm.named_parameters():
            if name.startswith("bias_ih"):
                param[hidden:2 * hidden] = bias
            elif name.startswith("bias_hh"):
                param[hidden:2 * hidden] = 0.0
    return lstm


def vanishing_gradient_demo(out_dir: Path, seq_len: int = 80, hidden: int = 64, batch: int = 32):
    inputs = torch.randn(batch, seq_len, 8)
    curves = {
        "vanilla RNN (tanh)": gradient_vs_distance(nn.RNN(8, hidden, batch_first=True), inputs),
        "LSTM, default init": gradient_vs_distance(nn.LSTM(8, hidden, batch_first=True), inputs),
        "LSTM, forget bias 1": gradient_vs_distance(
            open_forget_gate(nn.LSTM(8, hidden, batch_first=True)), inputs),
    }
    plot_gradient_curves(curves, out_dir / "vanishing_gradient.png")
    return {name: curve.tolist() for name, curve in curves.items()}


def plot_gradient_curves(curves, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.semilogy(curve.clamp_min(1e-30).numpy(), label=name)
    ax.set_xlabel("distance back in time d (steps)")
    ax.set_ylabel("||d output_T / d input_(T-d)||")
    ax.set_title("Vanishing gradient at initialisation")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


# %%
# Part 3. An LSTM cell by hand. Four gates from one matrix product, in PyTorch's order i, f, g, o:
#   i = sigma(.)  how much new content to write      f = sigma(.)  how much old memory to keep
#   g = tanh(.)   the new content                    o = sigma(.)  how much memory to show
#   c' = f * c + i * g                               h' = o * tanh(c')
class ScratchLSTMCell(nn.Module):
    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        bound = 1 / math.sqrt(hidden_size)
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size).uniform_(-bound, bound))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size).uniform_(-bound, bound))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size).uniform_(-bound, bound))

    def forward(self, x, state=None):  # x: (B, I), state: ((B, H), (B, H))
        # Exercise lstm_cell: one step of the LSTM. Inputs x (B, I) and state = (h, c), each (B, H), or
        # None at the first step (then both start at zeros). One matrix product per input gives all four
        # gate blocks at once, (B, 4H) = x W_ih^T + b_ih + h W_hh^T + b_hh; cut it into i, f, g, o in
        # that order (PyTorch's), squash i, f, o with a sigmoid and g with tanh, then
        # c' = f * c + i * g and h' = o * tanh(c'). Return the tuple (h', c').
        # Docs: https://pytorch.org/docs/stable/generated/torch.nn.LSTMCell.html
        if state is None:
            zeros = x.new_zeros(x.shape[0], self.hidden_size)
            state = (zeros, zeros)
        h, c = state
        gates = x @ self.weight_ih.T + self.bias_ih + h @ self.weight_hh.T + self.bias_hh  # (B, 4H)
        i, f, g, o = gates.chunk(4, dim=1)  # each (B, H)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


# %%
# Part 4. Forecasting a time series, and GRU vs LSTM on it. Each series is a sum of sines with
# random frequency, phase and amplitude plus Gaussian noise. The network learns to predict the
# next value from the past (teacher forcing on the real history); to forecast many steps it then
# feeds its own predictions back in, so errors can accumulate: the plot shows how far that carries.
# The GRU merges the LSTM's cell and hidden state and has three gate blocks instead of four (3/4 of
# the parameters); both train here with the same data, steps and learning rate. Steps matter more
# than size here: with 150 steps both forecasts fade to zero within a few steps (RMSE 0.40-0.41, no
# better than predicting zero); with 1,500 they follow the waves (0.25 and 0.22 when measured).
def noisy_sines(count, length, generator, noise=0.05, components=2, fmin=0.015, fmax=0.05):
    """Returns (clean, noisy), each (count, length); frequencies in cycles per step."""
    steps = torch.arange(length, dtype=torch.float32)
    freqs = fmin + (fmax - fmin) * torch.rand(count, components, 1, generator=generator)
    phases = 2 * math.pi * torch.rand(count, components, 1, generator=generator)
    amplitudes = 0.2 + 0.4 * torch.rand(count, components, 1, generator=generator)
    clean = (amplitudes * torch.sin(2 * math.pi * freqs * steps + phases)).sum(dim=1)
    return clean, clean + noise * torch.randn(count, length, generator=generator)


class Forecaster(nn.Module):
    """A one-layer LSTM or GRU reading one value per step, and a linear read-out of the next value."""

    def __init__(self, kind: str = "lstm", hidden: int = 64):
        super().__init__()
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[kind](1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, series, state=None):  # series: (B, T, 1)
        outputs, state = self.rnn(series, state)  # (B, T, H); state: (h, c) for the LSTM, h for the GRU
        return self.head(outputs), state  # next-value predictions (B, T, 1)

    @torch.no_grad()
    def forecast(self, context, horizon):
        """Read the context (B, T, 1), then predict `horizon` steps feeding each prediction back."""
        predictions, state = self(context)
        step = predictions[:, -1:]  # (B, 1, 1)
        forecast = [step]
        for _ in range(horizon - 1):
            step, state = self(step, state)
            forecast.append(step)
        return torch.cat(forecast, dim=1)  # (B, horizon, 1)


def train_forecaster(kind, steps, seed, context, series_options, show_progress=False):
    """Adam with a cosine schedule on fresh batches; returns (model, ms per step, last train MSE)."""
    generator = torch.Generator().manual_seed(seed)  # the same batches for the LSTM and the GRU
    torch.manual_seed(seed)
    model = Forecaster(kind)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    start = time.perf_counter()
    # A bar (steps, rate, time left); disable=None hides it where the output is not a terminal.
    for _ in tqdm(range(steps), desc=f"{kind.upper()} forecaster", unit="step", leave=False,
                  disable=None if show_progress else True):
        _, noisy = noisy_sines(64, context + 1, generator, **series_options)
        series = noisy.unsqueeze(-1)  # (64, T+1, 1)
        predictions, _ = model(series[:, :-1])
        loss = F.mse_loss(predictions, series[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    return model.eval(), 1000 * (time.perf_counter() - start) / steps, loss.item()


def forecasting_demo(out_dir, steps, seed, context=100, horizon=50, show_progress=False, **series_options):
    clean, noisy = noisy_sines(256, context + horizon, torch.Generator().manual_seed(seed + 1), **series_options)
    truth = clean[:, context:]  # (256, horizon): the test series, never trained on
    rmse = lambda guess: ((guess - truth) ** 2).mean().sqrt().item()  # noqa: E731 (a one-line metric)
    results, forecasts = {}, {}
    for kind in ("lstm", "gru"):
        model, ms_per_step, train_mse = train_forecaster(kind, steps, seed, context, series_options, show_progress)
        forecasts[kind] = model.forecast(noisy[:, :context].unsqueeze(-1), horizon).squeeze(-1)  # (256, horizon)
        results[kind] = {"recurrent_params": sum(p.numel() for p in model.rnn.parameters()),
                         "ms_per_step": ms_per_step, "final_train_mse": train_mse,
                         "forecast_rmse": rmse(forecasts[kind])}
    results["repeat_last_value_rmse"] = rmse(noisy[:, context - 1:context].expand_as(truth))
    results["predict_zero_rmse"] = rmse(torch.zeros_like(truth))
    plot_forecasts(clean[:3], noisy[:3], {k: f[:3] for k, f in forecasts.items()}, context,
                   out_dir / "sines_forecast.png")
    return results


def plot_forecasts(clean, noisy, forecasts, context, path):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(clean), 1, figsize=(9, 2.4 * len(clean)), sharex=True)
    horizon = next(iter(forecasts.values())).shape[1]
    future = range(context, context + horizon)
    for row, ax in enumerate(axes):
        ax.plot(noisy[row].numpy(), color="0.7", lw=0.8, label="noisy series (what the model reads)")
        ax.plot(clean[row].numpy(), color="k", lw=1.2, label="clean truth")
        for (kind, forecast), color in zip(forecasts.items(), ("C3", "C0")):
            ax.plot(future, forecast[row].numpy(), color=color, lw=1.6, label=f"{kind.upper()} forecast (fed back)")
        ax.axvline(context, color="0.4", ls="--", lw=0.8)
    axes[0].legend(loc="upper left", fontsize=8, ncol=2)
    axes[0].set_title(f"Multi-step forecast: {horizon} steps after a {context}-step context")
    axes[-1].set_xlabel("time step")
    fig.tight_layout()
    save_figure(fig, path)


# %%
# Part 5. A bidirectional LSTM runs one LSTM left to right and another right to left and
# concatenates their outputs, so the output at step t has seen the whole sequence. The task
# "is the next digit larger?" cannot be solved left to right: the best a one-way model can do is
# guess from the current digit (70 % on average over uniform digits), while the two-way model reads
# the answer.
def bidirectional_shapes(batch=3, seq_len=5, input_size=4, hidden=6):
    """Print what each tensor of a 2-layer bidirectional LSTM looks like, and check the layout."""
    lstm = nn.LSTM(input_size, hidden, num_layers=2, batch_first=True, bidirectional=True)
    inputs = torch.randn(batch, seq_len, input_size)
    outputs, (h_n, c_n) = lstm(inputs)
    print(f"  input   {tuple(inputs.shape)}   (batch, time, features)")
    print(f"  output  {tuple(outputs.shape)}  (batch, time, 2 * hidden): [forward | backward] at every step")
    print(f"  h_n     {tuple(h_n.shape)}   (layers * 2 directions, batch, hidden); c_n the same")
    # The forward direction finishes at the last step, the backward one at the first.
    forward_last = torch.equal(outputs[:, -1, :hidden], h_n[-2])
    backward_first = torch.equal(outputs[:, 0, hidden:], h_n[-1])
    print(f"  output[:, -1, :H] == h_n[-2] (forward, top layer): {forward_last}; "
          f"output[:, 0, H:] == h_n[-1] (backward, top layer): {backward_first}")
    return forward_last and backward_first


class DigitTagger(nn.Module):
    """Embedding -> LSTM (one- or two-way) -> a yes/no logit pair for every position."""

    def __init__(self, bidirectional: bool, hidden: int = 32):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.lstm = nn.LSTM(16, hidden, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), 2)

    def forward(self, digits):  # digits: (B, T)
        outputs, _ = self.lstm(self.embed(digits))  # (B, T, H) or (B, T, 2H)
        return self.head(outputs)  # (B, T, 2)


def greater_next_batch(batch, seq_len, generator):
    """Digits 0-9; the label at step t says whether the NEXT digit is larger than this one."""
    digits = torch.randint(10, (batch, seq_len), generator=generator)
    labels = (digits[:, 1:] > digits[:, :-1]).long()
    labels = torch.cat([labels, torch.full((batch, 1), -100)], dim=1)  # the last step has no next digit
    return digits, labels


def bidirectional_demo(steps, seed):
    """Train a one-way and a two-way tagger on the same batches; accuracy on a fresh batch."""
    results = {}
    for bidirectional in (False, True):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model = DigitTagger(bidirectional)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(steps):
            digits, labels = greater_next_batch(64, 20, generator)
            loss = F.cross_entropy(model(digits).flatten(0, 1), labels.flatten(), ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        digits, labels = greater_next_batch(1024, 20, generator)
        with torch.no_grad():
            predictions = model(digits).argmax(-1)
        mask = labels != -100
        accuracy = (predictions[mask] == labels[mask]).float().mean().item()
        results["bidirectional" if bidirectional else "unidirectional"] = accuracy
    return results


# %%
# Part 6a. The data: tiny Shakespeare, 1.1 M characters of plays. Characters become integer ids;
# the whole corpus is one tensor. For truncated back-propagation through time (TBPTT) the training
# text is cut into `batch_size` long parallel streams; each step reads the next `bptt` characters
# of every stream and carries the LSTM state over from the previous step (detached, so gradients
# flow back at most `bptt` steps: that is the truncation).
def download(url: str, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as file:
            file.write(response.read())
    except (urllib.error.URLError, OSError) as err:
        partial.unlink(missing_ok=True)
        raise LabError(
            f"tiny Shakespeare is not in {path} and could not be downloaded ({' '.join(str(err).split())}); "
            f"download it by hand from {url} and put it at <data-dir>/tinyshakespeare/input.txt, "
            "or run with --smoke to try the lab on generated text without the corpus"
        ) from None
    os.replace(partial, path)  # never leave a half-written file under the real name


def load_shakespeare(data_dir: Path) -> str:
    path = data_dir / "tinyshakespeare" / "input.txt"
    if not path.exists():
        print(f"downloading tiny Shakespeare from {SHAKESPEARE_URL}")
        download(SHAKESPEARE_URL, path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LabError(f"cannot read {path} as UTF-8 text ({err}); delete it to download it again") from None
    if len(text) < TINY_SHAKESPEARE_CHARACTERS:
        raise LabError(f"{path} holds {len(text):,} characters; tiny Shakespeare has {TINY_SHAKESPEARE_CHARACTERS:,}, so the file looks truncated: delete it to download it again")
    return text


def generated_play(characters: int, seed: int) -> str:
    """Smoke-mode stand-in for the corpus: random lines of a made-up play, same shape, no network."""
    generator = torch.Generator().manual_seed(seed)
    names = ["ROMEO", "JULIET", "FIRST CITIZEN", "MENENIUS", "KING RICHARD III", "NURSE"]
    words = ("the of and to my thou thee love night lord sweet heaven what shall not be "
             "I am a is that with so but O me his her death fair speak come").split()
    pick = lambda options: options[torch.randint(len(options), (1,), generator=generator).item()]  # noqa: E731
    lines = []
    while sum(map(len, lines)) < characters:
        speech = " ".join(pick(words) for _ in range(6 + torch.randint(10, (1,), generator=generator).item()))
        lines.append(f"{pick(names)}:\n{speech.capitalize()}{pick(list('.,!?;'))}\n\n")
    return "".join(lines)


def build_vocabulary(text: str):
    chars = "".join(sorted(set(text)))
    return chars, {c: i for i, c in enumerate(chars)}


def encode_prompt(prompt: str, stoi: dict):
    """Prompt -> ids. Characters the model never saw are dropped; returns (ids, note or None)."""
    unknown = sorted({c for c in prompt if c not in stoi})
    ids = [stoi[c] for c in prompt if c in stoi]
    if not ids:
        raise LabError(f"no character of --prompt {prompt!r} is in the model's vocabulary "
                       f"({len(stoi)} characters: {''.join(stoi)!r})")
    note = None
    if unknown:
        note = (f"note: --prompt characters not in the vocabulary were dropped: {unknown}; "
                f"the model starts from {''.join(c for c in prompt if c in stoi)!r}")
    return ids, note


def as_streams(data: torch.Tensor, streams: int) -> torch.Tensor:
    """(N,) -> (streams, N // streams): row s is one contiguous stretch of the text."""
    length = data.numel() // streams
    return data[: streams * length].view(streams, length)


# %%
# Part 6b. The model: embedding -> nn.LSTM (one fused kernel per layer, far faster than a Python
# loop over our ScratchLSTMCell) -> linear read-out to one logit per character.
@dataclass
class CharConfig:
    vocab_size: int = 65
    embed_dim: int = 64
    hidden_size: int = 256
    num_layers: int = 1
    dropout: float = 0.0


class CharLSTM(nn.Module):
    def __init__(self, config: CharConfig):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.lstm = nn.LSTM(config.embed_dim, config.hidden_size, config.num_layers, batch_first=True,
                            dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, tokens, state=None):  # tokens: (B, T)
        outputs, state = run_recurrent(self.lstm, self.embed(tokens), state)  # (B, T, H); state: 2 x (layers, B, H)
        return self.head(outputs), state  # logits (B, T, V)


def build_model(config: dict) -> nn.Module:
    """Rebuild the checkpoint's model from its config (the harness and --sample-from use this)."""
    fields = {k: config[k] for k in CharConfig.__dataclass_fields__ if k in config}
    return CharLSTM(CharConfig(**fields))


# %%
# Part 6c. Training and evaluation. The learning rate warms up for the first 5 % of the budget,
# then follows a cosine down to 5 % of its peak; progress is measured in wall-clock time (or in
# steps with --epochs) so the schedule always ends exactly when training does.
def learning_rate(peak: float, progress: float, warmup: float = 0.05) -> float:
    if progress < warmup:
        return peak * progress / warmup
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))
    return peak * (0.05 + 0.95 * cosine)


@torch.no_grad()
def evaluate(model, data, device, streams=64, bptt=256, dtype=None):
    """Mean cross-entropy in nats per character over all of `data`, the LSTM state carried along."""
    model.eval()
    rows = as_streams(data, streams).to(device)
    state, total, count = None, torch.zeros((), device=device), 0
    for start in range(0, rows.shape[1] - 1, bptt):
        inputs = rows[:, start:start + bptt]
        targets = rows[:, start + 1:start + bptt + 1]
        inputs = inputs[:, : targets.shape[1]]
        with autocast(device, dtype):
            logits, state = model(inputs, state)
        total += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
        count += targets.numel()
    model.train()
    return total.item() / count  # one read from the device for the whole pass


def read_train_loss(history, steps: int, loss_sum, first_bad, norm_sum, norm_count, clipped) -> None:
    """The one read from the device per log interval. Into the history go the mean loss over its
    `steps` steps, the mean gradient norm before clipping (over the steps whose norm was finite)
    and how many steps were clipped; the sums go back to zero. A loss that was not finite is a
    LabError naming its first step (kept on the device until now)."""
    total, bad, norms, counted, clips = torch.stack(
        [loss_sum.float(), first_bad.float(), norm_sum.float(), norm_count.float(), clipped.float()]).tolist()
    if bad >= 0:
        raise LabError(f"the training loss became NaN or infinite at step {int(bad)}; try a lower --lr")
    history["train_loss"].append(total / steps)
    history["grad_norm"].append(norms / max(counted, 1))
    history["clipped_steps"].append(clips)
    history["interval_steps"].append(steps)
    for device_sum in (loss_sum, norm_sum, norm_count, clipped):
        device_sum.zero_()


def clipped_share(history) -> float:
    """The share of training steps whose gradient norm was over --clip: the --bug no-zero-grad symptom."""
    return sum(history["clipped_steps"]) / max(sum(history["interval_steps"]), 1)


def train_char_lstm(model, train_data, val_data, args, device, dtype, writer: SummaryWriter = None,
                    show_progress=False):
    """TBPTT training under a time budget (or --epochs). Returns the history and step count.
    With a `writer`, the losses and learning rate read at the log lines go to TensorBoard.

    No step waits for the GPU: the loss is summed on the device and read every --log-every steps,
    which is also when the clock is checked for a validation pass."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  betas=(0.9, 0.99))
    scaler = grad_scaler(device, dtype)
    streams = as_streams(train_data, args.batch_size).to(device)  # (B, L)
    chunks_per_epoch = (streams.shape[1] - 1) // args.bptt
    if chunks_per_epoch < 1:
        raise LabError(f"the training text is too short for --batch-size {args.batch_size} x --bptt {args.bptt}")
    total_steps = args.epochs * chunks_per_epoch if args.epochs else None
    print(f"training: {streams.shape[0]} streams x {streams.shape[1]:,} characters, "
          f"{args.bptt}-step TBPTT, {chunks_per_epoch} steps per epoch, "
          + (f"{args.epochs} epochs" if total_steps else f"time budget {args.time_budget:.0f} s")
          + ("" if dtype is None else f", {str(dtype).removeprefix('torch.')} autocast"))
    history = {"time_s": [], "train_loss": [], "grad_norm": [], "clipped_steps": [], "interval_steps": [],
               "val_time_s": [], "val_loss": []}
    start = time.perf_counter()
    step, state, next_report, seconds_to_target = 0, None, args.eval_every, None
    loss_sum = torch.zeros((), device=device)  # summed on the device between two reads
    first_bad = torch.full((), -1, device=device)  # the first step with a NaN/inf loss, -1 while none
    # the gradient norms before clipping: their sum, how many were finite, how many were clipped
    norm_sum, norm_count, clipped = (torch.zeros((), device=device) for _ in range(3))
    read_at = 0  # the step of the last read
    # A bar over the steps (rate, time left). Under a time budget the number of steps is not known
    # in advance: its total is re-estimated from the speed so far at every read. leave=False and
    # bar.write: the log lines stay in the terminal, the bar below them goes when training ends.
    bar = tqdm(total=total_steps, desc="char LSTM", unit="step", leave=False, disable=None if show_progress else True)
    while True:
        elapsed = time.perf_counter() - start
        progress = step / total_steps if total_steps else elapsed / args.time_budget
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args.lr, progress)
        column = (step % chunks_per_epoch) * args.bptt
        if column == 0:
            state = None  # a new pass over the text starts with a fresh memory
        inputs = streams[:, column:column + args.bptt]  # (B, T)
        targets = streams[:, column + 1:column + args.bptt + 1]  # (B, T), shifted by one character
        if state is not None:
            state = tuple(s.detach() for s in state)  # truncate: no gradient into previous chunks
        with autocast(device, dtype):
            logits, state = model(inputs, state)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        # Drill: --bug no-zero-grad skips the next line, so each step's gradients add onto the earlier
        # ones. Symptom: clipping hides the pile-up (it shrinks the sum back to --clip every step), so
        # the loss only learns more slowly, but the gradient norm before clipping sits above --clip on
        # nearly every step: metrics.json "clipped_share" (one epoch of tiny Shakespeare, measured:
        # 99.4% of the steps bugged, 0.2% clean). Tool: the gradient norm (clip_grad_norm_ returns
        # it), printed every few steps.
        if args.bug != "no-zero-grad":
            optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        norm = nn.utils.clip_grad_norm_(model.parameters(), args.clip)  # tames the occasional exploding step
        finite = torch.isfinite(norm)                  # a skipped fp16 step has an infinite norm: left out
        norm_sum += torch.where(finite, norm.float(), 0.0)
        norm_count += finite
        clipped += finite & (norm > args.clip)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        bar.update()
        loss_sum += loss.detach()
        first_bad = torch.where(torch.isfinite(loss.detach()) | (first_bad >= 0), first_bad, step)
        if step % args.log_every:
            continue  # nothing read from the GPU on this step
        read_train_loss(history, step - read_at, loss_sum, first_bad, norm_sum, norm_count, clipped)
        history["time_s"].append(time.perf_counter() - start)
        read_at = step
        if not total_steps:
            bar.total = round(step * args.time_budget / history["time_s"][-1])
        bar.set_postfix(train_loss=f"{history['train_loss'][-1]:.3f}")   # the value just read
        if writer is not None:
            writer.add_scalar("loss/train", history["train_loss"][-1], step)
            writer.add_scalar("lr", optimizer.param_groups[0]["lr"], step)   # a Python float: no GPU read
        if history["time_s"][-1] >= next_report:
            next_report += args.eval_every
            val_loss = evaluate(model, val_data, device, dtype=dtype)
            now = time.perf_counter() - start
            history["val_time_s"].append(now)
            history["val_loss"].append(val_loss)
            if seconds_to_target is None and val_loss <= TARGET_VAL_LOSS:
                seconds_to_target = now
            left = (total_steps - step) * now / step if total_steps else args.time_budget - now
            bar.write(f"  step {step:5d}  epoch {step / chunks_per_epoch:4.2f}  train {history['train_loss'][-1]:.3f}  "
                      f"val {val_loss:.3f} nats/char  {step * inputs.numel() / now:,.0f} chars/s  "
                      f"lr {optimizer.param_groups[0]['lr']:.1e}  {left:4.0f} s left")
            if writer is not None:
                writer.add_scalar("loss/val", val_loss, step)
                writer.flush()
    bar.close()
    if step > read_at:  # the steps since the last read: their loss, and the NaN guard
        read_train_loss(history, step - read_at, loss_sum, first_bad, norm_sum, norm_count, clipped)
        history["time_s"].append(time.perf_counter() - start)
    return history, step, step / chunks_per_epoch, seconds_to_target


@torch.no_grad()
def sample(model, prompt_ids, length, temperature, device, generator):
    """Feed the prompt, then draw one character at a time from softmax(logits / temperature)."""
    model.eval()
    logits, state = model(torch.tensor([prompt_ids], device=device))
    drawn = []
    for _ in range(length):
        probs = torch.softmax(logits[0, -1].float() / temperature, dim=-1).cpu()
        next_id = torch.multinomial(probs, 1, generator=generator).item()
        drawn.append(next_id)
        logits, state = model(torch.tensor([[next_id]], device=device), state)
    return drawn


def draw_samples(model, chars, prompt_ids, args, device) -> list:
    """One sample of --sample-chars characters after the prompt at --temperature and at 1.0."""
    generator = torch.Generator().manual_seed(args.seed)
    samples = []
    for temperature in sorted({args.temperature, 1.0}):
        drawn = sample(model, prompt_ids, args.sample_chars, temperature, device, generator)
        samples.append(f"--- temperature {temperature} ---\n"
                       + "".join(chars[i] for i in prompt_ids + drawn) + "\n")
    return samples


def plot_char_history(history, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["time_s"], history["train_loss"], color="0.6", lw=0.8, label="train (mean over --log-every steps)")
    ax.plot(history["val_time_s"], history["val_loss"], "o-", color="C3", label="validation (all held-out text)")
    ax.axhline(TARGET_VAL_LOSS, color="k", ls="--", lw=0.8, label=f"target {TARGET_VAL_LOSS} nats/char")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_ylim(top=min(4.5, max(history["train_loss"][:1] + [3.0])))
    ax.set_title("Character-level LSTM on tiny Shakespeare")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


# %%
# Part 6d. Checkpoints: the state_dict, the config that rebuilds the model, the vocabulary, and a
# few inputs with the outputs the model gave, so anyone can check a reload reproduces it. Written
# to a temporary file and renamed, so an interrupted save never leaves a broken checkpoint.
def save_checkpoint(model, config: CharConfig, chars: str, sample_inputs, path: Path):
    model.eval()
    with torch.no_grad():
        sample_outputs = model(sample_inputs)
    payload = {"lab": LAB_NAME, "model": {k: v.cpu() for k, v in model.state_dict().items()},
               "config": {**asdict(config), "chars": chars}, "sample_inputs": sample_inputs.cpu(),
               "sample_outputs": (sample_outputs[0].cpu(), tuple(s.cpu() for s in sample_outputs[1]))}
    torch_save_atomically(payload, path)


def load_checkpoint(path: Path, device):
    """Returns (model, chars). A missing, corrupt or foreign file is a LabError that says which."""
    if not path.is_file():
        raise LabError(f"checkpoint {path} does not exist; train first (it is saved as "
                       f"<out-dir>/char_lstm.pt) or give the right path to --sample-from")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated download, not a torch file at all
        raise LabError(f"checkpoint {path} cannot be read: the file is truncated or corrupt ({one_line(err)})") from None
    needed = set(CharConfig.__dataclass_fields__) | {"chars"}
    config = saved.get("config") if isinstance(saved, dict) else None
    written_by = saved.get("lab", LAB_NAME) if isinstance(saved, dict) else LAB_NAME
    if written_by != LAB_NAME or not isinstance(config, dict) or not needed <= config.keys() or "model" not in saved:
        origin = f"lab {written_by}" if written_by != LAB_NAME else "another lab or program"
        raise LabError(f"checkpoint {path} is from {origin}, not this lab's character LSTM "
                       f"({LAB_NAME}: its config has {', '.join(sorted(needed))}); give --sample-from a "
                       "char_lstm.pt written by this lab")
    try:
        model = build_model(config)
        model.load_state_dict(saved["model"])
    except Exception as err:  # the right kind of file, but the weights do not fit the config
        raise LabError(f"checkpoint {path} does not fit this lab's character LSTM ({one_line(err)})") from None
    return model.to(device), config["chars"]


def checkpoint_reproduces(path: Path, device) -> bool:
    """Rebuild the model from the file alone, as a user of it would, and rerun its sample inputs.
    The comparison happens on the CPU, where the saved outputs are."""
    model, _ = load_checkpoint(path, device)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        logits, _ = model.eval()(saved["sample_inputs"].to(device))
    return torch.allclose(logits.float().cpu(), saved["sample_outputs"][0].float(), atol=1e-5)


# %%
# The flags: every number is checked before anything runs (the type= functions of the plumbing cell).
def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where the Shakespeare model trains (auto: the accelerator if any); "
                             "parts 1-5 are tiny and always run on the CPU")
    parser.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                        help="autocast dtype on CUDA (auto: bf16 where the GPU has it natively, else fp16 "
                             "with a GradScaler); the CPU trains in fp32")
    parser.add_argument("--seed", type=int, default=0, help="random seed for weights, data order and sampling")
    parser.add_argument("--data-dir", type=Path, default=Path("./data"),
                        help="folder holding tinyshakespeare/input.txt (downloaded there on first use)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs") / LAB_NAME, help="where outputs go")
    parser.add_argument("--smoke", action="store_true",
                        help="run every code path in seconds on generated text (no network); numbers are not results")
    parser.add_argument("--time-budget", type=positive_float, default=100.0,
                        help="seconds of Shakespeare training (the whole default run then takes ~2 min 20 s on 2 CPU cores)")
    parser.add_argument("--epochs", type=whole_number, default=0,
                        help="train this many full passes over the text instead of the time budget (0: use the budget)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="parallel text streams per step")
    parser.add_argument("--bptt", type=positive_int, default=64, help="characters per step: how far gradients flow back")
    parser.add_argument("--lr", type=positive_float, default=6e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=number(float, at_least=0), default=0.01,
                        help="AdamW weight decay")
    parser.add_argument("--clip", type=positive_float, default=1.0, help="gradient-norm clipping threshold")
    parser.add_argument("--hidden-size", type=positive_int, default=256, help="LSTM units per layer")
    parser.add_argument("--layers", type=positive_int, default=1, help="stacked LSTM layers")
    parser.add_argument("--dropout", type=probability, default=0.0,
                        help="dropout between LSTM layers (needs --layers > 1)")
    parser.add_argument("--eval-every", type=positive_float, default=30.0, help="seconds between validation passes")
    parser.add_argument("--log-every", type=positive_int, default=50,
                        help="steps between reads of the training loss from the device (each read waits for a GPU)")
    parser.add_argument("--prompt", default="ROMEO:", help="text the samples start from")
    parser.add_argument("--sample-chars", type=positive_int, default=500, help="characters per sample")
    parser.add_argument("--temperature", type=positive_float, default=0.8,
                        help="sampling temperature (lower: safer text)")
    parser.add_argument("--sample-from", type=Path, default=None,
                        help="skip training: load this checkpoint and only print samples")
    parser.add_argument("--bug", default=None, choices=["no-zero-grad"],
                        help="a debugging drill: plant this bug in the char-LSTM's training step and watch "
                             "for its symptom (the '# Drill:' comment in train_char_lstm says which)")
    return parser


# %%
# Putting it together: the seven parts in order, metrics.json and a summary.
def run_basics(args, out_dir):
    """Parts 1-5 on the CPU: a few seconds in all."""
    steps = lambda full: 5 if args.smoke else full  # noqa: E731 (training steps per demo)
    print("\n== Part 1: a vanilla RNN cell by hand vs nn.RNNCell (same weights, 20 steps)")
    torch.manual_seed(args.seed)
    inputs = torch.randn(4, 20, 10)
    rnn_diff = compare_cells(ScratchRNNCell(10, 16), nn.RNNCell(10, 16), inputs)
    print(f"  max |ours - PyTorch| = {rnn_diff:.2e}  (float32 round-off: the same function)")

    print("\n== Part 2: the vanishing gradient")
    curves = vanishing_gradient_demo(out_dir)
    for name, curve in curves.items():
        print(f"  {name:22s} gradient 1 step back {curve[1]:.1e}, 50 steps back {curve[50]:.1e}")
    ratio = curves["LSTM, forget bias 1"][50] / max(curves["vanilla RNN (tanh)"][50], 1e-45)
    print(f"  50 steps back, the LSTM (forget bias 1) passes {ratio:.0e} times more gradient than the "
          "vanilla RNN: that gap is the vanishing gradient")

    print("\n== Part 3: an LSTM cell by hand vs nn.LSTMCell (same weights, 20 steps)")
    lstm_diff = compare_cells(ScratchLSTMCell(10, 16), nn.LSTMCell(10, 16), inputs)
    print(f"  max |ours - PyTorch| = {lstm_diff:.2e}")

    print("\n== Part 4: forecasting noisy sums of sines, LSTM vs GRU (hidden 64, same data and steps)")
    forecast = forecasting_demo(out_dir, steps=steps(1500), seed=args.seed, show_progress=not args.smoke)
    for kind in ("lstm", "gru"):
        r = forecast[kind]
        print(f"  {kind.upper():4s} {r['recurrent_params']:6,} recurrent parameters  {r['ms_per_step']:5.1f} ms/step  "
              f"one-step train MSE {r['final_train_mse']:.4f}  50-step forecast RMSE {r['forecast_rmse']:.3f}")
    print(f"  baselines over the same 50 steps: repeat the last value {forecast['repeat_last_value_rmse']:.3f}, "
          f"predict zero {forecast['predict_zero_rmse']:.3f} (the noise alone has RMSE 0.05)")

    print("\n== Part 5: a bidirectional LSTM")
    bidirectional_shapes()
    bidir = bidirectional_demo(steps=steps(120), seed=args.seed)
    print(f"  'is the next digit larger?': one-way LSTM {bidir['unidirectional']:.1%} (it can only guess from "
          f"the current digit: at best 70%), bidirectional {bidir['bidirectional']:.1%} (it reads the next digit)")
    return {"rnn_cell_max_abs_diff": rnn_diff, "lstm_cell_max_abs_diff": lstm_diff,
            "gradient_50_steps_back": {k: v[50] for k, v in curves.items()},
            "forecast_lstm_vs_gru": forecast, "bidirectional_accuracy": bidir}


def run_sampling_only(args, device):
    model, chars = load_checkpoint(args.sample_from, device)
    stoi = {c: i for i, c in enumerate(chars)}
    prompt_ids, note = encode_prompt(args.prompt, stoi)
    if note:
        print(note)
    generator = torch.Generator().manual_seed(args.seed)
    text = "".join(chars[i] for i in prompt_ids + sample(model, prompt_ids, args.sample_chars,
                                                            args.temperature, device, generator))
    print(text)


def run(args):
    # Check every input before anything is downloaded, written or trained.
    wall_start = time.perf_counter()
    data_dir, out_dir = folder(args.data_dir, "--data-dir"), folder(args.out_dir, "--out-dir")
    device = pick_device(args.device)
    dtype = pick_precision(args.precision, device)
    with fast_cuda_kernels(device):
        lesson(args, device, dtype, data_dir, out_dir, wall_start)


def lesson(args, device, dtype, data_dir, out_dir, wall_start):
    """Everything after run() has checked the inputs: the six parts, or only sampling."""
    torch.manual_seed(args.seed)
    if args.sample_from is not None:
        run_sampling_only(args, device)
        return

    # The corpus and the prompt come before minutes of training.
    if args.smoke:
        text = generated_play(40_000, args.seed)
        args.time_budget, args.eval_every, args.log_every = 2.0, 1.0, 5
        args.hidden_size, args.sample_chars = 64, 100
    else:
        text = load_shakespeare(data_dir)
    chars, stoi = build_vocabulary(text)
    prompt_ids, prompt_note = encode_prompt(args.prompt, stoi)
    if prompt_note:
        print(prompt_note)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"lab {LAB_NAME}: Shakespeare model on {device}, parts 1-5 on cpu"
          + ("  [SMOKE: generated text, a few steps, numbers are not results]" if args.smoke else ""))

    basics = run_basics(args, out_dir)

    print("\n== Part 6: character-level LSTM on " + ("generated text (smoke)" if args.smoke else "tiny Shakespeare"))
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    config = CharConfig(vocab_size=len(chars), hidden_size=args.hidden_size, num_layers=args.layers,
                        dropout=args.dropout)
    torch.manual_seed(args.seed)
    model = CharLSTM(config).to(device)
    print(f"  {len(text):,} characters, vocabulary of {len(chars)}; {len(train_data):,} train / "
          f"{len(val_data):,} validation; model {sum(p.numel() for p in model.parameters()):,} parameters")
    # TensorBoard (`tensorboard --logdir runs/06_rnn_lstm/tensorboard`): the training and validation
    # losses and the learning rate against the step, as read at the log lines, and the samples as text.
    writer = SummaryWriter(out_dir / "tensorboard")
    try:
        train_start = time.perf_counter()
        history, steps, epochs_done, seconds_to_target = train_char_lstm(
            model, train_data, val_data, args, device, dtype, writer, show_progress=not args.smoke)
        train_time = time.perf_counter() - train_start
        val_loss = evaluate(model, val_data, device, dtype=dtype)
        writer.add_scalar("loss/val", val_loss, steps)
        samples = draw_samples(model, chars, prompt_ids, args, device)
        for text in samples:                     # two spaces before each newline: markdown keeps the lines
            writer.add_text("samples", text.replace("\n", "  \n"), steps)
    finally:
        writer.close()
    history["val_time_s"].append(time.perf_counter() - train_start)
    history["val_loss"].append(val_loss)
    if seconds_to_target is None and val_loss <= TARGET_VAL_LOSS:
        seconds_to_target = time.perf_counter() - train_start
    print(f"  final validation loss {val_loss:.3f} nats/char ({val_loss / math.log(2):.3f} bits/char) "
          f"after {steps} steps ({epochs_done:.2f} epochs) in {train_time:.0f} s")
    share = clipped_share(history)
    print(f"  gradient norm before clipping: {history['grad_norm'][0]:.2f} (mean of the first {args.log_every} "
          f"steps), {history['grad_norm'][-1]:.2f} (the last); over --clip {args.clip:g} on {share:.0%} of the "
          f"steps (clipped_share; near 100% means gradients pile up{': --bug ' + args.bug if args.bug else ''})")
    plot_char_history(history, out_dir / "char_lstm_loss.png")

    checkpoint = out_dir / "char_lstm.pt"
    save_checkpoint(model, config, chars, val_data[:64].view(2, 32).to(device), checkpoint)
    same = checkpoint_reproduces(checkpoint, device)
    print(f"  checkpoint {checkpoint} reloads and reproduces its predictions: {same}")

    print("\n" + "\n".join(samples))
    (out_dir / "samples.txt").write_text("\n".join(samples), encoding="utf-8")

    metrics = {
        "lab": LAB_NAME, "smoke": args.smoke, "device": str(device), "torch_version": torch.__version__,
        "wall_time_s": time.perf_counter() - wall_start, "train_time_s": train_time,
        "steps": steps, "epochs": epochs_done, "val_loss": val_loss, "val_bits_per_char": val_loss / math.log(2),
        "target_val_loss": TARGET_VAL_LOSS, "reached_target": val_loss <= TARGET_VAL_LOSS,
        "chars_per_s": steps * args.batch_size * args.bptt / train_time,
        "config": asdict(config), "batch_size": args.batch_size, "bptt": args.bptt, "lr": args.lr,
        "time_budget_s": args.time_budget, "precision": "fp32" if dtype is None else str(dtype).removeprefix("torch."),
        "checkpoint_reproduces": same, **basics,
        # the debugging drill (--bug): which bug was planted, and its symptom, the share of clipped steps
        "bug": args.bug, "clipped_share": share, "grad_norm_first": history["grad_norm"][0],
        "grad_norm_last": history["grad_norm"][-1],
        # training seconds until a validation pass reached the target; null when none did
        "seconds_to_target": seconds_to_target,
    }
    write_json_atomically(metrics, out_dir / "metrics.json")
    print(f"\nSummary: a {config.hidden_size}-unit LSTM trained {train_time:.0f} s ({epochs_done:.2f} epochs); "
          f"validation loss {val_loss:.3f} nats/char (target <= {TARGET_VAL_LOSS}: "
          f"{'reached' if val_loss <= TARGET_VAL_LOSS else 'NOT reached'}); whole run "
          f"{metrics['wall_time_s']:.0f} s.\n  Outputs in {out_dir}: metrics.json, vanishing_gradient.png, "
          f"sines_forecast.png, char_lstm_loss.png, samples.txt, char_lstm.pt, tensorboard/.\n  Sample again: python "
          f"week3_rnn/06_rnn_lstm.py --sample-from {checkpoint} --prompt 'JULIET:' --temperature 0.7\n"
          f"  Train longer: --time-budget 600 (or --epochs 5), bigger: --hidden-size 512 --layers 2 --dropout 0.2")


# %%
# Notes: how the measured figures of the docstring came about.
#   Smoke run (--smoke): 5.4-5.6 s wall on an idle machine, measured before the GPU changes of this
#   version (mixed precision, fewer reads from the device); on a busy shared machine the two versions
#   took the same CPU time (10.5-11.0 s of one thread each).


# %%
# Predict, then run. Write your prediction down before each command; the lab prints the answer.
# 1. Run: python week3_rnn/06_rnn_lstm.py --sample-from runs/06_rnn_lstm/char_lstm.pt --temperature 0.3
#    Predict: next to the default run's sample at 0.8, will the text repeat the same words and names
#    more often or invent more new words?
#    Answer: the sample it prints; the default run's "--- temperature 0.8 ---" one is in samples.txt.
# 2. Run: python week3_rnn/06_rnn_lstm.py --bptt 8
#    Predict: gradients now flow back 8 characters instead of 64 (the state is still carried over):
#    will the validation loss end above or below the default run's, and will it take more steps?
#    Answer: the "final validation loss ... after N steps" line; val_loss and steps in metrics.json.
# 3. Run: python week3_rnn/06_rnn_lstm.py --hidden-size 64
#    Predict: how many times fewer parameters than the 256-unit model, and how much higher the loss?
#    Answer: the "model N parameters" line and the "final validation loss" line; val_loss in metrics.json.
# 4. Run: python week3_rnn/06_rnn_lstm.py --bug no-zero-grad --epochs 1
#    Predict: on what share of the steps will the gradient norm be over --clip 1 (--epochs 1 without
#    the bug: 1 step of 490), and will the loss still come down?
#    Answer: the "gradient norm before clipping ... over --clip 1 on N% of the steps" line and the
#    validation lines; clipped_share and val_loss in metrics.json.


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

"""Lab 08 - The Transformer from scratch, then a character language model (curriculum days 22-25).

What you learn
  Attention     scaled dot-product attention written by hand, shown equal to
                `F.scaled_dot_product_attention` with and without a causal mask; multi-head attention
                by hand, shown equal to `nn.MultiheadAttention` once its weights are copied across.
  Positions     the sinusoidal encoding of "Attention Is All You Need" next to a learned one (what
                each looks like, and what the learned one discovers by itself).
  LayerNorm     written by hand and shown equal to `nn.LayerNorm`; pre-norm vs post-norm blocks,
                and why GPT-2 and almost every model since put the norm first.
  A GPT         a decoder-only Transformer trained on tiny Shakespeare, one character at a time,
                with the fast built-in attention once the hand-built one is proven equal; sampling
                with temperature and top-k; a heatmap of what every head attends to in one line.

Run it
  Terminal:  python week4_transformer_vae/08_transformer.py           (add --smoke for a quick pass)
             python week4_transformer_vae/08_transformer.py --time-budget 600 --n-layer 6 --n-embd 192
             python week4_transformer_vae/08_transformer.py --checkpoint runs/08_transformer/model.pt \\
                 --prompt "ROMEO:" --temperature 0.8 --top-k 10        (sample from a saved model)
             python week4_transformer_vae/08_transformer.py --device cuda --precision fp16   (a T4's choice)
             tensorboard --logdir runs/08_transformer/tensorboard
             python week4_transformer_vae/08_transformer.py --bug no-causal-mask   (a debugging drill)
  Colab:     Runtime > Change runtime type > GPU, upload this file and run `!python 08_transformer.py`,
             or paste the file into a cell (figures show inline).
  Data:      tiny Shakespeare (1.1 M characters), downloaded on first use from
             https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
             into <data-dir>/tinyshakespeare/input.txt; first 90% train, last 10% validation (as
             nanoGPT splits it).
  Outputs in --out-dir (default runs/08_transformer): metrics.json, model.pt, samples.txt,
  loss_curve.png, attention_heads.png, positional_encodings.png, tensorboard/ (the losses and learning
  rate against the step, the attention of every head, the samples).

How the run is budgeted
  Training stops after --time-budget seconds of wall time (default 135) and the learning rate
  follows a cosine over that budget, so the model is fully annealed when the time is up; then one
  pass over the whole validation split gives the headline figure. The number of steps therefore
  depends on the machine: a faster one takes more steps in the same time and reaches a lower loss.

Measured (default run, `python week4_transformer_vae/08_transformer.py`,
torch 2.14.1)
  2-core CPU: validation loss 1.765 nats/char, the median of 3 runs on an idle machine (1.760,
    1.765, 1.783; target 1.80), after 135 s of training (1,042-1,057 steps, 818,176 parameters);
    whole run 148-149 s in the lab, 150-152 s for the process. The step count, and so the loss,
    depends on the machine's load (the notes cell at the end says how much).
  GPU: not measured yet. On CUDA the run trains in mixed precision (--precision auto: bf16 where
    the GPU has it natively, fp16 with a GradScaler on a T4), with the corpus held on the GPU and
    the training loss read from it once per log line, not every step.
  Smoke run (`--smoke`): 8.8-9.1 s wall.
"""
import argparse
import json
import math
import os
import pickle
import random
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

LAB_NAME = "08_transformer"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TARGET_VAL_LOSS = 1.80  # nats per character, the lab's target for the default run
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
# 1. Scaled dot-product attention by hand. Every query scores every key (a dot product, divided by
# sqrt(d) so the scores do not grow with the head size and saturate the softmax), the softmax turns
# scores into weights that sum to 1, and the output is the weighted mean of the values. A causal
# mask sets the scores of future positions to -inf, so position t only sees positions <= t.
def scaled_dot_product_attention(q, k, v, causal=False):
    """q (..., Tq, d), k (..., Tk, d), v (..., Tk, dv) -> output (..., Tq, dv), weights (..., Tq, Tk)."""
    # Exercise scaled_dot_product_attention: scores = q k^T / sqrt(d), (..., Tq, Tk) (transpose k's
    # last two dimensions, so any leading batch and head dimensions ride along); with causal=True
    # set the scores above the diagonal (a query looking at a later key) to -inf, e.g. with a
    # lower-triangular boolean mask (tril); softmax over the keys (the last dimension) gives the
    # weights; the output is weights @ v. Return (output, weights), as F.scaled_dot_product_attention
    # (is_causal=...) returns the output.
    # Docs: https://pytorch.org/docs/stable/generated/torch.nn.functional.scaled_dot_product_attention.html
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (..., Tq, Tk)
    if causal:
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = scores.softmax(dim=-1)
    return weights @ v, weights


# %%
# 2. Multi-head attention by hand. One matmul makes queries, keys and values for all heads (the
# same (3C, C) weight layout as nn.MultiheadAttention.in_proj_weight, so weights copy straight
# across); the C channels are cut into n_head heads of C/n_head, each head attends on its own, and
# out_proj mixes the heads back together. `by_hand` picks our attention (which also returns the
# weights, for heatmaps) or PyTorch's fused kernel (faster, uses less memory, returns no weights).
class MultiHeadAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.n_head = n_head
        self.in_proj = nn.Linear(n_embd, 3 * n_embd)
        self.out_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x, causal=True, by_hand=False):
        # Exercise multi_head_attention: x (B, T, C) -> (output (B, T, C), weights (B, nh, T, T) or None).
        # in_proj(x) makes q, k and v side by side, (B, T, 3C): split it in three; cut each one's C
        # channels into n_head heads of C // n_head and move the head dimension in front of T,
        # (B, nh, T, hs), so every head attends on its own. With by_hand use our
        # scaled_dot_product_attention (it also returns the weights); otherwise PyTorch's fused
        # F.scaled_dot_product_attention(..., is_causal=causal) and weights None. Then put the heads
        # side by side again, (B, T, C), and mix them with out_proj.
        # Docs: https://pytorch.org/docs/stable/generated/torch.nn.MultiheadAttention.html
        B, T, C = x.shape
        q, k, v = self.in_proj(x).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if by_hand:
            y, weights = scaled_dot_product_attention(q, k, v, causal=causal)  # weights (B, nh, T, T)
        else:
            y, weights = F.scaled_dot_product_attention(q, k, v, is_causal=causal), None
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.out_proj(y), weights


def copy_weights_from_torch(mine: MultiHeadAttention, theirs: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        mine.in_proj.weight.copy_(theirs.in_proj_weight)
        mine.in_proj.bias.copy_(theirs.in_proj_bias)
        mine.out_proj.weight.copy_(theirs.out_proj.weight)
        mine.out_proj.bias.copy_(theirs.out_proj.bias)


# %%
# 3. Positions. Attention by itself ignores order (shuffle the tokens and each output is shuffled
# the same way), so the model adds a vector per position to each token embedding. The sinusoidal
# table needs no training and its dot products depend only on the distance between positions;
# a learned table (GPT's choice) is one more embedding the model fits to the data.
def sinusoidal_positional_encoding(num_positions: int, dim: int) -> torch.Tensor:
    """(num_positions, dim): sin on even channels, cos on odd ones, wavelengths 2*pi ... 10000*2*pi."""
    # Exercise sinusoidal_encoding: the 2017 paper's table, float32 (num_positions, dim). Channel pair
    # (2j, 2j+1) turns at the frequency w_j = 10000 ** (-2j / dim): entry [p, 2j] = sin(p * w_j) and
    # [p, 2j+1] = cos(p * w_j). Make positions (T, 1) times frequencies (dim / 2,) by broadcasting,
    # then fill the even and odd columns (slices 0::2 and 1::2; with an odd dim there is one cosine
    # column fewer than sines).
    # Docs: https://pytorch.org/docs/stable/generated/torch.arange.html
    position = torch.arange(num_positions, dtype=torch.float32)[:, None]  # (T, 1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (dim/2,)
    table = torch.zeros(num_positions, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


# %%
# 4. LayerNorm by hand: normalise each token's C features to mean 0 and variance 1 (the biased
# variance, as PyTorch does), then scale and shift with learned per-feature weights.
class LayerNormByHand(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        # Exercise layer_norm: normalise each token's features (the last dimension of x (..., C)) to
        # mean 0 and variance 1: (x - mean) / sqrt(var + eps), with the biased variance (divide by C,
        # as nn.LayerNorm does; keepdim=True so it broadcasts back), then scale by self.weight and shift
        # by self.bias (each (C,)). Same shape out as in.
        # Docs: https://pytorch.org/docs/stable/generated/torch.nn.LayerNorm.html
        mean = x.mean(dim=-1, keepdim=True)
        variance = x.var(dim=-1, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(variance + self.eps) * self.weight + self.bias


# %%
# 5. The Transformer block, pre-norm or post-norm. Post-norm (the 2017 paper) normalises after each
# residual addition: x = LN(x + f(x)). Every gradient then passes through a LayerNorm per layer,
# and deep post-norm stacks need a careful learning-rate warm-up to train at all. Pre-norm
# (GPT-2 onwards) normalises only the input of each sub-layer: x = x + f(LN(x)). The residual
# stream is a clean sum from the embedding to the output, so gradients reach the first layer
# undiminished and training is stable at higher learning rates. This lab trains pre-norm; the
# run prints the gradient each layer receives under both, and --norm post trains the other.
@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 64        # context length, characters
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128           # width of the residual stream
    pos_encoding: str = "learned"   # or "sinusoidal"
    norm_first: bool = True     # pre-norm (True) or post-norm (False)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, bug: str = None):
        super().__init__()
        C = config.n_embd
        self.norm_first = config.norm_first
        self.bug = bug  # the debugging drill (--bug); None: the block as it should be
        self.ln1 = nn.LayerNorm(C)
        self.attn = MultiHeadAttention(C, config.n_head)
        self.ln2 = nn.LayerNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))

    def forward(self, x, by_hand=False):
        # Drill: --bug no-causal-mask lets every position attend to the characters after it, the
        # answer included; nothing crashes. Symptom: metrics.json "future_leak", how far an earlier
        # position's logits move when only the last character changes: exactly 0 in a clean run,
        # 0.19 with the bug after 150 steps on tiny Shakespeare (measured; the validation loss was
        # then 2.751 against 2.561 clean: the model had not yet learnt to copy the answer; longer
        # runs not measured). Tool: a breakpoint() here, then print weights[0, 0] with by_hand=True:
        # nonzero above the diagonal.
        causal = self.bug != "no-causal-mask"
        if self.norm_first:
            attended, weights = self.attn(self.ln1(x), causal=causal, by_hand=by_hand)
            x = x + attended
            x = x + self.mlp(self.ln2(x))
        else:
            attended, weights = self.attn(x, causal=causal, by_hand=by_hand)
            x = self.ln1(x + attended)
            x = self.ln2(x + self.mlp(x))
        return x, weights


# %%
# 6. The GPT: token embedding + position, a stack of causal blocks, a final LayerNorm (pre-norm
# only: post-norm blocks already end in one) and a linear layer to one logit per character.
# Weights start small (std 0.02) and each block's output projections smaller still (divided by
# sqrt(2 * n_layer)), so the residual stream does not grow with depth at initialisation (GPT-2).
class GPT(nn.Module):
    def __init__(self, config: GPTConfig, bug: str = None):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos_encoding == "learned":
            self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        elif config.pos_encoding == "sinusoidal":
            self.register_buffer("position_table", sinusoidal_positional_encoding(config.block_size, config.n_embd),
                                 persistent=False)
        else:
            raise ValueError(f"pos_encoding must be 'learned' or 'sinusoidal', got {config.pos_encoding!r}")
        self.blocks = nn.ModuleList(Block(config, bug) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd) if config.norm_first else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        for block in self.blocks:
            for projection in (block.attn.out_proj, block.mlp[2]):
                nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, idx):
        """idx (B, T) -> token embedding + position, (B, T, C)."""
        tokens = self.token_embedding(idx)
        if self.config.pos_encoding == "learned":
            return tokens + self.position_embedding.weight[: idx.size(1)]
        # As in the 2017 paper, token embeddings are scaled by sqrt(C) so the fixed table (entries in
        # [-1, 1]) does not drown them.
        return tokens * math.sqrt(self.config.n_embd) + self.position_table[: idx.size(1)]

    def forward(self, idx, by_hand=False):
        """idx (B, T) character ids -> logits (B, T, vocab_size) for the next character."""
        x = self.embed(idx)  # (B, T, C)
        for block in self.blocks:
            x, _ = block(x, by_hand=by_hand)
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def attention_maps(self, idx):
        """Run the hand-built path and return each layer's attention weights, (n_layer, B, nh, T, T)."""
        x = self.embed(idx)
        maps = []
        for block in self.blocks:
            x, weights = block(x, by_hand=True)
            maps.append(weights)
        return torch.stack(maps)


def build_model(config: dict) -> GPT:
    """Rebuild the model a checkpoint describes (its "config" entry)."""
    return GPT(GPTConfig(**config))


@torch.no_grad()
def future_leak(model, idx) -> float:
    """The largest change of any earlier position's logits when only the last character of idx (B, T)
    changes: exactly 0 for a causal model, which never looks ahead (the --bug no-causal-mask symptom)."""
    changed = idx.clone()
    changed[:, -1] = (idx[:, -1] + 1) % model.config.vocab_size
    return (model(changed)[:, :-1].float() - model(idx)[:, :-1].float()).abs().max().item()


# %%
# 7. Proof before use: each hand-built piece against PyTorch's own, on random inputs. Only once
# these agree does the training below use the fused built-ins (F.scaled_dot_product_attention
# and nn.LayerNorm), which are faster and need less memory.
def check_from_scratch_pieces(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 4, 10, 16, generator=generator) for _ in range(3))  # (B, nh, T, hs)
    differences = {}
    for causal in (False, True):
        mine, _ = scaled_dot_product_attention(q, k, v, causal=causal)
        differences[f"attention_causal_{causal}"] = (mine - F.scaled_dot_product_attention(q, k, v, is_causal=causal)).abs().max().item()

    torch.manual_seed(seed)
    theirs = nn.MultiheadAttention(32, 4, batch_first=True)
    mine = MultiHeadAttention(32, 4)
    copy_weights_from_torch(mine, theirs)
    x = torch.randn(2, 10, 32, generator=generator)
    future = torch.ones(10, 10, dtype=torch.bool).triu(1)  # True = may not attend (PyTorch's convention)
    with torch.no_grad():
        expected, expected_weights = theirs(x, x, x, attn_mask=future, average_attn_weights=False)
        got, got_weights = mine(x, causal=True, by_hand=True)
    differences["multi_head_attention"] = max((got - expected).abs().max().item(),
                                              (got_weights - expected_weights).abs().max().item())

    layer_norm, by_hand = nn.LayerNorm(32), LayerNormByHand(32)
    with torch.no_grad():
        for p in (layer_norm.weight, layer_norm.bias):
            p.normal_(generator=generator)
        by_hand.load_state_dict(layer_norm.state_dict())
        differences["layer_norm"] = (by_hand(x * 3 + 1) - layer_norm(x * 3 + 1)).abs().max().item()

    model = GPT(GPTConfig(vocab_size=20, block_size=12, n_layer=2, n_head=2, n_embd=16)).eval()
    idx = torch.randint(0, 20, (2, 12), generator=generator)
    with torch.no_grad():
        differences["gpt_by_hand_vs_fused"] = (model(idx, by_hand=True) - model(idx)).abs().max().item()
    return differences


def gradient_norm_per_layer(norm_first: bool, seed: int, n_layer: int = 8) -> list:
    """At initialisation, the gradient norm reaching each block's attention weights."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=n_layer, n_head=4, n_embd=64, norm_first=norm_first))
    idx = torch.randint(0, 65, (8, 33))
    logits = model(idx[:, :-1])
    F.cross_entropy(logits.reshape(-1, 65), idx[:, 1:].reshape(-1)).backward()
    return [block.attn.in_proj.weight.grad.norm().item() for block in model.blocks]


# %%
# 8. Data: tiny Shakespeare as one long tensor of character ids. A batch is B random windows of
# block_size + 1 characters; the model reads the first block_size and predicts each next one,
# so every window gives block_size training examples at once.
def generated_text(seed: int, length: int = 30_000) -> str:
    """Smoke-mode stand-in: play-shaped text (speaker names, short lines) from a small word list."""
    rng = random.Random(seed)
    words = ("to be or not that is the question whether tis nobler in mind suffer slings and arrows of "
             "outrageous fortune take arms against a sea troubles my lord good sir what say you").split()
    speakers = ("ROMEO", "JULIET", "KING HENRY", "FIRST CITIZEN")
    lines = []
    while sum(map(len, lines)) < length:
        lines.append(rng.choice(speakers) + ":")
        for _ in range(rng.randint(1, 3)):
            line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 9)))
            lines.append(line.capitalize() + rng.choice(".,;!?"))
        lines.append("")
    return "\n".join(lines)[:length]


def load_shakespeare(data_dir: str) -> str:
    path = Path(data_dir) / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        print(f"downloading tiny Shakespeare from {SHAKESPEARE_URL}\n  -> {path}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
                data = response.read()
            partial = path.with_suffix(".part")
            partial.write_bytes(data)
            os.replace(partial, path)  # a broken download never looks like the real file
        except OSError as err:  # URLError, timeouts and unwritable folders are all OSErrors
            reason = " ".join(str(err).split())
            raise LabError(f"could not download tiny Shakespeare ({reason}) from {SHAKESPEARE_URL}. Expected "
                           f"layout: <data-dir>/tinyshakespeare/input.txt, here {path}. Download it yourself and "
                           "place it there, point --data-dir at a folder that has it, or run with --smoke to use "
                           "generated text instead.") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LabError(f"{path} is not UTF-8 text (byte {err.start} cannot be decoded); tiny Shakespeare is plain "
                       f"UTF-8: delete the file and rerun to download it again from {SHAKESPEARE_URL}.") from None
    if len(text) < TINY_SHAKESPEARE_CHARACTERS:
        raise LabError(f"{path} holds {len(text):,} characters; tiny Shakespeare has {TINY_SHAKESPEARE_CHARACTERS:,}, so the file looks truncated: delete it to download it again")
    return text


def encode(text: str, vocab: str) -> torch.Tensor:
    index = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted(set(text) - index.keys())
    if unknown:
        raise LabError(f"characters not in the model's vocabulary: {''.join(unknown)!r}")
    return torch.tensor([index[ch] for ch in text], dtype=torch.long)


def decode(ids, vocab: str) -> str:
    return "".join(vocab[i] for i in ids)


# The whole corpus (1.1 M ids, 9 MB) lives on the training device, and a batch is gathered there
# from random start positions drawn there too: nothing is copied from main memory per step.
def get_batch(data: torch.Tensor, batch_size: int, block_size: int, generator=None):
    """B random windows of `data` (on its device): inputs and next-character targets, (B, T) each."""
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator, device=data.device)
    windows = data[starts[:, None] + torch.arange(block_size + 1, device=data.device)]  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def evaluate(model, data: torch.Tensor, block_size: int, dtype=None, batch_size: int = 64, max_windows=None) -> float:
    """Mean cross-entropy in nats per character over non-overlapping windows of `data` (on the
    model's device); the sum stays there and is read once."""
    model.eval()
    n = (len(data) - 1) // block_size
    starts = torch.arange(n, device=data.device) * block_size
    if max_windows and n > max_windows:
        starts = starts[torch.linspace(0, n - 1, max_windows, device=data.device).long()]  # spread over the split
    total, count = torch.zeros((), device=data.device), 0
    for chunk in starts.split(batch_size):
        windows = data[chunk[:, None] + torch.arange(block_size + 1, device=data.device)]
        with autocast(data.device, dtype):
            logits = model(windows[:, :-1])
        total += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1),
                                 reduction="sum")
        count += windows[:, 1:].numel()
    model.train()
    return total.item() / count


# %%
# 9. Training against the clock. The learning rate warms up over the first 2% of the budget, then
# follows a cosine down to a tenth of its peak by the time the budget (seconds, or steps with
# --max-steps) runs out: a short run is only good if it ends annealed. AdamW decays the weight
# matrices and embeddings, not the biases and LayerNorm gains (nanoGPT's split).
def make_optimizer(model, lr: float, weight_decay: float = 0.1):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99))


def learning_rate(progress: float, peak: float, warmup: float = 0.02, floor: float = 0.1) -> float:
    if progress < warmup:
        return peak * (progress + 1e-3) / warmup
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))
    return peak * (floor + (1 - floor) * cosine)


def read_losses(history: dict, losses: list, times: list, first_bad: torch.Tensor, smoothed, lr: float):
    """Move one log interval's losses from the device into `history` (one read from the GPU per log
    line instead of one per step), stop at the first non-finite one, and return the smoothed loss."""
    if first_bad >= 0:
        raise LabError(f"the loss became NaN or infinite at step {int(first_bad)}; nothing was saved. "
                       f"Try a smaller --lr (now {lr:g}).")
    values = torch.stack(losses).tolist()
    for value in values:
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
    history["train_loss"] += values
    history["time"] += times
    losses.clear()
    times.clear()
    return smoothed


MIN_STEPS_PER_LOG = 4


def log_scalars(writer: SummaryWriter, history: dict, first_step: int, step: int, val_estimate, lr: float) -> None:
    """TensorBoard, at a log line: every training loss of the interval just read (steps first_step
    to step), the validation estimate and the learning rate."""
    interval = history["train_loss"][-(step - first_step + 1):]
    for offset, value in enumerate(interval):
        writer.add_scalar("loss/train", value, first_step + offset)
    if val_estimate is not None:
        writer.add_scalar("loss/val_estimate", val_estimate, step)
    writer.add_scalar("lr", lr, step)


def train(model, train_ids, val_ids, args, device, dtype, writer=None, show_progress=False) -> dict:
    """Train against the clock; train_ids and val_ids are already on `device`. With a TensorBoard
    WRITER, each log line's losses and learning rate also go there, against the step."""
    config = model.config
    optimizer = make_optimizer(model, args.lr)
    scaler = grad_scaler(device, dtype)
    generator = torch.Generator(device=device).manual_seed(args.seed)  # batches are drawn where the data is
    history = {"time": [], "train_loss": [], "eval_time": [], "val_loss_estimate": []}
    tokens_per_step = args.batch_size * config.block_size
    eval_every = args.time_budget / 8
    started = time.perf_counter()
    next_eval, smoothed, step = eval_every, None, 0
    losses, times = [], []  # this log interval's losses, still on the device, and when each step ended
    first_bad = torch.full((), -1, device=device)  # the first step whose loss is not finite
    print(f"\n== Training: {sum(p.numel() for p in model.parameters()):,} parameters, batch "
          f"{args.batch_size} x {config.block_size} characters, peak lr {args.lr:g}, "
          f"budget {args.time_budget:g} s" + (f" or {args.max_steps} steps" if args.max_steps else "") + " ==")
    # The bar counts percent of the budget (time, or steps with --max-steps), so its time left is
    # right either way; it shows the step count, never a value from the GPU.
    bar = tqdm(total=100, desc="training", leave=False, disable=None if show_progress else True,
               bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")
    while True:
        elapsed = time.perf_counter() - started
        progress = max(elapsed / args.time_budget, step / args.max_steps if args.max_steps else 0.0)
        if not bar.disable:
            bar.update(100 * min(progress, 1.0) - bar.n)
            bar.set_postfix_str(f"step {step}, {step / max(elapsed, 1e-9):.1f} steps/s", refresh=False)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(progress, args.lr)
        x, y = get_batch(train_ids, args.batch_size, config.block_size, generator)
        with autocast(device, dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        first_bad = torch.where(~torch.isfinite(loss) & (first_bad < 0), step, first_bad)
        losses.append(loss.detach())
        times.append(time.perf_counter() - started)
        # Log (and read from the GPU) when the clock says so, but never more often than every
        # MIN_STEPS_PER_LOG steps: on a slow device every step could pass the clock's mark.
        if (times[-1] >= next_eval and len(losses) >= MIN_STEPS_PER_LOG) or step == args.max_steps:
            first_step = step - len(losses) + 1
            smoothed = read_losses(history, losses, times, first_bad, smoothed, args.lr)
            estimate = evaluate(model, val_ids, config.block_size, dtype, max_windows=160)
            now = time.perf_counter() - started
            history["eval_time"].append(now)
            history["val_loss_estimate"].append(estimate)
            if writer:
                log_scalars(writer, history, first_step, step, estimate, optimizer.param_groups[0]["lr"])
            bar.write(f"  step {step:5d}  {now:6.1f} s  train {smoothed:.3f}  val~ {estimate:.3f}  "  # above the bar
                      f"lr {optimizer.param_groups[0]['lr']:.2e}  {step * tokens_per_step / now:,.0f} chars/s  "
                      f"{max(0.0, args.time_budget - now):5.1f} s left")
            next_eval += eval_every
    bar.close()
    if losses:  # the steps since the last log line
        first_step = step - len(losses) + 1
        read_losses(history, losses, times, first_bad, smoothed, args.lr)
        if writer:
            log_scalars(writer, history, first_step, step, None, optimizer.param_groups[0]["lr"])
    history["steps"] = step
    history["train_time_s"] = time.perf_counter() - started
    history["tokens_per_s"] = step * tokens_per_step / history["train_time_s"]
    return history


# %%
# 10. Sampling. The model gives logits for the next character; dividing them by a temperature
# < 1 sharpens the distribution (safer, more repetitive text), > 1 flattens it (more surprising,
# more misspelt). Top-k keeps only the k most likely characters before sampling.
@torch.no_grad()
def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None, generator=None):
    """idx (B, T0) -> (B, T0 + max_new_tokens); the context is cropped to the last block_size ids."""
    model.eval()
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.config.block_size:])[:, -1, :].float() / temperature  # (B, vocab)
        if top_k:
            kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
            logits = logits.masked_fill(logits < kth_best, float("-inf"))
        next_id = torch.multinomial(logits.softmax(dim=-1).cpu(), 1, generator=generator).to(idx.device)
        idx = torch.cat([idx, next_id], dim=1)
    return idx


# %%
# 11. Figures: the loss curve, the attention of every head on one line of text, and the two
# positional encodings side by side.
def pyplot():
    """matplotlib's pyplot, drawing to files (Agg) unless we are in a notebook."""
    import matplotlib
    if not in_notebook():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    if in_notebook():
        pyplot().show()
    pyplot().close(fig)


def plot_loss_curve(history: dict, val_loss: float, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["time"], history["train_loss"], lw=0.6, alpha=0.6, label="train batch loss")
    ax.plot(history["eval_time"], history["val_loss_estimate"], "o-", label="validation (estimate)")
    ax.axhline(val_loss, color="k", ls=":", label=f"final validation {val_loss:.3f}")
    ax.axhline(TARGET_VAL_LOSS, color="tab:red", ls="--", lw=0.8, label=f"target {TARGET_VAL_LOSS}")
    ax.set(xlabel="training time (s)", ylabel="cross-entropy (nats/char)", ylim=(1.0, 4.5),
           title="Character-level GPT on tiny Shakespeare")
    ax.legend()
    save_figure(fig, path)


def show_char(ch: str) -> str:
    return {"\n": "\\n", " ": "_"}.get(ch, ch)


def plot_attention(maps: torch.Tensor, text: str, path: Path) -> None:
    """maps (n_layer, nh, T, T): one heatmap per head, rows = query character, columns = key."""
    plt = pyplot()
    n_layer, n_head = maps.shape[:2]
    labels = [show_char(ch) for ch in text]
    fig, axes = plt.subplots(n_layer, n_head, figsize=(3.2 * n_head, 3.2 * n_layer), squeeze=False)
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            ax.imshow(maps[layer, head].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks(range(len(text)), labels, fontsize=5)
            ax.set_yticks(range(len(text)), labels, fontsize=5)
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
    fig.suptitle(f"Causal self-attention on {text!r}: row = the character predicting the next, "
                 "column = what it looks at", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def mean_look_back(maps: torch.Tensor) -> torch.Tensor:
    """(n_layer, nh): how many characters back each head looks, on average over query positions."""
    T = maps.size(-1)
    distance = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).clamp(min=0).float()  # (T, T)
    return (maps * distance).sum(-1).mean(-1)


def cosine_similarity_matrix(table: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(table, dim=-1)
    return unit @ unit.T


def plot_positional_encodings(sinusoidal: torch.Tensor, learned, path: Path) -> None:
    plt = pyplot()
    panels = [("sinusoidal table (position x channel)", sinusoidal, "RdBu"),
              ("sinusoidal: cosine similarity of positions", cosine_similarity_matrix(sinusoidal), "viridis")]
    if learned is not None:
        panels.append(("learned (trained): cosine similarity", cosine_similarity_matrix(learned), "viridis"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4))
    for ax, (title, values, cmap) in zip(axes, panels):
        image = ax.imshow(values.numpy(), cmap=cmap, aspect="auto")
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    save_figure(fig, path)


def neighbour_vs_distant_similarity(table: torch.Tensor) -> tuple:
    similarity = cosine_similarity_matrix(table)
    return similarity.diagonal(1).mean().item(), similarity.diagonal(table.size(0) // 2).mean().item()


# %%
# 12. Checkpoints: written atomically (torch_save_atomically, in the plumbing cell); loaded with
# weights_only=True and checked against this lab's model before use, so a file from another lab or
# another architecture gets a clear message.
def load_checkpoint(path: str, device) -> tuple:
    path = Path(path)
    if not path.is_file():
        raise LabError(f"checkpoint {path} does not exist. Train first: the default run writes "
                       f"runs/{LAB_NAME}/model.pt.")
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as err:
        raise LabError(f"checkpoint {path} could not be read ({type(err).__name__}): it is truncated or not a "
                       "PyTorch checkpoint. Retrain to write a new one.")
    missing = {"model", "config", "vocab"} - set(saved) if isinstance(saved, dict) else {"model", "config", "vocab"}
    if missing:
        raise LabError(f"{path} is not a checkpoint of this lab (another lab's file?): it lacks {sorted(missing)}.")
    expected = {f.name for f in fields(GPTConfig)}
    found = set(saved["config"])
    if found != expected:
        raise LabError(f"{path} comes from another lab or another architecture: its config has {sorted(found - expected)} "
                       f"that this lab's GPT does not, and lacks {sorted(expected - found)}.")
    try:
        model = build_model(saved["config"]).to(device)
        model.load_state_dict(saved["model"])
    except (RuntimeError, ValueError, TypeError) as err:
        reasons = [line.strip() for line in str(err).splitlines()[1:4] if line.strip()] or [str(err)]
        raise LabError(f"the weights in {path} do not fit the GPT its config describes: " + "; ".join(reasons))
    return model, saved["vocab"]


def sample_from_checkpoint(args, device) -> None:
    model, vocab = load_checkpoint(args.checkpoint, device)
    prompt = args.prompt or "\n"
    idx = encode(prompt, vocab)[None].to(device)
    generator = torch.Generator().manual_seed(args.seed)
    out = generate(model, idx, args.sample_length, args.temperature, args.top_k, generator)
    print(decode(out[0].tolist(), vocab))


# %%
# 13. The flags: every number is checked before anything runs (the type= functions of the plumbing cell).
def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to train; auto = the accelerator if any, else cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                        help="autocast dtype on CUDA: auto = bf16 where the GPU has it natively, else fp16 with a "
                             "GradScaler; CPU and MPS train in fp32")
    parser.add_argument("--seed", type=int, default=0, help="random seed (weights, batches, samples)")
    parser.add_argument("--data-dir", default="./data", help="holds tinyshakespeare/input.txt (downloaded if absent)")
    parser.add_argument("--out-dir", default=f"runs/{LAB_NAME}", help="where metrics, figures and model.pt go")
    parser.add_argument("--smoke", action="store_true",
                        help="quick pass over every code path on generated text, a tiny model, a few steps")
    parser.add_argument("--time-budget", type=positive_float, default=None,
                        help="seconds of training; the learning-rate schedule spans them (default 135; smoke 3)")
    parser.add_argument("--max-steps", type=whole_number, default=0,
                        help="stop after this many steps if that comes before the time budget (0 = no cap)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="windows per step (default 32; smoke 8)")
    parser.add_argument("--lr", type=positive_float, default=4e-3, help="peak learning rate of AdamW")
    parser.add_argument("--block-size", type=positive_int, default=None, help="context length in characters (default 64)")
    parser.add_argument("--n-layer", type=positive_int, default=None, help="Transformer blocks (default 4)")
    parser.add_argument("--n-head", type=positive_int, default=None, help="attention heads per block (default 4)")
    parser.add_argument("--n-embd", type=positive_int, default=None, help="width of the residual stream (default 128)")
    parser.add_argument("--pos-encoding", default="learned", choices=["learned", "sinusoidal"],
                        help="positions from a learned table (GPT) or the fixed sinusoids (2017 paper)")
    parser.add_argument("--norm", default="pre", choices=["pre", "post"], help="pre-norm or post-norm blocks")
    parser.add_argument("--temperature", type=positive_float, default=0.8, help="sampling temperature, > 0")
    parser.add_argument("--top-k", type=whole_number, default=10, help="sample among the k likeliest characters (0 = all)")
    parser.add_argument("--sample-length", type=positive_int, default=400, help="characters to generate per sample")
    parser.add_argument("--prompt", default=None, help="text the samples start from (default: a newline)")
    parser.add_argument("--checkpoint", default=None,
                        help="sample from this saved model.pt instead of training (uses --prompt, --temperature, --top-k)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on a GPU)")
    parser.add_argument("--bug", default=None, choices=["no-causal-mask"],
                        help="a debugging drill: plant this bug in the model and watch for its symptom "
                             "(the '# Drill:' comment in Block.forward says which)")
    return parser


def fill_defaults(args) -> None:
    """Defaults for the real run, or a tiny setting for --smoke; flags the learner set win."""
    real = {"time_budget": 135.0, "batch_size": 32, "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128}
    smoke = {"time_budget": 3.0, "batch_size": 8, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32}
    for name, value in (smoke if args.smoke else real).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.smoke:
        args.sample_length = min(args.sample_length, 60)


# %%
# 14. Putting it together: the proofs, training, sampling, figures and the files written.
def run(args) -> None:
    backends = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.fp32_precision)  # set on CUDA
    try:
        train_and_report(args)
    finally:  # leave a notebook's kernel as it was
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.fp32_precision = backends


def train_and_report(args) -> None:
    started = time.perf_counter()
    fill_defaults(args)
    if args.n_embd % args.n_head:
        raise LabError(f"--n-embd ({args.n_embd}) must be divisible by --n-head ({args.n_head})")
    folder(args.data_dir, "--data-dir")  # before anything is downloaded or written
    out_dir = folder(args.out_dir, "--out-dir")
    device = pick_device(args.device)
    dtype = pick_precision(args.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has the same shape: let cuDNN pick its kernels
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # fp32 matmuls on tensor cores (Ampere and newer)
    torch.manual_seed(args.seed)
    if args.checkpoint:
        sample_from_checkpoint(args, device)
        return
    print(f"Lab {LAB_NAME}: torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads"
          + (" (smoke run: generated text, tiny model; numbers are not results)" if args.smoke else ""))

    print("\n== From scratch vs PyTorch (largest absolute difference) ==")
    differences = check_from_scratch_pieces(args.seed)
    for name, value in differences.items():
        print(f"  {name:28s} {value:.1e}")
    print("  all at float32 rounding: the hand-built pieces are right, so training uses the fused built-ins.")

    print("\n== Pre-norm vs post-norm: gradient norm reaching each of 8 blocks at initialisation ==")
    pre, post = gradient_norm_per_layer(True, args.seed), gradient_norm_per_layer(False, args.seed)
    print("  pre-norm :", " ".join(f"{g:.3f}" for g in pre))
    print("  post-norm:", " ".join(f"{g:.3f}" for g in post))
    pre_mean, post_mean = sum(pre) / len(pre), sum(post) / len(post)
    print(f"  pre-norm: the residual sum carries the gradient straight down, so every block gets about the same "
          f"(first/last {pre[0] / pre[-1]:.2f}).\n  post-norm: the gradient passes through a LayerNorm per block "
          f"on the residual path, which rescales it: here {pre_mean / post_mean:.0f}x smaller\n  than pre-norm's. "
          "Deep post-norm stacks are known to need a learning-rate warm-up to train at all (Xiong et al., 2020).")

    text = generated_text(args.seed) if args.smoke else load_shakespeare(args.data_dir)
    vocab = "".join(sorted(set(text)))
    ids = encode(text, vocab)
    split = int(0.9 * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]
    print(f"\n== Data: {len(text):,} characters, vocabulary of {len(vocab)}; "
          f"{len(train_ids):,} train / {len(val_ids):,} validation ==")

    config = GPTConfig(vocab_size=len(vocab), block_size=args.block_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, pos_encoding=args.pos_encoding,
                       norm_first=args.norm == "pre")
    model = GPT(config, bug=args.bug).to(device)
    trained = torch.compile(model) if args.compile else model
    train_ids, val_ids = train_ids.to(device), val_ids.to(device)  # 9 MB of ids: they live on the device
    writer = SummaryWriter(out_dir / "tensorboard")  # closed in the finally, even after an error
    try:
        history = train(trained, train_ids, val_ids, args, device, dtype, writer, show_progress=not args.smoke)

        print("\n== Validation: one pass over the whole validation split ==")
        val_loss = evaluate(model, val_ids, config.block_size, dtype)
        print(f"  validation loss {val_loss:.4f} nats/char ({val_loss / math.log(2):.3f} bits/char) after "
              f"{history['steps']} steps, {history['train_time_s']:.0f} s, {history['tokens_per_s']:,.0f} chars/s")
        if not args.smoke:
            verdict = "reached" if val_loss <= TARGET_VAL_LOSS else "missed"
            print(f"  target <= {TARGET_VAL_LOSS}: {verdict}")
        model.eval()
        leak = future_leak(model, val_ids[:2 * config.block_size].view(2, config.block_size))
        print(f"  future leak: changing only the last character moves earlier positions' logits by up to "
              f"{leak:.2g} (future_leak; exactly 0 when the causal mask hides the future"
              f"{', --bug ' + args.bug if args.bug else ''})")

        print("\n== Samples ==")
        generator = torch.Generator().manual_seed(args.seed)
        prompt = encode(args.prompt or "\n", vocab)[None].to(device)
        samples = {}
        for label, temperature, top_k in (("temperature 1.0, all characters", 1.0, None),
                                          (f"temperature {args.temperature:g}, top-k {args.top_k}", args.temperature,
                                           args.top_k or None)):
            out = generate(model, prompt, args.sample_length, temperature, top_k, generator)
            samples[label] = decode(out[0].tolist(), vocab)
            print(f"--- {label} ---{samples[label]}\n")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "samples.txt").write_text("".join(f"--- {k} ---{v}\n\n" for k, v in samples.items()))

        print("== Attention per head on one validation line ==")
        line_start = text.index("\n", split + 100) + 1
        line = text[line_start:line_start + min(config.block_size, 40)]
        maps = model.attention_maps(encode(line, vocab)[None].to(device))[:, 0].cpu()  # (n_layer, nh, T, T)
        look_back = mean_look_back(maps)
        for layer in range(config.n_layer):
            print(f"  layer {layer}: heads look back " + ", ".join(f"{d:.1f}" for d in look_back[layer].tolist())
                  + " characters on average")
        print("  short look-backs are heads reading the last few letters (spelling); long ones gather "
              "context from the start of the word or line.")
        plot_attention(maps, line, out_dir / "attention_heads.png")
        writer.add_scalar("loss/val", val_loss, history["steps"])
        for label, sample in samples.items():
            writer.add_text(f"samples/{label}", "    " + sample.replace("\n", "\n    "), history["steps"])  # indented: shown as is
        for layer in range(config.n_layer):  # one grey image per head: row = query, column = key
            writer.add_images(f"attention/layer_{layer}", maps[layer, :, None], history["steps"])
    finally:
        writer.close()

    sinusoidal = sinusoidal_positional_encoding(config.block_size, config.n_embd)
    learned = model.position_embedding.weight.detach().cpu() if config.pos_encoding == "learned" else None
    plot_positional_encodings(sinusoidal, learned, out_dir / "positional_encodings.png")
    near, far = neighbour_vs_distant_similarity(sinusoidal)
    print(f"\n== Positions: cosine similarity of neighbours vs positions {config.block_size // 2} apart ==\n"
          f"  sinusoidal {near:.2f} vs {far:.2f}", end="")
    if learned is not None:
        learned_near, learned_far = neighbour_vs_distant_similarity(learned)
        print(f"; learned {learned_near:.2f} vs {learned_far:.2f} (it found locality from the data alone)")
    else:
        print()
    plot_loss_curve(history, val_loss, out_dir / "loss_curve.png")

    model.eval()
    sample_inputs = ids[split:split + 2 * config.block_size].view(2, config.block_size).to(device)
    with torch.no_grad():
        sample_outputs = model(sample_inputs)
    torch_save_atomically({"model": {k: v.cpu() for k, v in model.state_dict().items()}, "config": asdict(config), "vocab": vocab,
                     "sample_inputs": sample_inputs.cpu(), "sample_outputs": sample_outputs.cpu(),
                     "steps": history["steps"], "val_loss": val_loss}, out_dir / "model.pt")

    wall_time = time.perf_counter() - started
    metrics = {
        "lab": LAB_NAME, "smoke": args.smoke, "device": str(device), "torch_version": torch.__version__,
        "precision": str(dtype).removeprefix("torch.") if dtype else "float32", "wall_time_s": wall_time, "train_time_s": history["train_time_s"], "steps": history["steps"],
        "val_loss": val_loss, "val_bits_per_char": val_loss / math.log(2),
        "target_val_loss": TARGET_VAL_LOSS,
        "seconds_to_target": wall_time if val_loss <= TARGET_VAL_LOSS and not args.smoke else None,
        "tokens_per_s": history["tokens_per_s"], "epochs": history["steps"] * args.batch_size * config.block_size / len(train_ids),
        "parameters": sum(p.numel() for p in model.parameters()), "config": asdict(config),
        "batch_size": args.batch_size, "lr": args.lr, "time_budget_s": args.time_budget,
        "from_scratch_max_abs_diff": differences,
        "init_grad_norm_per_block": {"pre_norm": pre, "post_norm": post},
        "attention_mean_look_back": look_back.tolist(),
        # the debugging drill (--bug): which bug was planted, and its symptom, the future's effect on the past
        "bug": args.bug, "future_leak": leak,
    }
    write_json_atomically(metrics, out_dir / "metrics.json")
    print(f"\nSummary: a {metrics['parameters']:,}-parameter character GPT trained {history['train_time_s']:.0f} s "
          f"({history['steps']} steps) reaches validation loss {val_loss:.3f} nats/char; whole run "
          f"{wall_time:.0f} s.\n  Outputs in {out_dir}/ (metrics.json, model.pt, samples.txt, loss_curve.png, "
          "attention_heads.png, positional_encodings.png, tensorboard/).\n"
          f"  Try: --time-budget 600 --n-layer 6 --n-embd 192, --pos-encoding sinusoidal, --norm post, or\n"
          f"       --checkpoint {out_dir}/model.pt --prompt 'ROMEO:' --temperature 0.8")


# %%
# Notes: how the measured figures of the docstring came about.
#   The time budget makes the step count depend on the machine's load: tuning runs on a busy
#   machine ended as high as 1.84 nats/char, against 1.760-1.783 on an idle one.


# %%
# Predict, then run. Write your prediction down before each command; the lab prints the answer.
# 1. Run: python week4_transformer_vae/08_transformer.py --checkpoint runs/08_transformer/model.pt --temperature 1.5 --top-k 0
#    Predict: next to the default run's samples (0.8, top-k 10), will the text keep to real words?
#    Answer: the sample it prints; the default run's are in runs/08_transformer/samples.txt.
# 2. Run: python week4_transformer_vae/08_transformer.py --pos-encoding sinusoidal
#    Predict: will the fixed sinusoids end above or below the learned positions' 1.765 nats/char?
#    Answer: the "validation loss ... nats/char" line; val_loss in metrics.json.
# 3. Run: python week4_transformer_vae/08_transformer.py --norm post
#    Predict: will the gradient reaching the first blocks shrink, and will the loss end higher?
#    Answer: the "post-norm:" line of gradient norms and the "validation loss" line; val_loss and
#    init_grad_norm_per_block in metrics.json.
# 4. Run: python week4_transformer_vae/08_transformer.py --lr 0.04
#    Predict: ten times the peak learning rate: a lower loss in the same 135 s, a higher one, or NaN?
#    Answer: the "step ... train ... val~" lines and the "validation loss" line (or the NaN message).
# 5. Run: python week4_transformer_vae/08_transformer.py --bug no-causal-mask
#    Predict: will the validation loss go up or down, and will the samples read better or worse?
#    Answer: the "validation loss" and "future leak" lines and the samples; val_loss and future_leak
#    in metrics.json.


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

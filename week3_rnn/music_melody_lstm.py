"""Music bridge, week 3: melodies and chord progressions as sequences, on real music.

Curriculum days 15-17 (recurrent networks), taken to music. What this lab teaches, in order:
  1. Representation: a melody as a sequence of note events (pitch + duration, rests included) that
     opens with a key token (mode and tonic, like folk-rnn's K: field), folk tunes as ABC tokens
     (folk-rnn's representation: a note with its accidental and octave marks, a duration, a bar
     line or repeat sign is each one token; normalised the way folk-rnn did: layout removed, common
     metres only), transposition to all keys as augmentation (the key token moves along), and a
     train/validation/test split by tune (never by window).
  2. Baselines first: n-gram models of orders 1-4 with Witten-Bell smoothing on the same tokens,
     their held-out negative log-likelihood (NLL) per event.
  3. An LSTM and a GRU on note events, trained with truncated back-propagation through time, in one
     NLL table with the n-grams.
  4. An LSTM on ABC tokens, a whole tune per sequence, told what is left of the bar beside each
     token (counted from the tokens so far, as Magenta's melody RNNs are told their position in the
     bar) and trained only on tunes whose bars add up by that count, and one validity checker for
     real and generated tunes: parses with music21, every complete bar has the metre's length.
  5. Chord progressions from the Bach chorales, one chord per beat as a Roman numeral: next-chord
     accuracy of an LSTM against the bigram baseline.
  6. Generation with temperature and top-k, primed with the start of a held-out tune or your own
     melody (`--prime`), `--generate-only` from a checkpoint, and musical statistics of generated
     against held-out melodies (tonic-relative pitch-class histogram, range, durations, in-key
     ratio) next to a random-note baseline.
  7. Listening: every generated melody as MIDI (music21) and WAV (a small torch synthesiser written
     with the standard `wave` module) plus a piano roll; in a notebook the audio plays inline.

The music is the corpus that music21 installs with the package (no network): the 371 four-part Bach
chorales (`music21.corpus.chorales.Iterator`; chorale melodies that occur more than once are kept
once, before the split) and four collections of dance tunes in ABC: O'Neill's Music of Ireland
(1850, 2,009 tunes), Ryan's Mammoth Collection (1,059), Aird's Airs (1,182) and music21's miscFolk
books (187). The ABC token model reads them as raw text: ornaments, spaces and line breaks stripped
(the music stays the same), 3,269 tunes kept (metres 6/8, 2/2, 4/4, 3/4, 2/4, 9/8 with `L:1/8`, one
line of melody; left out: other units of length, other metres, tunes that change metre or key
half-way or play chords; 24 tunes printed twice kept once), and trains on those whose bars add up;
the note-event model reads the chorale sopranos and the first `--folk-tunes` O'Neill tunes parsed
by music21 (default 500: parsing is slow, about 0.25 s a tune). Parsing happens once, with a
progress bar (every long loop of the lab has one: steps, rate, time left; none under --smoke), and is
cached under `--data-dir/music_melody_lstm/` (versioned JSON; rebuilt when stale or corrupt).

Run it
  terminal:  python week3_rnn/music_melody_lstm.py                 (parses and caches the corpus first)
             python week3_rnn/music_melody_lstm.py --smoke         (generated tunes, seconds, no corpus)
             python week3_rnn/music_melody_lstm.py --generate-only runs/music_melody_lstm/melody_lstm.pt \
                 --prime my_tune.abc --temperature 0.9 --top-k 8
             python week3_rnn/music_melody_lstm.py --export-abc abc_tunes.txt   (the ABC training tunes)
             python week3_rnn/music_melody_lstm.py --score-abc generated.txt    (validity share of any ABC)
             tensorboard --logdir runs/music_melody_lstm/tensorboard   (losses, learning rates, a generated
                 tune, the NLL table, the piano roll)
  Colab:     paste the file into a cell (or cell by cell at the `# %%` markers) and call `main()`;
             `pip install music21` first if it is missing. The WAV files play inline.

What the default run reaches (measured)
  2-core CPU (AMD EPYC with AVX2, torch 2.14.1, music21 10.5.1, one PyTorch thread), idle (load
  average 1.0), the corpus cache present:
  `python week3_rnn/music_melody_lstm.py` (its --data-dir holding the cache)
    note events (841 melodies: 341 chorale sopranos after 30 duplicates were removed, 500 O'Neill
    tunes; split 694/74/73 tunes; 599,688 training events after transposition; every melody opens
    with its key token), test NLL per event:
      1-gram 4.490, 2-gram 3.290, 3-gram 2.966 (best on validation), 4-gram 2.976;
      LSTM 2.651 (validation 2.641) after 1,000 steps: it beats the best n-gram by 0.314 nats/event
      (target: beat it; reached). GRU 2.796 (validation 2.819) after 700 steps (`--gru-steps`:
      fewer than the LSTM's, to leave the ABC model time; with 300 steps it scored 2.983, behind
      the 3-gram).
    ABC tokens (3,269 tunes of the four collections, split 2,644/317/308 by tune; 159 training tunes
      left out because a bar does not add up; 377,802 training tokens for 419,668 characters, 178
      distinct tokens): an LSTM of 128 units told what is left of the bar, 1,200 steps of 16 whole
      tunes, peak learning rate 0.01: validation 1.496 nats/token. Valid music: 78 % of 50
      generated tunes at temperature 1.0 from the whole softmax, against 94 % of 100 held-out real
      tunes, a ratio of 0.83 (target >= 0.8: reached; 10 of the 11 failures have a bar of the wrong
      length). Fifty tunes make a share uncertain by about 6 points either way; drawing 100 tunes
      (Part 4 alone, through the lab's own functions): 85 % with seed 0, 87 % with seed 1.
    chords (81 labels): next-chord accuracy LSTM 36.0 % vs bigram 32.2 % (target: above; reached).
    tonic-relative pitch-class histogram intersection with the held-out melodies, 50 melodies of 64
      events primed with 8 events and the key, temperature 1.0, top-k 10: LSTM 0.939 (95.1 % of its
      notes in the key, real melodies 98.5 %; target >= 0.9: reached), random notes 0.694 (0.245
      lower; target >= 0.1 lower: reached). With top-k off: 0.880 (91.1 % in the key), and the
      duration histogram closer to the real one (0.947 against 0.846 with top-k 10).
    time: 409 s for the process (402 s in the lab; target <= 8 min: reached), 401 s user CPU
      (+ 7 s system); ABC training 81 s, its 50 tunes drawn in 0.7 s and 150 tunes checked with
      music21 in 13 s. Reading the four ABC collections as text takes 0.4 s, bars_add_up on all of
      them 1.2 s: neither is cached.
  First run (parsing included), idle machine, an empty --data-dir and music21 scratch folder
    (`TMPDIR=<new folder> python week3_rnn/music_melody_lstm.py --data-dir <new folder>`): 871 entries
    (371 chorales, 500 folk tunes; 0 skipped) parsed in 152 s, 533 s for the
    process (target <= 10 min more than a run with the cache: reached), every figure above the same.
    (An earlier session measured 423 s of parsing with the same parsing code, its load not recorded.)
  Smoke run (`--smoke`): 11.7 s wall, 10.7 s user CPU (median of three, idle; on an earlier
    session's host, at load average 2.7: 10.6 s and 9.4 s).
  GPU: not measured.
  Training runs for a number of steps, not a time budget: on a shared machine a time budget gives
  a different model every run; `--steps`, `--gru-steps`, `--abc-steps`, `--chord-steps` or `--epochs`
  train longer.
"""
import argparse
import contextlib
import io
import json
import math
import os
import re
import sys
import time
import wave
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

LAB_NAME = "music_melody_lstm"
CACHE_VERSION = 2  # bump when the cached corpus format changes: an old cache is then rebuilt


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
# Setup: figures that also show inline in a notebook, music21, CPU threads. Asking for something
# that is not there (music21) is a one-line message, not a traceback.
def save_figure(fig, path: Path) -> None:
    """Save a figure as PNG, show it inline in a notebook, and free it."""
    import matplotlib.pyplot as plt

    fig.savefig(path)
    if in_notebook():
        from IPython.display import display
        display(fig)
    plt.close(fig)


def import_music21():
    """music21 reads and writes the music; a learner without it gets one line saying how to install it."""
    try:
        import music21
    except ImportError:
        raise LabError("this lab needs music21 (it ships the Bach chorales and O'Neill's tunes): "
                       "pip install music21  (or: pip install -r requirements.txt)") from None
    return music21


def error_text(err: Exception) -> str:
    """An exception as one short line with its kind (music21's messages can span several)."""
    return f"{type(err).__name__}: {one_line(err, limit=200)}"


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


@contextlib.contextmanager
def cpu_threads(count: int):
    """Run with `count` CPU threads (0: leave PyTorch's choice), then put the old count back.
    A recurrent step is a chain of small matrix products, one per time step; split over threads,
    each waits at a barrier per time step, and on a shared 2-core machine measured here an LSTM
    step took 15-20 times longer with 2 threads than with 1. So the lab defaults to one thread."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
# Part 1a. Representation: note events. A melody is a list of (pitch, duration) events: MIDI pitch
# (0 for a rest) and a duration in quarter notes, snapped to one of DURATIONS. Each event is ONE
# token, so "negative log-likelihood per event" means the same thing for every model below.
# A melody starts with a KEY token (its mode and tonic, e.g. "D dorian"), the way every folk-rnn tune
# starts with its K: field, and ends with EOS. Without it, a model primed with a few notes must guess
# the key (is G-A-B the start of G major or of E minor?) and keeps guessing as it goes: it drifts
# out of the key. With it, every note is drawn knowing which scale it belongs to. The key is given,
# never predicted, and the n-grams get the same tokens, so the NLL table stays a fair comparison.
BOS, EOS = 0, 1  # BOS pads the n-grams' first contexts and starts a chord progression
PITCH_LOW, PITCH_HIGH = 48, 95  # C3..B6: every pitch of the corpus in every transposition below
DURATIONS = (0.25, 1 / 3, 0.5, 2 / 3, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)  # quarter notes (1/3: triplet eighths)
PITCH_SLOTS = 1 + PITCH_HIGH - PITCH_LOW + 1  # a rest, then every pitch
EVENT_TOKENS = 2 + PITCH_SLOTS * len(DURATIONS)  # BOS, EOS and every (pitch, duration): key tokens follow
MODE_SCALES = {  # intervals above the tonic of each mode that the chorales and O'Neill's K: fields use
    "major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10, 11), "dorian": (0, 2, 3, 5, 7, 9, 10),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10), "phrygian": (0, 1, 3, 5, 7, 8, 10), "lydian": (0, 2, 4, 6, 7, 9, 11),
}
MODES = tuple(MODE_SCALES)
MELODY_VOCAB = EVENT_TOKENS + 12 * len(MODES)
KEY_TOKENS = tuple(range(EVENT_TOKENS, MELODY_VOCAB))
TRANSPOSITIONS = range(-5, 7)  # all 12 keys, each melody moved by at most a fourth or a tritone


def snap_duration(quarters: float) -> int:
    """Index of the nearest duration on a log scale (a dotted eighth 0.75, not 0.5 or 1)."""
    quarters = min(max(quarters, DURATIONS[0]), DURATIONS[-1])
    return min(range(len(DURATIONS)), key=lambda i: abs(math.log(quarters / DURATIONS[i])))


def event_token(pitch: int, quarters: float) -> int:
    slot = 0 if pitch == 0 else pitch - PITCH_LOW + 1
    if not 0 <= slot < PITCH_SLOTS:
        raise ValueError(f"pitch {pitch} outside {PITCH_LOW}..{PITCH_HIGH}")
    return 2 + slot * len(DURATIONS) + snap_duration(quarters)


def token_event(token: int):
    """(pitch, quarters) of an event token; pitch 0 is a rest."""
    slot, duration = divmod(token - 2, len(DURATIONS))
    return (0 if slot == 0 else PITCH_LOW + slot - 1), DURATIONS[duration]


def key_token(tonic: int, mode: str) -> int:
    """The token that opens a melody in this key: one per mode and tonic pitch class (0 = C)."""
    return EVENT_TOKENS + 12 * MODES.index(mode) + tonic % 12


def encode_melody(events, tonic: int, mode: str) -> list:
    """[(pitch, quarters), ...] in a key -> [KEY, tokens..., EOS]."""
    return [key_token(tonic, mode)] + [event_token(p, q) for p, q in events] + [EOS]


def transpose(events, semitones: int):
    """The same melody `semitones` higher (rests stay rests); None if it leaves the pitch range."""
    moved = [(p + semitones if p else 0, q) for p, q in events]
    if any(p and not PITCH_LOW <= p <= PITCH_HIGH for p, _ in moved):
        return None
    return moved


def augment(melodies):
    """Every training melody [(events, tonic, mode)] in all 12 keys (where it stays in range), its
    tonic moved with it: the model sees each interval pattern from every starting note, so a melody's
    key is no longer something to memorise."""
    out = []
    for events, tonic, mode in melodies:
        for shift in TRANSPOSITIONS:
            moved = transpose(events, shift)
            if moved is not None:
                out.append((moved, (tonic + shift) % 12, mode))
    return out


def split_of(name: str) -> str:
    """Split by TUNE, decided by a hash of its name: stable across runs and seeds, and no window of
    a test tune can ever sit in the training set."""
    bucket = zlib.crc32(name.encode()) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def split_melodies(records, bug=None, window: int = 32):
    """{train, val, test} lists of records, split by tune. With bug="split-by-window" each tune is
    first cut into windows of `window` events and the WINDOWS are split: the mistake of splitting a
    long token stream at random places."""
    if bug == "split-by-window":
        # Drill: split-by-window. The held-out NLL of every model drops (the 4-gram's most: it has
        # seen the test tune's other windows); the lab prints how many test tunes also sit in
        # training, the number to check first when a held-out score looks too good (here: 0).
        records = [{**r, "tune": r["name"], "name": f"{r['name']}@{i // window}", "events": r["events"][i:i + window],
                    "chords": r.get("chords") if i == 0 else None}  # a chorale's chords stay one sequence
                   for r in records for i in range(0, len(r["events"]), window)]
        records = [r for r in records if len(r["events"]) >= 2]
    return {name: [r for r in records if split_of(r["name"]) == name] for name in ("train", "val", "test")}


def tunes_in_train_and_test(split) -> int:
    """How many test tunes have events in the training set too (0 when the split is by tune)."""
    tune = lambda record: record.get("tune", record["name"])  # noqa: E731
    return len({tune(r) for r in split["test"]} & {tune(r) for r in split["train"]})


# %%
# Part 1b. Folk tunes as ABC text. The ABC collections are read as raw text: the tunes are cut
# at their `X:` lines, titles and notes dropped, and only the metre, unit length, key and the notes
# kept. Ornaments (grace notes {..}, slurs, staccato dots, rolls ~, decorations !..!, chord names
# "..") are stripped: they do not change a bar's length and would only make the language larger.
# Then folk-rnn's kind of normalisation, which leaves the music as it was: spaces and backquotes
# (beaming) and line breaks (engraving) are layout, so a tune's notes become one line; `M:C` is
# written 4/4 and `M:C|` 2/2; only the common metres with `L:1/8` are kept, and tunes that change
# metre, unit or key half-way, or play two notes at once, are left out. Every token the model reads
# is then music (a space would be one more token to read past in every bar), and a tune's end is
# simply the end of its line.
KEY_TONICS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
COMMON_METRES = {"6/8": "6/8", "C|": "2/2", "2/2": "2/2", "C": "4/4", "4/4": "4/4", "3/4": "3/4", "2/4": "2/4",
                 "9/8": "9/8"}  # as written -> as kept (jigs, reels, hornpipes, waltzes, polkas, slip jigs)
# The collections of music21's corpus written in ABC, in the same dance-tune idiom: O'Neill's Music of
# Ireland (1850), Ryan's Mammoth Collection (1883, reels, jigs and hornpipes), Aird's Selection of
# Scotch, English, Irish and Foreign Airs (1782-1803) and a few smaller books (miscFolk). More tunes is
# the cheapest way to a model that writes bars of the right length (the notes cell has the figures).
ABC_COLLECTIONS = ("oneills1850", "ryansMammoth", "airdsAirs", "miscFolk")
MODE_NAMES = {"": "major", "maj": "major", "ion": "major", "m": "minor", "min": "minor", "aeo": "minor",
              "dor": "dorian", "mix": "mixolydian", "phr": "phrygian", "lyd": "lydian"}


def split_abc_tunes(text: str):
    """Raw ABC text -> one string per tune, cut at `X:` lines (or at blank lines if there are none)."""
    if re.search(r"^X:", text, flags=re.M):
        chunks = re.split(r"^(?=X:)", text, flags=re.M)
    else:
        chunks = re.split(r"\n\s*\n", text)
    return [chunk.strip() for chunk in chunks if chunk.strip()]


def abc_field(tune: str, field: str):
    match = re.search(rf"^{field}:\s*(.*?)\s*$", tune, flags=re.M)
    return match.group(1) if match else None


def parse_key_field(value: str):
    """'Gm', 'ADor', 'Bb' -> (tonic pitch class, mode name); None if it is not a key we know."""
    match = re.fullmatch(r"([A-G])([b#]?)\s*([A-Za-z]*)", (value or "").strip())
    if not match:
        return None
    letter, accidental, mode = match.groups()
    mode = MODE_NAMES.get(mode.lower()[:3] if mode.lower() not in ("m", "") else mode.lower())
    if mode is None:
        return None
    return (KEY_TONICS[letter] + {"": 0, "#": 1, "b": -1}[accidental]) % 12, mode


def normalise_abc(tune: str):
    """A raw tune -> 'M:..\\nL:1/8\\nK:..\\n<notes on one line>\\n', or None when a field is
    missing, the metre is not a common one, the unit is not an eighth, M:, L: or K: changes in the
    tune (the music could not stay the same), or it plays chords."""
    metre, unit, key = (abc_field(tune, f).replace(" ", "") if abc_field(tune, f) else None for f in ("M", "L", "K"))
    if metre not in COMMON_METRES or unit != "1/8" or not key:
        return None
    body, started = [], False
    for line in tune.splitlines():
        if line.startswith("%"):
            continue  # a comment
        if re.search(r"\[[MLK]:", line):
            return None  # an inline field: the metre, unit or key changes half-way through
        if re.match(r"^[A-Za-z]:", line):
            if started and line[0] in "MLK":
                return None  # a field line that changes them half-way through
            continue  # other fields: title, source, part labels
        started = True
        line = re.sub(r'"[^"]*"|![^!|]*!|\{[^}]*\}', "", line)  # chord names, decorations, grace notes
        line = re.sub(r"\((?![2-9])", "", line).replace(")", "")  # slurs, but not tuplets like (3
        line = re.sub(r"[~.H-Wh-w]", "", line)  # rolls, staccato, the letters ABC keeps for ornaments
        body.append(re.sub(r"[ \t\\`y!]", "", line))  # spaces, backquotes, spacers, line breaks: layout
    notes = "".join(body)
    if not re.search(r"[A-Ga-g]", notes) or re.search(r"\[(?![12])|\+", notes):
        return None  # no notes, or a chord ([ceg], or +ceg+ in old ABC): these tunes are one line of melody
    return f"M:{COMMON_METRES[metre]}\nL:1/8\nK:{key}\n{notes}\n"


# %%
# Part 1c. ABC tokens: folk-rnn's representation. folk-rnn did not read ABC one character at a
# time: it cut a tune into tokens, each one thing a musician reads: a header field (`M:6/8`,
# `K:G`), a bar line or repeat sign (`|`, `|:`, `:|`, `|1`, `:|2`, `::`), a note with its accidental
# and octave marks (`^f`, `=c`, `B,`, `c'`), a duration (`2`, `/2`, `3/2`), a broken rhythm (`>`),
# a tuplet (`(3`). Anything else stays one character, so nothing is ever lost: joining the tokens
# gives back the text, exactly (a test checks it). On these normalised tunes a token is 0.9
# characters on average: the gain is not a shorter tune but a smaller thing to learn: `^f` is one
# note, not an accidental and then a letter.
ABC_TOKEN = re.compile(r"""
      ^[A-Za-z]:[^\n]*                              # a header field on its own line: M:6/8, L:1/8, K:G
    | \n
    | :\|[12]? | \|[:\]|12]? | :: | \[[12]          # bar lines, repeat signs, 1st/2nd-time endings
    | [_=^]{0,2}[A-Ga-g][,']* | [zxZ]               # a note with its accidental and octave marks; a rest
    | \d*/+\d* | \d+                                # a duration: 2, 3/2, /2, /, //
    | >+ | <+ | \(\d                                # a broken rhythm, a tuplet
    | .                                             # anything else: one character
""", flags=re.M | re.X)


def abc_tokens(text: str) -> list:
    """ABC text -> folk-rnn-style tokens; "".join(abc_tokens(text)) == text for every text."""
    return ABC_TOKEN.findall(text)


# Where in the bar is the tune? A rhythm is right when every bar adds up to the metre: six eighths
# in 6/8. An LSTM reading tokens has to learn that sum from examples, and with the few minutes of
# CPU this lab has it learns it slowly. Magenta's melody RNNs give the model its position in the
# bar as an input beside each note; we do the same, counted the way a musician counts: how much of
# the bar is left. A BarClock reads the tokens one by one (M: and L: set the bar's length, notes
# and durations use it up, a bar line starts a new bar) and after each token says how many unit
# lengths (L:, an eighth here) are left in the bar. It is computed from the tokens already there
# (the model's own ones when it generates), so it adds no information about the future and
# constrains nothing: the model still draws every token, bar lines included, from its whole
# softmax, and a bar it overfills is simply wrong.
BAR_LINES = {":|", ":|1", ":|2", "|", "|:", "|]", "||", "|1", "|2", "::", "[1", "[2"}
ABC_NOTE = re.compile(r"[_=^]{0,2}[A-Ga-g][,']*|[zxZ]")
ABC_DURATION = re.compile(r"(\d*)(/*)(\d*)")
ABC_FRACTION = re.compile(r"[ML]:(\d+)/(\d+)")
POSITION_STEPS = 4  # what is left of the bar is counted in quarters of a unit (a 32nd note with L:1/8)
POSITION_BUCKETS = 64  # 0: the bar is overfull; 1: exactly full; 2..63: 0.25 .. 15.5 units left (more is clipped)


class BarClock:
    """Unit lengths left in the bar, updated one token at a time (read() returns it; negative when
    the bar is overfull)."""

    def __init__(self):
        self.metre, self.unit = 1.0, 1 / 8  # M: and L: as fractions of a whole note, until the header says
        self.elapsed = 0.0  # unit lengths since the last bar line
        self.last = 0.0  # length of the last note, which a duration token after it rescales
        self.next_factor = 1.0  # a broken rhythm A>B shortens the next note
        self.tuplet, self.tuplet_left = 1.0, 0  # (3abc: three notes in the time of two

    def read(self, token: str) -> float:
        fraction = ABC_FRACTION.fullmatch(token)
        if fraction:  # M:6/8 or L:1/8
            value = int(fraction.group(1)) / max(int(fraction.group(2)), 1)
            if token[0] == "M":
                self.metre = value
            else:
                self.unit = value or self.unit
        elif token in BAR_LINES:
            self.elapsed, self.last = 0.0, 0.0
        elif ABC_NOTE.fullmatch(token):
            length = self.next_factor * (self.tuplet if self.tuplet_left else 1.0)
            self.tuplet_left = max(0, self.tuplet_left - 1)
            self.next_factor = 1.0
            self.elapsed += length
            self.last = length
        elif token[0].isdigit() or token[0] == "/":  # A2 is twice A, A/2 and A/ half, A3/2 one and a half
            whole, slashes, below = ABC_DURATION.fullmatch(token).groups()
            factor = int(whole or 1) / max(int(below) if below else 2 ** len(slashes), 1)
            self.elapsed += self.last * (factor - 1)  # nothing after a bar line: no note to rescale
            self.last *= factor
        elif token[0] in "><":  # A>B: A dotted, B halved (A>>B: 1.75 and 0.25); A<B the other way
            change = self.last * (1 - 0.5 ** len(token))
            self.elapsed += change if token[0] == ">" else -change
            self.next_factor = 0.5 ** len(token) if token[0] == ">" else 2 - 0.5 ** len(token)
        elif token[0] == "(" and len(token) == 2:  # (3: 3 notes in the time of 2; (2: 2 in 3; (4: 4 in 3
            notes = int(token[1])
            self.tuplet, self.tuplet_left = {2: 1.5, 4: 0.75}.get(notes, 2 / max(notes, 1)), notes
        return self.left()  # anything else (a tie -, a stray character) takes no time

    def left(self) -> float:
        return self.metre / self.unit - self.elapsed


def position_bucket(left: float) -> int:
    """Units left in the bar -> the bucket the model embeds (0: overfull, 1: full, then quarter units)."""
    if left < -1e-9:
        return 0
    return min(POSITION_BUCKETS - 1, 1 + round(POSITION_STEPS * left))


def bar_positions(tokens) -> list:
    """What is left of the bar after each token, as buckets (1 when a bar is exactly full)."""
    clock = BarClock()
    return [position_bucket(clock.read(token)) for token in tokens]


# The same clock cleans the training set. About one printed tune in sixteen has a bar that does not
# add up (a misprint, or a repeat the engraver left implied); a model trained on them learns that a
# bar may be a little short or long, and writes such bars. bars_add_up() asks what abc_validity asks
# (Part 4b), without music21: every bar exactly full, except that a bar may be short at the start,
# at the end, and next to a repeat sign, double bar or 1st/2nd-time ending. Only the training tunes
# are filtered: the held-out tunes stay as printed, so the real tunes' validity share is not flattered.
def bars_add_up(tune: str) -> bool:
    clock = BarClock()
    bars = []  # (units left when the bar ended, the bar line that ended it)
    for token in abc_tokens(tune):
        if token in BAR_LINES:
            bars.append((clock.left(), token))
        clock.read(token)
    if clock.elapsed > 1e-9:
        bars.append((clock.left(), "end"))  # the last bar has no bar line after it
    for i, (left, line) in enumerate(bars):
        if left < -1e-9:
            return False  # too long
        at_edge = i == 0 or i == len(bars) - 1 or line != "|" or bars[i - 1][1] != "|"
        if left > 1e-9 and not at_edge:
            return False  # too short in the middle of a section
    return True


# %%
# Part 1d. Reading the corpus once. Each entry is parsed by music21 (the slow part: about half a
# second a chorale, a quarter of a second a folk tune), turned into plain numbers and cached as
# JSON. A cache from another version of this lab, or with other settings, or that does not read
# back, is rebuilt; an entry music21 cannot parse is skipped and counted, never silently.
def melody_events(stream):
    """The top line of a music21 stream as [(pitch, quarters)]: tied notes merged, grace notes
    dropped, the highest note of a chord, consecutive rests merged. (Ties are merged here rather than
    with music21's stripTies(), which took about as long as parsing the score.)"""
    part = stream.parts[0] if getattr(stream, "parts", None) else stream
    events = []
    for element in part.flatten().notesAndRests:
        quarters = float(element.quarterLength)
        if element.duration.isGrace or quarters <= 0:
            continue
        pitch = 0 if element.isRest else max(p.midi for p in element.pitches)
        tied = pitch and element.tie is not None and element.tie.type in ("stop", "continue")
        if events and events[-1][0] == pitch and (pitch == 0 or tied):
            events[-1] = (pitch, events[-1][1] + quarters)  # a held note (tie) or a longer rest
        else:
            events.append((pitch, quarters))
    while events and events[0][0] == 0:
        events.pop(0)  # leading and trailing rests say nothing about the melody
    while events and events[-1][0] == 0:
        events.pop()
    return events


ROMAN = ("I", "bII", "II", "bIII", "III", "IV", "#IV", "V", "bVI", "VI", "bVII", "VII")
CHORD_TEMPLATES = {  # intervals above the root -> (quality suffix, lower-case numeral?)
    (0, 4, 7): ("", False), (0, 3, 7): ("", True), (0, 3, 6): ("o", True), (0, 4, 8): ("+", False),
    (0, 4, 7, 10): ("7", False), (0, 4, 7, 11): ("maj7", False), (0, 3, 7, 10): ("7", True),
    (0, 3, 6, 10): ("h7", True), (0, 3, 6, 9): ("o7", True),
}


def chord_label(pitches, tonic: int) -> str:
    """Sounding MIDI pitches -> a Roman numeral relative to the tonic ('V7', 'ii', 'bVI', 'viio').
    The root is the one whose chord template explains most pitch classes (the bass breaks ties);
    passing notes that fit no template only lower the score. 'N' when fewer than two pitch classes sound.
    (music21's roman.romanNumeralFromChord does this too, but takes ~0.1 s a chord on these cores.)"""
    classes = {p % 12 for p in pitches}
    if len(classes) < 2:
        return "N"
    bass = min(pitches) % 12
    best = None
    for root in sorted(classes):
        intervals = {(p - root) % 12 for p in classes}
        for template, (suffix, lower) in CHORD_TEMPLATES.items():
            shape = set(template)
            score = 2 * len(intervals & shape) - 2 * len(intervals - shape) - len(shape - intervals)
            score += 0.5 * (root == bass)
            if best is None or score > best[0]:
                best = (score, root, suffix, lower)
    _, root, suffix, lower = best
    numeral = ROMAN[(root - tonic) % 12]
    return (numeral.lower() if lower else numeral) + suffix


def chords_per_beat(score, tonic: int):
    """One chord label per quarter-note beat from all four voices of a chorale."""
    sounding = []  # (start, end, midi) of every note of every voice (a tied note sounds on; no merging needed)
    for note in score.flatten().notes:
        if note.duration.isGrace:
            continue
        start = float(note.offset)
        sounding += [(start, start + float(note.quarterLength), p.midi) for p in note.pitches]
    if not sounding:
        return []
    end = max(stop for _, stop, _ in sounding)
    labels, beat = [], 0.0
    while beat < end:
        labels.append(chord_label([m for start, stop, m in sounding if start <= beat < stop], tonic))
        beat += 1.0
    return labels


def chorale_key(score):
    """(tonic pitch class, mode). A chorale ends on its tonic: the last bass note names it, and the key
    signature says whether that is the major key or its relative minor. Modal chorales (neither)
    fall back to music21's key analysis (Krumhansl-Schmuckler profiles, ~0.2 s a score)."""
    bass = [n for n in score.parts[-1].flatten().notes]
    signatures = list(score.parts[0].flatten().getElementsByClass("KeySignature"))
    if bass and signatures:
        last = bass[-1].pitches[0].pitchClass
        major = signatures[-1].asKey("major").tonic.pitchClass
        if last == major:
            return major, "major"
        if last == (major + 9) % 12:
            return last, "minor"
    key = score.analyze("key")
    return key.tonic.pitchClass, ("minor" if key.mode == "minor" else "major")


def chorale_record(name: str, score):
    """A parsed chorale -> the cached numbers: soprano events, key, chord per beat."""
    tonic, mode = chorale_key(score)
    return {"name": name, "source": "chorale", "tonic": tonic, "mode": mode,
            "events": melody_events(score.parts[0]), "chords": chords_per_beat(score, tonic)}


def folk_record(name: str, tune_text: str, music21):
    """A raw ABC folk tune -> the cached numbers: its events and the key of its K: field."""
    key = parse_key_field(abc_field(tune_text, "K"))
    if key is None:
        raise ValueError(f"unknown key {abc_field(tune_text, 'K')!r}")
    score = music21.converter.parse(tune_text, format="abc")
    return {"name": name, "source": "folk", "tonic": key[0], "mode": key[1], "events": melody_events(score)}


def collection_tunes(music21, collection: str):
    """(name, raw text) of every tune of one ABC collection of music21's corpus, in file order."""
    root = Path(music21.__file__).parent / "corpus" / collection
    files = sorted(root.glob("*.abc"))
    if not files:
        raise LabError(f"the ABC collection {collection} is missing from music21's corpus ({root}); "
                       "reinstall music21 (pip install --force-reinstall music21) or run with --smoke")
    tunes = []
    for path in files:
        for tune in split_abc_tunes(path.read_text(encoding="latin-1")):
            tunes.append((f"{collection}/{path.name}#{abc_field(tune, 'X')}", tune))
    return tunes


def abc_corpus(music21):
    """The ABC token model's tunes: every collection of ABC_COLLECTIONS, normalised (tunes that
    normalise_abc refuses are left out) and each distinct tune kept once. Returns ([(name, text)],
    {collection: (tunes read, tunes kept)}, duplicates removed)."""
    tunes, counts, seen, duplicates = [], {}, set(), 0
    for collection in ABC_COLLECTIONS:
        raw = collection_tunes(music21, collection)
        kept = 0
        for name, tune in raw:
            text = normalise_abc(tune)
            if text is None:
                continue
            if text in seen:  # the same tune twice (within or across collections) could land in train and test
                duplicates += 1
                continue
            seen.add(text)
            tunes.append((name, text))
            kept += 1
        counts[collection] = (len(raw), kept)
    return tunes, counts, duplicates


def corpus_entries(music21, folk_tunes: int):
    """What the default run parses: every chorale, and the first `folk_tunes` O'Neill tunes.
    Each entry is (kind, name, loader) where loader() returns a record."""
    entries = [("chorale", name, lambda name=name: chorale_record(name, music21.corpus.parse(name)))
               for name in music21.corpus.chorales.Iterator(returnType="filename")]
    for name, text in collection_tunes(music21, "oneills1850")[:folk_tunes]:
        entries.append(("folk", name, lambda name=name, text=text: folk_record(name, text, music21)))
    return entries


def read_cache(path: Path, fingerprint: str):
    """The cached corpus, or (None, why not) when it is missing, stale or corrupt."""
    if not path.exists():
        return None, "no cache yet"
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("version") != CACHE_VERSION or cached.get("fingerprint") != fingerprint:
            return None, "the cache is stale (another version of the lab or other settings)"
        for record in cached["records"]:
            if not isinstance(record["events"], list) or not isinstance(record["tonic"], int):
                raise ValueError("bad record")
            record["events"] = [(int(pitch), float(quarters)) for pitch, quarters in record["events"]]
        return cached, None
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        return None, f"the cache is corrupt ({error_text(err)})"


def build_corpus(entries, cache_path: Path, fingerprint: str, progress=True):
    """Parse every entry (with a progress bar), skip and count the ones that fail, cache the rest.
    Returns the cached dict: records, skipped [(name, reason)], parse_seconds."""
    from tqdm.auto import tqdm

    cached, why = read_cache(cache_path, fingerprint)
    if cached is not None:
        return cached
    print(f"parsing {len(entries)} corpus entries with music21 ({why}); once, then cached in {cache_path}")
    start = time.perf_counter()
    records, skipped = [], []
    for kind, name, loader in tqdm(entries, desc="parsing", unit="tune", disable=None if progress else True,
                                   mininterval=2):
        try:
            record = loader()
        except Exception as err:  # music21 raises many kinds on a malformed entry: skip it, count it
            skipped.append([name, error_text(err)])
            continue
        if len(record["events"]) < 4:
            skipped.append([name, "fewer than 4 notes"])
            continue
        record["events"] = [(int(pitch), float(quarters)) for pitch, quarters in record["events"]]
        records.append(record)
    cached = {"version": CACHE_VERSION, "fingerprint": fingerprint, "records": records, "skipped": skipped,
              "parse_seconds": time.perf_counter() - start}
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(cached, cache_path)  # an interrupted parse never leaves a half-written cache
    return cached


def dedupe_melodies(records):
    """Keep the first of chorale melodies that occur more than once (the same hymn tune harmonised
    twice, maybe in another key): compared as intervals and durations, so transposed copies match."""
    seen, kept, dropped = set(), [], 0
    for record in records:
        events = record["events"]
        pitches = [p for p, _ in events if p]
        first = pitches[0] if pitches else 0
        signature = (record["source"], tuple((p - first if p else None, snap_duration(q)) for p, q in events))
        if signature in seen:
            dropped += 1
            continue
        seen.add(signature)
        kept.append(record)
    return kept, dropped


# %%
# Part 1e. Smoke mode: a few generated tunes of the real shapes, run through the same code (ABC
# text parsed by music21, four-voice "chorales" built as music21 scores), never the corpus.
def generated_abc_tune(index: int, generator: torch.Generator) -> str:
    """A made-up 6/8 or 4/4 tune in G or D with bars of the right length (eighth notes)."""
    metre, per_bar = (("6/8", 6), ("4/4", 8))[index % 2]
    key = ("G", "D")[index % 3 % 2]
    scale = "GABcdefg" if key == "G" else "DEFGABcd"
    bars = []
    for _ in range(8):
        cells, length = [], 0
        while length < per_bar:
            step = 2 if length + 2 <= per_bar and torch.rand((), generator=generator) < 0.3 else 1
            note = scale[int(torch.randint(len(scale), (), generator=generator))]
            cells.append(note + ("2" if step == 2 else ""))
            length += step
        bars.append("".join(cells))
    body = "|".join(bars[:4]) + "|\n" + "|".join(bars[4:]) + "|]"
    return f"X:{index + 1}\nT:Generated tune {index + 1}\nM:{metre}\nL:1/8\nK:{key}\n{body}\n"


def generated_chorale(index: int, music21):
    """A four-voice I-IV-V-I progression (twice, in C or G) as a music21 score."""
    stream, note = music21.stream, music21.note
    tonic = (60, 67)[index % 2]
    progression = [(0, 4, 7), (5, 9, 12), (7, 11, 14), (0, 4, 7), (9, 12, 16), (5, 9, 12), (7, 11, 14), (0, 4, 7)]
    progression = progression[index % 4:] + progression[:index % 4]  # a different melody each time
    score = stream.Score()
    voices = [[] for _ in range(4)]
    for degrees in progression * 2:
        root, third, fifth = (tonic + d for d in degrees)
        for voice, pitch in zip(voices, (fifth + 12, third + (index % 3), root - 5, root - 12)):
            voice.append(pitch)
    for voice in voices:
        part = stream.Part()
        for pitch in voice:
            part.append(note.Note(pitch, quarterLength=1.0))
        score.insert(0, part)
    return score


def smoke_entries(music21, seed: int):
    generator = torch.Generator().manual_seed(seed)
    entries = [("chorale", f"generated/chorale{i}", lambda i=i: chorale_record(f"generated/chorale{i}",
                                                                               generated_chorale(i, music21)))
               for i in range(4)]
    tunes = [generated_abc_tune(i, generator) for i in range(10)]
    entries += [("folk", f"generated/tune{i}", lambda i=i: folk_record(f"generated/tune{i}", tunes[i], music21))
                for i in range(10)]
    return entries, tunes


def load_music(args, data_dir: Path):
    """Everything the lesson trains on: melodies, chord sequences, ABC tunes, each split by tune."""
    music21 = import_music21()
    if args.smoke:
        entries, raw_tunes = smoke_entries(music21, args.seed)
        cache_path = data_dir / LAB_NAME / "smoke_corpus.json"
        fingerprint = f"smoke-{args.seed}"
        abc_tunes = [(f"generated/tune{i}", tune) for i, tune in enumerate(raw_tunes)] * 3
        abc = [(f"{name}/{i}", normalise_abc(tune)) for i, (name, tune) in enumerate(abc_tunes)]
        abc = [(name, text) for name, text in abc if text]
    else:
        entries = corpus_entries(music21, args.folk_tunes)
        cache_path = data_dir / LAB_NAME / f"corpus_v{CACHE_VERSION}.json"
        fingerprint = f"music21-{music21.__version__}-folk-{args.folk_tunes}-entries-{len(entries)}"
        abc, counts, abc_duplicates = abc_corpus(music21)
        kept = ", ".join(f"{collection} {n_kept} of {n_read}" for collection, (n_read, n_kept) in counts.items())
        print(f"  ABC tunes kept (common metres, L:1/8, one metre and key): {kept}; "
              f"{abc_duplicates} repeated tunes kept once")
    corpus = build_corpus(entries, cache_path, fingerprint, progress=not args.smoke)
    if corpus["skipped"]:
        examples = "; ".join(f"{name}: {why}" for name, why in corpus["skipped"][:3])
        print(f"  skipped {len(corpus['skipped'])} corpus entries that did not parse (e.g. {examples})")
    records, duplicates = dedupe_melodies(corpus["records"])
    return {"records": records, "duplicates": duplicates, "skipped": corpus["skipped"],
            "parse_seconds": corpus["parse_seconds"], "abc": abc}


# %%
# Part 2. Baselines first: n-gram models. An n-gram model predicts the next event from the n-1
# before it, by counting. Unseen contexts are the problem: Witten-Bell smoothing mixes each order
# with the one below it, trusting a context more the more often it was seen and the fewer different
# continuations it had. Every order ends in an add-one unigram, so no event ever gets probability 0.
class NGramModel:
    def __init__(self, order: int, vocab_size: int):
        self.order, self.vocab_size = order, vocab_size
        self.counts = [defaultdict(Counter) for _ in range(order)]  # counts[k][context of length k][token]
        self.totals = [dict() for _ in range(order)]
        self.types = [dict() for _ in range(order)]

    def fit(self, sequences):
        """sequences: token lists that start with a given token (a key, or BOS); the first contexts
        are padded with BOS."""
        for sequence in sequences:
            padded = [BOS] * (self.order - 1) + list(sequence)
            for i in range(self.order - 1 + 1, len(padded)):
                for k in range(self.order):
                    self.counts[k][tuple(padded[i - k:i])][padded[i]] += 1
        for k in range(self.order):
            for context, following in self.counts[k].items():
                self.totals[k][context] = sum(following.values())
                self.types[k][context] = len(following)
        return self

    def prob(self, context, token: int) -> float:
        """P(token | the last order-1 tokens of context), interpolated down to the add-one unigram."""
        # Exercise ngram_prob: start from the add-one unigram (count + 1) / (total + vocabulary size);
        # then for k = 1 .. order-1, while the last k tokens of context were seen in training, mix in
        # that order: p = (count of token after the context + types * p) / (total + types), types
        # being how many different tokens followed it. Check it sums to 1 over the vocabulary.
        # Docs: https://docs.python.org/3/library/collections.html#collections.Counter
        unigram = self.counts[0][()]
        p = (unigram[token] + 1) / (self.totals[0].get((), 0) + self.vocab_size)
        for k in range(1, self.order):
            history = tuple(context[len(context) - k:]) if k <= len(context) else None
            if history is None or history not in self.totals[k]:
                break  # an unseen context: the lower order's estimate stands
            total, types = self.totals[k][history], self.types[k][history]
            p = (self.counts[k][history][token] + types * p) / (total + types)
        return p

    def nll(self, sequences) -> float:
        """Mean negative log-likelihood in nats per predicted token (every token after the first, EOS too)."""
        total, count = 0.0, 0
        for sequence in sequences:
            padded = [BOS] * (self.order - 1) + list(sequence)
            for i in range(self.order, len(padded)):
                total -= math.log(self.prob(padded[:i], padded[i]))
                count += 1
        return total / max(count, 1)

    def most_likely(self, context) -> int:
        return max(range(self.vocab_size), key=lambda token: self.prob(context, token))


# %%
# Part 3a. The neural models: embedding -> LSTM or GRU -> one logit per token. The same class models
# note events, ABC tokens (with what is left of the bar) and chords; only the vocabulary changes.
@dataclass
class SeqConfig:
    kind: str = "lstm"  # lstm or gru
    vocab_size: int = MELODY_VOCAB
    embed_dim: int = 64
    hidden_size: int = 256
    num_layers: int = 1
    dropout: float = 0.0
    position_buckets: int = 0  # ABC tokens: what is left of the bar, a second input (0: none)


class SequenceModel(nn.Module):
    def __init__(self, config: SeqConfig):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        # What is left of the bar gets its own embedding, added to the token's: one vector says
        # "the note ^f", the other "three eighths left in this bar".
        self.position = nn.Embedding(config.position_buckets, config.embed_dim) if config.position_buckets else None
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[config.kind]
        self.rnn = rnn(config.embed_dim, config.hidden_size, config.num_layers, batch_first=True,
                       dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, tokens, state=None, positions=None):  # tokens, positions: (B, T)
        inputs = self.embed(tokens)  # (B, T, E)
        if self.position is not None and positions is not None:
            inputs = inputs + self.position(positions)
        outputs, state = run_recurrent(self.rnn, self.drop(inputs), state)  # (B, T, H)
        return self.head(self.drop(outputs)), state  # logits (B, T, V); state: (h, c) or h


def build_model(config: dict) -> nn.Module:
    """Rebuild a checkpoint's model from its config (the tests and --generate-only use this)."""
    fields = {k: config[k] for k in SeqConfig.__dataclass_fields__ if k in config}
    return SequenceModel(SeqConfig(**fields))


# %%
# Part 3b. Training with truncated back-propagation through time (TBPTT), as in lab 06: the training
# tunes are one long token stream (BOS/EOS between tunes) cut into `batch_size` parallel rows; each
# step reads the next `bptt` tokens of every row and carries the state over, detached. The budget is
# a number of steps (or --epochs), not seconds: on a shared machine a time budget would give another
# model every run. The learning rate warms up, then follows a cosine.
def learning_rate(peak: float, progress: float, warmup: float = 0.05) -> float:
    if progress < warmup:
        return peak * progress / warmup
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))
    return peak * (0.05 + 0.95 * cosine)


def as_streams(data: torch.Tensor, streams: int) -> torch.Tensor:
    """(N,) -> (streams, N // streams): row s is one contiguous stretch of the token stream."""
    length = data.numel() // streams
    return data[: streams * length].view(streams, length)


def read_train_loss(loss_sum, first_bad, steps: int, label: str) -> float:
    """The one read from the device per log interval: the mean loss, or a LabError naming the first
    step whose loss was not finite (kept on the device until now)."""
    total, bad = torch.stack([loss_sum.float(), first_bad.float()]).tolist()  # one wait for both
    if bad >= 0:
        raise LabError(f"the {label} training loss became NaN or infinite at step {int(bad)}; try a lower --lr")
    return total / steps


@dataclass
class TrainPlan:
    label: str
    steps: int  # optimizer steps (used when epochs == 0)
    epochs: int
    batch_size: int
    bptt: int
    lr: float
    log_every: int
    clip: float = 1.0
    weight_decay: float = 0.01

    @property
    def tag(self) -> str:
        """The network's section in TensorBoard, named like its checkpoint: "melody LSTM" -> "melody_lstm"."""
        return self.label.lower().replace(" ", "_")


def log_interval(bar, writer, plan: TrainPlan, step: int, train_loss: float, lr: float) -> None:
    """What a log line has just read, on the progress bar and in TensorBoard: no read from the GPU."""
    bar.set_postfix(train_loss=f"{train_loss:.3f}")
    if writer is not None:
        writer.add_scalar(f"{plan.tag}/loss_train", train_loss, step)
        writer.add_scalar(f"{plan.tag}/lr", lr, step)


def print_above(bar, line: str) -> None:
    """A log line above the progress bar, flushed at once: a pipe or a log file shows it now."""
    bar.write(line)
    sys.stdout.flush()


def train_tbptt(model, stream: torch.Tensor, plan: TrainPlan, device, dtype, writer=None, show_progress=False):
    """Train on one long token stream for plan.steps steps (or plan.epochs passes). No step waits for
    the GPU: the loss is summed on the device and read every plan.log_every steps; with a `writer`,
    the values read go to TensorBoard. Returns (history, steps, seconds)."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay, betas=(0.9, 0.99))
    scaler = grad_scaler(device, dtype)
    batch_size = max(1, min(plan.batch_size, (stream.numel() - 1) // (plan.bptt + 1)))  # tiny data: fewer rows
    rows = as_streams(stream, batch_size).to(device)  # (B, L)
    chunks = (rows.shape[1] - 1) // plan.bptt
    if chunks < 1:
        raise LabError(f"the {plan.label} training data is too short for --bptt {plan.bptt}")
    total_steps = plan.epochs * chunks if plan.epochs else plan.steps
    history = {"time_s": [], "train_loss": []}
    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), -1, device=device)
    step, read_at, state = 0, 0, None
    print_every = max(plan.log_every, total_steps // 8 // plan.log_every * plan.log_every)
    # A bar (steps, rate, time left) that goes when training ends; the log lines print above it.
    bar = tqdm(total=total_steps, desc=plan.label, unit="step", leave=False, disable=None if show_progress else True)
    model.train()
    start = time.perf_counter()
    while step < total_steps:
        progress = step / total_steps
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(plan.lr, progress)
        column = (step % chunks) * plan.bptt
        if column == 0:
            state = None  # a new pass over the data starts with a fresh memory
        inputs = rows[:, column:column + plan.bptt]  # (B, T)
        targets = rows[:, column + 1:column + plan.bptt + 1]  # (B, T): the next token
        if state is not None:
            state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        with autocast(device, dtype):
            logits, state = model(inputs, state)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        nn.utils.clip_grad_norm_(model.parameters(), plan.clip)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        bar.update()
        loss_sum += loss.detach()
        first_bad = torch.where(torch.isfinite(loss.detach()) | (first_bad >= 0), first_bad, step)
        if step % plan.log_every and step < total_steps:
            continue  # nothing read from the GPU on this step
        history["train_loss"].append(read_train_loss(loss_sum, first_bad, step - read_at, plan.label))
        now = time.perf_counter() - start
        history["time_s"].append(now)
        loss_sum.zero_()
        read_at = step
        log_interval(bar, writer, plan, step, history["train_loss"][-1], optimizer.param_groups[0]["lr"])
        if step % print_every == 0:
            left = (total_steps - step) * now / step
            print_above(bar, f"  [{plan.label}] step {step:5d}  epoch {step / chunks:5.2f}  train "
                             f"{history['train_loss'][-1]:.3f} nats/token  {step * inputs.numel() / now:,.0f} tokens/s  "
                             f"{max(left, 0):4.0f} s left")
    bar.close()
    return history, step, time.perf_counter() - start


def padded_batches(sequences, batch_size: int):
    """Token lists -> (inputs, targets) batches, padded; padded targets are -100 (ignored)."""
    for i in range(0, len(sequences), batch_size):
        group = sequences[i:i + batch_size]
        width = max(len(s) for s in group) - 1
        inputs = torch.full((len(group), width), EOS, dtype=torch.long)
        targets = torch.full((len(group), width), -100, dtype=torch.long)
        for row, sequence in enumerate(group):
            inputs[row, :len(sequence) - 1] = torch.tensor(sequence[:-1])
            targets[row, :len(sequence) - 1] = torch.tensor(sequence[1:])
        yield inputs, targets


@torch.no_grad()
def evaluate_sequences(model, sequences, device, dtype=None, batch_size=64):
    """Each held-out sequence from a fresh state, as the n-grams see it: (nats per predicted token,
    next-token accuracy). One read from the device for the whole pass."""
    model.eval()
    total = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    count = sum(len(s) - 1 for s in sequences)  # predicted tokens: every one after the first, EOS included
    for inputs, targets in padded_batches(sequences, batch_size):
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast(device, dtype):
            logits, _ = model(inputs)
        total += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=-100)
        mask = targets != -100
        correct += (logits.argmax(-1).eq(targets) & mask).sum()
    model.train()
    nll, hits = torch.stack([total, correct.float()]).tolist()
    return nll / max(count, 1), hits / max(count, 1)


# %%
# Part 3c. Checkpoints: the state_dict, the config that rebuilds the model (with its vocabulary),
# and a few inputs with the outputs the model gave, so anyone can check a reload reproduces it.
def save_checkpoint(model, config: SeqConfig, extra: dict, sample_inputs, path: Path):
    """sample_inputs: a (B, T) token tensor, or a dict of model(**inputs) arguments (tokens, positions)."""
    model.eval()
    device = next(model.parameters()).device
    if not isinstance(sample_inputs, dict):
        sample_inputs = sample_inputs.cpu()
    with torch.no_grad():
        if isinstance(sample_inputs, dict):
            sample_inputs = {k: v.cpu() for k, v in sample_inputs.items()}
            logits, state = model(**{k: v.to(device) for k, v in sample_inputs.items()})
        else:
            logits, state = model(sample_inputs.to(device))
    state = tuple(s.cpu() for s in state) if isinstance(state, tuple) else state.cpu()
    payload = {"lab": LAB_NAME, "model": {k: v.cpu() for k, v in model.state_dict().items()},
               "config": {**asdict(config), **extra}, "sample_inputs": sample_inputs,
               "sample_outputs": (logits.float().cpu(), state)}
    torch_save_atomically(payload, path)  # an interrupted save never leaves a broken checkpoint
    model.train()


def load_checkpoint(path: Path, device, task: str):
    """Returns (model, config). A missing, corrupt or foreign file is a LabError that says which."""
    if not path.is_file():
        raise LabError(f"checkpoint {path} does not exist; train first (the default run saves "
                       f"<out-dir>/melody_lstm.pt) or give the right path to --generate-only")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise LabError(f"checkpoint {path} cannot be loaded: the file is truncated or corrupt ({error_text(err)})") from None
    config = saved.get("config") if isinstance(saved, dict) else None
    if not isinstance(config, dict) or config.get("task") != task or "model" not in saved:
        raise LabError(f"checkpoint {path} is not this lab's {task} model; give --generate-only the "
                       f"melody_lstm.pt or melody_gru.pt written by {LAB_NAME}")
    try:
        model = build_model(config)
        model.load_state_dict(saved["model"])
    except Exception as err:
        raise LabError(f"checkpoint {path} does not fit this lab's model ({error_text(err)})") from None
    return model.to(device).eval(), config


# %%
# Part 4a. The ABC model reads whole tunes. A tune is ~160 tokens (the longest are cut at
# ABC_MAX_TOKENS), so each one fits in a single sequence: every step trains on a batch of whole
# tunes, each from a fresh state, the way the model later writes one. Batches are drawn from tunes
# of similar length, so padding (ignored by the loss) costs little. Each token comes with what
# is left of its bar (BarClock above).
ABC_MAX_TOKENS = 512


def encode_abc(text: str, index: dict):
    """A tune -> (token ids starting with <s>, positions in the bar); unknown tokens -> <unk>."""
    tokens = abc_tokens(text)
    return [index["<s>"]] + [index.get(t, index["<unk>"]) for t in tokens], [0] + bar_positions(tokens)


def tune_batch(tunes):
    """[(ids, positions)] -> inputs, positions, targets (B, T); padded targets are -100 (ignored)."""
    width = max(len(ids) for ids, _ in tunes) - 1
    inputs = torch.zeros((len(tunes), width), dtype=torch.long)
    positions = torch.zeros((len(tunes), width), dtype=torch.long)
    targets = torch.full((len(tunes), width), -100, dtype=torch.long)
    for row, (ids, where) in enumerate(tunes):
        inputs[row, :len(ids) - 1] = torch.tensor(ids[:-1])
        positions[row, :len(ids) - 1] = torch.tensor(where[:-1])
        targets[row, :len(ids) - 1] = torch.tensor(ids[1:])
    return inputs, positions, targets


def tune_batches(tunes, batch_size: int, generator):
    """Endless batches: each pass sorts the tunes by length (with a little noise), cuts them into
    batches and shuffles the batches."""
    while True:
        noise = torch.rand(len(tunes), generator=generator) * 40
        order = sorted(range(len(tunes)), key=lambda i: len(tunes[i][0]) + float(noise[i]))
        groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for g in torch.randperm(len(groups), generator=generator).tolist():
            yield tune_batch([tunes[i] for i in groups[g]])


def train_whole_tunes(model, tunes, plan: TrainPlan, device, dtype, generator, writer=None, show_progress=False):
    """Train on batches of whole tunes for plan.steps steps. As in train_tbptt, the loss is summed
    on the device and read every plan.log_every steps (and goes to TensorBoard with a `writer`).
    Returns (history, steps, seconds)."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay, betas=(0.9, 0.99))
    scaler = grad_scaler(device, dtype)
    tunes = [(ids[:ABC_MAX_TOKENS + 1], where[:ABC_MAX_TOKENS + 1]) for ids, where in tunes]
    per_pass = math.ceil(len(tunes) / plan.batch_size)
    total_steps = plan.epochs * per_pass if plan.epochs else plan.steps
    history = {"time_s": [], "train_loss": []}
    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), -1, device=device)
    step, read_at, seen = 0, 0, 0
    print_every = max(plan.log_every, total_steps // 8 // plan.log_every * plan.log_every)
    batches = tune_batches(tunes, plan.batch_size, generator)
    bar = tqdm(total=total_steps, desc=plan.label, unit="step", leave=False, disable=None if show_progress else True)
    model.train()
    start = time.perf_counter()
    while step < total_steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(plan.lr, step / total_steps)
        inputs, positions, targets = (t.to(device, non_blocking=True) for t in next(batches))  # (B, T) each
        with autocast(device, dtype):
            logits, _ = model(inputs, positions=positions)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), plan.clip)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        bar.update()
        seen += inputs.shape[0]
        loss_sum += loss.detach()
        first_bad = torch.where(torch.isfinite(loss.detach()) | (first_bad >= 0), first_bad, step)
        if step % plan.log_every and step < total_steps:
            continue
        history["train_loss"].append(read_train_loss(loss_sum, first_bad, step - read_at, plan.label))
        now = time.perf_counter() - start
        history["time_s"].append(now)
        loss_sum.zero_()
        read_at = step
        log_interval(bar, writer, plan, step, history["train_loss"][-1], optimizer.param_groups[0]["lr"])
        if step % print_every == 0:
            print_above(bar, f"  [{plan.label}] step {step:5d}  epoch {seen / len(tunes):5.2f}  train "
                             f"{history['train_loss'][-1]:.3f} nats/token  {seen / now:,.1f} tunes/s  "
                             f"{max((total_steps - step) * now / step, 0):4.0f} s left")
    bar.close()
    return history, step, time.perf_counter() - start


@torch.no_grad()
def evaluate_tunes(model, tunes, device, dtype=None, batch_size=64) -> float:
    """Nats per predicted token over whole held-out tunes (every token after <s>)."""
    model.eval()
    total = torch.zeros((), device=device)
    count = sum(len(ids) - 1 for ids, _ in tunes)
    for i in range(0, len(tunes), batch_size):
        inputs, positions, targets = (t.to(device) for t in tune_batch(tunes[i:i + batch_size]))
        with autocast(device, dtype):
            logits, _ = model(inputs, positions=positions)
        total += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=-100)
    model.train()
    return total.item() / max(count, 1)


@torch.no_grad()
def sample_tunes(model, vocabulary, headers, length: int, device, generator, temperature: float = 1.0):
    """Write one tune after each header (M:, L:, K:), a token at a time from the whole softmax, until
    the model ends the line of notes (a newline token) or `length` tokens. Each row has its own
    BarClock, fed the tokens the model drew, so the position it reads is the one it wrote itself.
    Returns the tunes as text: the header, then the notes."""
    model.eval()
    index = {token: i for i, token in enumerate(vocabulary)}
    clocks, states, last = [], [], []
    for header in headers:  # headers differ in length: read each one alone
        ids, where = encode_abc(header, index)
        clock = BarClock()
        for token in abc_tokens(header):
            clock.read(token)
        logits, state = model(torch.tensor([ids], device=device), positions=torch.tensor([where], device=device))
        clocks.append(clock)
        states.append(state)
        last.append(logits[:, -1])
    logits = torch.cat(last)  # (B, V)
    state = (tuple(torch.cat(parts, dim=1) for parts in zip(*states)) if isinstance(states[0], tuple)
             else torch.cat(states, dim=1))
    drawn, done = [[] for _ in headers], [False] * len(headers)
    for _ in range(length):
        probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
        tokens = torch.multinomial(probs, 1, generator=generator)  # (B, 1) on the CPU
        positions = []
        for row, token in enumerate(tokens[:, 0].tolist()):
            text = vocabulary[token]
            positions.append(position_bucket(clocks[row].read(text)))
            if not done[row]:
                done[row] = text == "\n"  # the end of the line of notes is the end of the tune
                drawn[row].append("" if done[row] else text)
        if all(done):
            break
        logits, state = model(tokens.to(device), state, torch.tensor(positions, device=device)[:, None])
        logits = logits[:, -1]
    model.train()
    return [header + "".join(tokens) + "\n" for header, tokens in zip(headers, drawn)]


# %%
# Part 4b. The validity checker: one function for real and generated tunes. A tune is valid music when
# music21 parses it, it has a metre and at least two bars, and every complete bar lasts exactly one
# bar of the metre. Short bars are allowed only where ABC allows them: the pick-up at the start, the
# last bar, and bars next to a repeat sign, a double bar or a 1st/2nd-time ending (a tune's pick-up
# is often split across the repeat). No bar may be too long.
def abc_validity(tune: str, music21=None):
    """(valid, reason) for one ABC tune (header fields M:, L:, K: and the notes)."""
    # Exercise abc_validity: parse the tune with music21 (the ABC format), refuse it with a reason
    # when it has no metre or key, fewer than two bars, a change of metre, or a bar longer than the
    # metre; a bar shorter than the metre only at the start, the end, or next to a repeat sign,
    # double bar or 1st/2nd-time ending (is_section_edge). Return (True, "valid") otherwise.
    # Docs: https://www.music21.org/music21docs/moduleReference/moduleMeter.html
    music21 = music21 or import_music21()
    if not abc_field(tune, "M"):
        return False, "no metre (M:) field"
    if not abc_field(tune, "K"):
        return False, "no key (K:) field"
    lines = [line for line in tune.splitlines() if line.strip()]
    is_field = [bool(re.match(r"^[A-Za-z]:", line)) for line in lines]
    first_notes = is_field.index(False) if False in is_field else len(lines)
    body = lines[first_notes:]
    header_after_notes = any(is_field[first_notes:])
    if not any("|" in line for line in body):
        return False, "fewer than two bars"
    if header_after_notes or re.search(r"\[[MLK]:", tune):
        return False, "the metre changes"  # a header field inside the tune (ours keep one metre, unit and key)
    if re.search(r"\d{3,}|/{3,}", "".join(body)):
        return False, "a note length out of range"  # music21 can spend minutes on A999 or A////
    text = tune if re.search(r"^X:", tune, flags=re.M) else "X:1\n" + tune
    try:
        with time_limit(10), contextlib.redirect_stderr(io.StringIO()):  # music21's warnings: the reason says it
            score = music21.converter.parse(text, format="abc")
    except TimeoutError:
        return False, "music21 did not finish parsing it in 10 s"
    except Exception as err:  # music21's ABC reader raises many kinds on broken text
        return False, f"music21 cannot parse it ({error_text(err)[:80]})"
    part = score.parts[0] if getattr(score, "parts", None) else score
    bars = list(part.getElementsByClass("Measure"))
    metres = list(score.recurse().getElementsByClass("TimeSignature"))
    if len(bars) < 2 or not metres:
        return False, "fewer than two bars"
    if metres[0].ratioString != metres[-1].ratioString:
        return False, "the metre changes"
    bar_length = float(metres[0].barDuration.quarterLength)
    for i, bar in enumerate(bars):
        length = float(bar.duration.quarterLength)
        if abs(length - bar_length) < 1e-6:
            continue
        if length > bar_length + 1e-6:
            return False, f"bar {i + 1} lasts {length:g} quarters, the metre {bar_length:g}"
        at_boundary = (i == 0 or i == len(bars) - 1 or is_section_edge(bar, music21)
                       or is_section_edge(bars[i - 1], music21, side="right")
                       or is_section_edge(bars[i + 1], music21, side="left"))
        if not at_boundary:
            return False, f"bar {i + 1} lasts {length:g} quarters, the metre {bar_length:g}"
    return True, "valid"


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise TimeoutError after `seconds` (Unix, main thread only; elsewhere no limit): a generated
    tune can send music21's bar-line repair into a very long search."""
    import signal
    import threading

    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(_signum, _frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def is_section_edge(bar, music21, side: str = "both") -> bool:
    """Does this bar start or end a section: a repeat sign, a double/final bar line, an ending bracket?"""
    def special(line):
        return line is not None and (isinstance(line, music21.bar.Repeat) or line.type not in ("regular", "normal"))
    if side in ("both", "left") and special(bar.leftBarline):
        return True
    if side in ("both", "right") and special(bar.rightBarline):
        return True
    return side == "both" and any(isinstance(s, music21.spanner.RepeatBracket) for s in bar.getSpannerSites())


def validity_share(tunes, music21, desc: str, progress=True):
    """Share of tunes abc_validity accepts, and the reasons the others failed (counted)."""
    from tqdm.auto import tqdm

    reasons = Counter()
    valid = 0
    for tune in tqdm(tunes, desc=desc, unit="tune", disable=None if progress else True, mininterval=2):
        ok, why = abc_validity(tune, music21)
        valid += ok
        if not ok:
            reasons[re.sub(r"\b\d+(?:\.\d+)?\b", "N", why.split("(")[0]).strip()] += 1
    return valid / max(len(tunes), 1), reasons


# %%
# Part 5. Chords: one label per beat from the four voices of each chorale (chord_label above), as a
# sequence. The bigram baseline predicts the chord most often seen after the current one; the LSTM
# sees the whole progression so far (where the phrase is, which cadence is coming).
def chord_vocabulary(train_sequences, min_count: int = 3):
    counts = Counter(label for sequence in train_sequences for label in sequence)
    return ["<s>", "</s>", "other"] + sorted(label for label, n in counts.items() if n >= min_count)


def encode_chords(labels, index):
    return [BOS] + [index.get(label, 2) for label in labels] + [EOS]


def bigram_accuracy(model: NGramModel, sequences) -> float:
    """Share of next chords (after the first, EOS included) that the bigram's arg-max predicts."""
    best = {}
    hits = total = 0
    for sequence in sequences:
        for i in range(1, len(sequence)):
            previous = sequence[i - 1]
            if previous not in best:
                best[previous] = model.most_likely([previous])
            hits += best[previous] == sequence[i]
            total += 1
    return hits / max(total, 1)


# %%
# Part 6a. Generation: draw one token at a time from softmax(logits / temperature), keeping only the
# top-k most likely (k = 0 keeps all). Many melodies are drawn at once, one per row of a batch.
# Melodies are drawn with top-k 10 by default (temperature 1.0): a 1,000-step model still spreads a
# few percent of probability over hundreds of unlikely events, and over 64 draws that tail adds up.
# Part 6 prints the statistics with top-k off too, so you can hear and see what the cut changes.
# The ABC validity figure is always measured on the whole softmax at temperature 1.0: truncating
# there would hide exactly the mistakes (a bar one eighth too long) that the checker counts.
@torch.no_grad()
def sample_batch(model, primes, length: int, temperature: float, top_k: int, device, generator, stop_token=None,
                 banned=(), stop_repeat: int = 1):
    """Continue every prime (a token list) by up to `length` tokens. Returns the drawn tokens per row,
    cut where stop_token came `stop_repeat` times in a row (ABC: a blank line ends a tune)."""
    model.eval()
    drawn = [[] for _ in primes]
    done = [False] * len(primes)
    # Primes differ in length and padding would run through the RNN's state: read each one alone.
    states, last = [], []
    for prime in primes:
        logits, state = model(torch.tensor([prime], device=device))
        states.append(state)
        last.append(logits[:, -1])
    logits = torch.cat(last)  # (B, V)
    state = (tuple(torch.cat(parts, dim=1) for parts in zip(*states)) if isinstance(states[0], tuple)
             else torch.cat(states, dim=1))
    for _ in range(length):
        scores = logits.float() / temperature
        for token in banned:
            scores[:, token] = -float("inf")
        if top_k:
            kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        probs = torch.softmax(scores, dim=-1).cpu()
        tokens = torch.multinomial(probs, 1, generator=generator)  # (B, 1) on the CPU
        for row, token in enumerate(tokens[:, 0].tolist()):
            if done[row]:
                continue
            drawn[row].append(token)
            if stop_token is not None and drawn[row][-stop_repeat:] == [stop_token] * stop_repeat:
                done[row] = True
                del drawn[row][-stop_repeat:]
        if all(done):
            break
        logits, state = model(tokens.to(device), state)
        logits = logits[:, -1]
    model.train()
    return drawn


def random_melody(length: int, low: int, high: int, duration_weights, generator):
    """The baseline: uniform random pitches in the held-out melodies' range, durations as in the
    training melodies. It has no idea of a key."""
    pitches = torch.randint(low, high + 1, (length,), generator=generator).tolist()
    durations = torch.multinomial(duration_weights, length, replacement=True, generator=generator).tolist()
    return [(p, DURATIONS[d]) for p, d in zip(pitches, durations)]


# %%
# Part 6b. Musical statistics: does the generated music sound like the real music? Each melody's
# pitches are counted relative to ITS tonic (so a tune in D and one in G are compared as degrees of
# the scale), pooled, and compared by histogram intersection: sum of min(p_i, q_i), 1 = identical.
def tonic_relative_histogram(melodies) -> list:
    """melodies: [(events, tonic pitch class)] -> 12 shares (degree 0 = the tonic), rests ignored."""
    # Exercise tonic_relative_histogram: count every sounding pitch by its distance above the tonic,
    # (pitch - tonic) % 12, over all melodies, and return the 12 shares (all zeros when there are
    # no notes). Transposing a melody and its tonic together must leave the histogram unchanged.
    # Docs: https://pytorch.org/docs/stable/generated/torch.bincount.html
    counts = [0] * 12
    for events, tonic in melodies:
        for pitch, _ in events:
            if pitch:
                counts[(pitch - tonic) % 12] += 1
    total = sum(counts)
    return [c / total for c in counts] if total else [0.0] * 12


def histogram_intersection(a, b) -> float:
    return sum(min(x, y) for x, y in zip(a, b))


def duration_histogram(melodies) -> list:
    counts = [0] * len(DURATIONS)
    for events, _ in melodies:
        for _, quarters in events:
            counts[snap_duration(quarters)] += 1
    total = sum(counts)
    return [c / total for c in counts] if total else [0.0] * len(DURATIONS)


def music_statistics(melodies, reference, modes):
    """Statistics of (events, tonic) melodies against the reference histograms."""
    pitched = [[p for p, _ in events if p] for events, _ in melodies]
    in_key = total = 0
    for (events, tonic), mode in zip(melodies, modes):
        scale = MODE_SCALES[mode]
        for pitch, _ in events:
            if pitch:
                in_key += (pitch - tonic) % 12 in scale
                total += 1
    histogram = tonic_relative_histogram(melodies)
    return {"pitch_class_intersection": histogram_intersection(histogram, reference["pitch_classes"]),
            "duration_intersection": histogram_intersection(duration_histogram(melodies), reference["durations"]),
            "mean_range_semitones": sum(max(p) - min(p) for p in pitched if p) / max(1, sum(1 for p in pitched if p)),
            "in_key_ratio": in_key / max(total, 1), "pitch_class_histogram": histogram}


# %%
# Part 7. Listening. MIDI through music21; WAV from a small additive synthesiser in torch (a few
# harmonics under a plucked envelope) written with the standard `wave` module; a piano roll.
def melody_to_midi(events, path: Path, music21, tempo_qpm: float = 100):
    stream = music21.stream.Stream()
    stream.append(music21.tempo.MetronomeMark(number=tempo_qpm))
    for pitch, quarters in events:
        stream.append(music21.note.Rest(quarterLength=quarters) if pitch == 0
                      else music21.note.Note(pitch, quarterLength=quarters))
    stream.write("midi", fp=str(path))


def synthesise(events, sample_rate: int = 22050, tempo_qpm: float = 100) -> torch.Tensor:
    """Events -> a mono waveform in [-1, 1]: each note is 4 harmonics under an attack-decay envelope."""
    seconds_per_quarter = 60.0 / tempo_qpm
    pieces = []
    for pitch, quarters in events:
        n = max(1, int(quarters * seconds_per_quarter * sample_rate))
        if pitch == 0:
            pieces.append(torch.zeros(n))
            continue
        t = torch.arange(n) / sample_rate
        frequency = 440.0 * 2 ** ((pitch - 69) / 12)
        tone = sum(0.5 ** h * torch.sin(2 * math.pi * (h + 1) * frequency * t) for h in range(4))
        envelope = torch.clamp(t / 0.01, max=1.0) * torch.exp(-3.0 * t)  # 10 ms attack, then decay
        release = torch.clamp((n - torch.arange(n)) / (0.01 * sample_rate), max=1.0)  # no clicks at the end
        pieces.append(tone * envelope * release)
    audio = torch.cat(pieces) if pieces else torch.zeros(1)
    return 0.8 * audio / audio.abs().max().clamp_min(1e-6)


def write_wav(audio: torch.Tensor, path: Path, sample_rate: int = 22050) -> None:
    samples = (audio.clamp(-1, 1) * 32767).to(torch.int16)
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(sample_rate)
        file.writeframes(samples.numpy().tobytes())


def play_inline(path: Path) -> None:
    """In a notebook, an audio player for the WAV file; nothing in a terminal."""
    if in_notebook():
        from IPython.display import Audio, display
        display(Audio(filename=str(path)))


def plot_piano_roll(pieces, path: Path):
    """pieces: [(title, prime events, generated events)]; the prime is grey, the continuation coloured."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(pieces), 1, figsize=(10, 2.0 * len(pieces) + 0.5), squeeze=False)
    for ax, (title, prime, generated) in zip(axes[:, 0], pieces):
        time_q = 0.0
        for events, color in ((prime, "0.6"), (generated, "C0")):
            for pitch, quarters in events:
                if pitch:
                    ax.broken_barh([(time_q, quarters * 0.95)], (pitch - 0.4, 0.8), color=color)
                time_q += quarters
        ax.axvline(sum(q for _, q in prime), color="C3", lw=0.8, ls="--")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("MIDI pitch")
    axes[-1, 0].set_xlabel("time (quarter notes); grey: the prime, blue: generated")
    fig.tight_layout()
    save_figure(fig, path)


def plot_statistics(histograms: dict, nll_table: dict, path: Path):
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    degrees = ["1", "b2", "2", "b3", "3", "4", "#4", "5", "b6", "6", "b7", "7"]
    width = 0.8 / len(histograms)
    for i, (name, histogram) in enumerate(histograms.items()):
        left.bar([d + i * width for d in range(12)], histogram, width=width, label=name)
    left.set_xticks([d + 0.4 - width / 2 for d in range(12)], degrees)
    left.set_xlabel("pitch class relative to the tonic")
    left.set_ylabel("share of notes")
    left.legend(fontsize=8)
    left.set_title("Tonic-relative pitch-class histograms")
    names = list(nll_table)
    right.barh(names, [nll_table[n] for n in names], color=["0.6" if "gram" in n else "C0" for n in names])
    right.set_xlabel("held-out NLL (nats per event, lower is better)")
    right.set_title("Note-event models on the test tunes")
    fig.tight_layout()
    save_figure(fig, path)


def log_picture(writer, tag: str, path: Path, step: int) -> None:
    """A figure the lab has saved, also in TensorBoard's Images tab."""
    import matplotlib.pyplot as plt

    writer.add_image(tag, plt.imread(path), step, dataformats="HWC")


def write_listening(pieces, out_dir: Path, music21):
    """MIDI + WAV for every generated melody (prime included, as you would play it)."""
    written = []
    for i, (title, prime, generated) in enumerate(pieces, start=1):
        events = list(prime) + list(generated)
        midi, wav = out_dir / f"melody_{i:02d}.mid", out_dir / f"melody_{i:02d}.wav"
        melody_to_midi(events, midi, music21)
        write_wav(synthesise(events), wav)
        play_inline(wav)
        written += [midi.name, wav.name]
    return written


# %%
# Reading your own melody (--prime) and ABC files (--score-abc): one line when they cannot be read.
def read_prime(path: Path, music21):
    """Your melody as (events, tonic, mode): any file music21 reads (ABC, MIDI, MusicXML)."""
    if not path.is_file():
        raise LabError(f"--prime {path} does not exist; give an ABC, MIDI or MusicXML file with your melody")
    try:
        score = music21.converter.parse(str(path))
        events = melody_events(score)
        key = score.analyze("key")
    except Exception as err:
        raise LabError(f"--prime {path} cannot be read as music by music21 ({error_text(err)[:120]})") from None
    events = [(min(max(p, PITCH_LOW), PITCH_HIGH) if p else 0, q) for p, q in events]
    if len(events) < 2:
        raise LabError(f"--prime {path} holds fewer than two notes; give a melody to continue")
    return events, key.tonic.pitchClass, ("minor" if key.mode == "minor" else "major")


def read_abc_file(path: Path):
    """An ABC text file -> its tunes. Missing, not UTF-8, or without a tune: a LabError."""
    if not path.is_file():
        raise LabError(f"--score-abc {path} does not exist; give a text file of ABC tunes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LabError(f"--score-abc {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    tunes = [t for t in split_abc_tunes(text) if re.search(r"^[MK]:", t, flags=re.M)]
    if not tunes:
        raise LabError(f"--score-abc {path} holds no ABC tune (no M: or K: field); tunes are separated by "
                       "X: lines or blank lines")
    return tunes


def score_abc_file(args):
    tunes = read_abc_file(args.score_abc)
    music21 = import_music21()
    share, reasons = validity_share(tunes, music21, desc="checking", progress=True)
    print(f"{args.score_abc}: {round(share * len(tunes))} of {len(tunes)} tunes are valid ABC music "
          f"(share {share:.3f}); reasons for the rest: {dict(reasons.most_common(5))}")
    return share


def export_abc(args, data_dir):
    """Write the ABC training tunes, one after another with a blank line between, for capstone 2."""
    music21 = import_music21()
    tunes, _, _ = abc_corpus(music21)
    train = [text for name, text in tunes if split_of(name) == "train" and bars_add_up(text)]
    path = Path(args.export_abc)
    if path.is_dir():
        raise LabError(f"--export-abc {path} is a folder; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text("\n".join(train), encoding="utf-8")
    os.replace(temporary, path)
    print(f"wrote {len(train)} ABC training tunes ({path.stat().st_size:,} bytes) to {path}; score any "
          f"generated text with: python week3_rnn/{LAB_NAME}.py --score-abc FILE")


# %%
# Notes: what other measured runs showed (same 2-core machine, shared with other jobs).
# - How ABC validity went from 54 % to the default's, Part 4 alone through the lab's functions, one
#   PyTorch thread, 100 tunes drawn at temperature 1.0 (a share of 100 is uncertain by about 4
#   points either way), before layout cleaning unless said:
#   O'Neill's tunes alone, 600 steps (the previous default): 54 %, validation 1.560 nats/token.
#   With Ryan's Mammoth: 66 %; with all four collections: 70 % (600 steps), 79 % (1,200 steps; 77 %
#   with seed 1), 75 % (1,800 steps: validation 1.410, a better NLL and no more valid tunes);
#   256 units and 600 steps: 78 % in 115 s against 97 s.
#   Backquotes, spacers and chords out of the training text: 81 % and 73 % (seeds 0 and 1): tunes
#   music21 cannot parse went from 6 and 4 to 0 and 1, the bars of the wrong length stayed (16, 23).
#   Training only on tunes whose bars add up (the default): 85 % and 87 %.
#   Telling the model by how much a bar is overfull (negative buckets, not one "overfull" bucket):
#   58 % against 70 % (600 steps, before cleaning): no help.
# - Earlier, on O'Neill's tunes alone, 50 tunes drawn: 256 units and 800 steps, 46 %; peak learning
#   rate 0.015, 54 %.
# - Without the bar clock (tokens alone, 256 units, step 400 of 800, 16 tunes a step) a prototype
#   gave 12 %; counting the position up from the bar line instead of down to its end, 26 % (38 %
#   at step 800). The characters of the previous version of this lab gave 2 % (18 % with twice the steps).
# - The GRU trained 1,000 steps in an earlier version of this lab reached 2.725 nats/event on the
#   same test tunes, behind the LSTM's 2.651 and ahead of the 3-gram; it trained 320 s (wall, on a
#   loaded machine) against the LSTM's 230 s: that time now goes to the ABC model.


# %%
# Predict, then run. Write your prediction down before each command; the lab prints the answer.
# 1. Run: python week3_rnn/music_melody_lstm.py --abc-bar-clock off
#    Predict: without what is left of the bar beside each token, what share of the generated tunes
#    is still valid music: about the same, half, or a tenth of the default run's?
#    Answer: the Part 4 line "valid music: ... generated tunes ... vs ... real"; abc_valid_share_generated.
# 2. Run: python week3_rnn/music_melody_lstm.py --gru-steps 1000
#    Predict: with as many steps as the LSTM, does the GRU catch up with the LSTM's test NLL?
#    Answer: the Part 3 table "held-out test NLL per event"; gru_test_nll and lstm_test_nll in metrics.json.
# 3. Run: python week3_rnn/music_melody_lstm.py --top-k 0
#    Predict: drawing from the whole softmax, does the share of notes in the key go up or down?
#    Answer: the Part 6 line "lstm ... in key"; statistics.lstm.in_key_ratio in metrics.json.
# 4. Run: python week3_rnn/music_melody_lstm.py --bug split-by-window
#    Predict: will the 4-gram's held-out NLL look better or worse than with the split by tune?
#    Answer: the Part 2 lines "4-gram: validation ..., test ..." and "test tunes that also have events
#    in the training set"; test_tunes_also_in_training in metrics.json.


# %%
# Putting it together: flags, the parts in order, metrics.json and a summary.
def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where the networks train (auto: the accelerator if any); n-grams and music21 use the CPU")
    parser.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                        help="autocast dtype on CUDA (auto: bf16 where native, else fp16 with a GradScaler)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for weights, data order and sampling")
    parser.add_argument("--data-dir", type=Path, default=Path("./data"),
                        help="where the parsed corpus is cached (music_melody_lstm/corpus_v<version>.json)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs") / LAB_NAME, help="where outputs go")
    parser.add_argument("--smoke", action="store_true",
                        help="every code path in seconds on generated tunes (the corpus is never parsed)")
    parser.add_argument("--threads", type=whole_number, default=1,
                        help="CPU threads for PyTorch during the run (0: PyTorch's default; see cpu_threads)")
    parser.add_argument("--folk-tunes", type=whole_number, default=500,
                        help="how many O'Neill tunes are parsed into note events (about 0.25 s each, once)")
    parser.add_argument("--steps", type=positive_int, default=1000,
                        help="training steps of the note-event LSTM")
    parser.add_argument("--gru-steps", type=positive_int, default=700,
                        help="training steps of the note-event GRU (the LSTM's comparison)")
    parser.add_argument("--abc-steps", type=positive_int, default=1200, help="training steps of the ABC token LSTM")
    parser.add_argument("--abc-batch-size", type=positive_int, default=16, help="whole tunes per ABC training step")
    parser.add_argument("--abc-lr", type=positive_float, default=1e-2, help="peak AdamW learning rate of the ABC LSTM")
    parser.add_argument("--abc-dropout", type=probability, default=0.0,
                        help="dropout of the ABC LSTM (it sees each tune only a few times: 0 learns fastest)")
    parser.add_argument("--chord-steps", type=positive_int, default=300, help="training steps of the chord LSTM")
    parser.add_argument("--epochs", type=whole_number, default=0,
                        help="train each network this many passes over its data instead (0: use the step counts)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="parallel token streams per step")
    parser.add_argument("--bptt", type=positive_int, default=64, help="tokens per step: how far gradients flow back")
    parser.add_argument("--lr", type=positive_float, default=4e-3, help="peak AdamW learning rate")
    parser.add_argument("--hidden-size", type=positive_int, default=256, help="units of each recurrent layer")
    parser.add_argument("--abc-hidden-size", type=positive_int, default=128, help="units of the ABC token LSTM")
    parser.add_argument("--dropout", type=probability, default=0.2,
                        help="dropout on embeddings and recurrent outputs")
    parser.add_argument("--log-every", type=positive_int, default=50,
                        help="steps between reads of the training loss from the device")
    parser.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature")
    parser.add_argument("--top-k", type=whole_number, default=10,
                        help="melodies: sample only among the k most likely events (0: all); ABC tunes are "
                             "always drawn from the whole softmax at temperature 1.0")
    parser.add_argument("--melodies", type=positive_int, default=50,
                        help="melodies generated for the statistics (the first 4 are written as MIDI/WAV)")
    parser.add_argument("--abc-samples", type=positive_int, default=50, help="ABC tunes generated and checked")
    parser.add_argument("--bug", default=None, choices=["split-by-window"],
                        help="plant a bug for the debugging drill (see '# Drill:' in split_melodies)")
    parser.add_argument("--abc-bar-clock", default="on", choices=["on", "off"],
                        help="give the ABC LSTM what is left of the bar beside each token (off: the tokens alone)")
    parser.add_argument("--prime", type=Path, default=None,
                        help="a file with your own melody (ABC, MIDI or MusicXML) to continue")
    parser.add_argument("--generate-only", type=Path, default=None, metavar="CHECKPOINT",
                        help="skip training: load a melody_lstm.pt / melody_gru.pt and generate")
    parser.add_argument("--export-abc", type=Path, default=None, metavar="FILE",
                        help="write the ABC training tunes to FILE (for capstone 2) and stop")
    parser.add_argument("--score-abc", type=Path, default=None, metavar="FILE",
                        help="print the validity share of the ABC tunes in FILE (real or generated) and stop")
    return parser


def run(args):
    # Check every input before anything is parsed, written or trained.
    wall_start = time.perf_counter()
    data_dir, out_dir = folder(args.data_dir, "--data-dir"), folder(args.out_dir, "--out-dir")
    device = pick_device(args.device)
    dtype = pick_precision(args.precision, device)
    if args.score_abc is not None:
        score_abc_file(args)
        return
    if args.export_abc is not None:
        export_abc(args, data_dir)
        return
    music21 = import_music21()
    prime = read_prime(args.prime, music21) if args.prime is not None else None
    with fast_cuda_kernels(device), cpu_threads(args.threads):
        if args.generate_only is not None:
            generate_only(args, device, out_dir, music21, prime)
        else:
            lesson(args, device, dtype, data_dir, out_dir, wall_start, music21, prime)


def generate_only(args, device, out_dir, music21, prime):
    model, config = load_checkpoint(args.generate_only, device, task="melody")
    generator = torch.Generator().manual_seed(args.seed)
    prime_events, tonic, mode = prime if prime else ([(67, 1.0), (69, 0.5), (71, 0.5), (72, 1.0)], 7, "major")
    out_dir.mkdir(parents=True, exist_ok=True)
    pieces = []
    primed = encode_melody(prime_events, tonic, mode)[:-1]
    for i, tokens in enumerate(sample_batch(model, [primed] * 4, 64, args.temperature,
                                            args.top_k, device, generator, stop_token=EOS, banned=(BOS, *KEY_TOKENS))):
        pieces.append((f"continuation {i + 1} of {'--prime' if prime else 'a G-A-B-C opening'}",
                       prime_events, [token_event(t) for t in tokens]))
    plot_piano_roll(pieces, out_dir / "piano_roll.png")
    written = write_listening(pieces, out_dir, music21)
    print(f"generated {len(pieces)} continuations at temperature {args.temperature}, top-k {args.top_k or 'all'}; "
          f"wrote piano_roll.png and {', '.join(written)} to {out_dir}")


def lesson(args, device, dtype, data_dir, out_dir, wall_start, music21, prime):
    """Parts 1-7 on the corpus (or on generated tunes with --smoke)."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)
    if args.smoke:
        args.steps, args.gru_steps, args.abc_steps, args.chord_steps, args.log_every = 6, 6, 6, 6, 3
        args.abc_batch_size = 4
        args.hidden_size, args.abc_hidden_size, args.batch_size, args.bptt = 32, 32, 8, 16
        args.melodies, args.abc_samples = 6, 4
    show_progress = not args.smoke  # the smoke run (and the tests) print no progress bars
    print(f"lab {LAB_NAME} on {device}" + ("  [SMOKE: generated tunes, a few steps, numbers are not results]"
                                           if args.smoke else ""))

    print("\n== Part 1: the music, as note events and as ABC text")
    music = load_music(args, data_dir)
    records = music["records"]
    split = split_melodies(records, args.bug, window=4 if args.smoke else 32)
    if args.smoke and not args.bug:  # a handful of tunes: every split gets a chorale and a folk tune
        by_source = [[r for r in records if r["source"] == source] for source in ("chorale", "folk")]
        split = {"train": [r for rs in by_source for r in rs[:-2]], "val": [r for rs in by_source for r in rs[-2:-1]],
                 "test": [r for rs in by_source for r in rs[-1:]]}
    melodies = {name: [r["events"] for r in rs] for name, rs in split.items()}
    shared_tunes = tunes_in_train_and_test(split)
    print(f"  test tunes that also have events in the training set: {shared_tunes} of "
          f"{len({r.get('tune', r['name']) for r in split['test']})}" + (f"  [--bug {args.bug}]" if args.bug else ""))
    train_augmented = augment([(r["events"], r["tonic"], r["mode"]) for r in split["train"]])
    print(f"  {len(records)} melodies ({sum(r['source'] == 'chorale' for r in records)} chorale sopranos, "
          f"{sum(r['source'] == 'folk' for r in records)} folk tunes), {music['duplicates']} duplicate chorale "
          f"melodies removed, {len(music['skipped'])} entries skipped; split by {'window' if args.bug else 'tune'} "
          + ", ".join(f"{k} {len(v)}" for k, v in melodies.items()))
    print(f"  transposed to all 12 keys: {len(melodies['train'])} training melodies -> {len(train_augmented)} "
          f"({sum(len(m) for m, _, _ in train_augmented):,} events); a melody as tokens: "
          f"{encode_melody(*train_augmented[0])[:4]}... = the key ({train_augmented[0][2]}, tonic pitch class "
          f"{train_augmented[0][1]}), then {train_augmented[0][0][:3]}...")
    sequences = {"train": [encode_melody(*m) for m in train_augmented],
                 **{name: [encode_melody(r["events"], r["tonic"], r["mode"]) for r in split[name]]
                    for name in ("val", "test")}}

    print("\n== Part 2: n-gram baselines (Witten-Bell smoothing), NLL per event on held-out tunes")
    ngram_val, ngram_test, ngrams = {}, {}, {}
    bar = tqdm(range(1, 5), desc="n-grams", unit="order", leave=False, disable=None if show_progress else True)
    for order in bar:  # counting 600,000 events takes seconds per order
        ngrams[order] = NGramModel(order, MELODY_VOCAB).fit(sequences["train"])
        ngram_val[order] = ngrams[order].nll(sequences["val"])
        ngram_test[order] = ngrams[order].nll(sequences["test"])
        bar.write(f"  {order}-gram: validation {ngram_val[order]:.3f}, test {ngram_test[order]:.3f} nats/event")
    best_order = min(ngram_val, key=ngram_val.get)  # chosen on validation, reported on test
    print(f"  the best n-gram on validation is the {best_order}-gram")

    # TensorBoard (`tensorboard --logdir runs/music_melody_lstm/tensorboard`): each network's training loss
    # and learning rate against its optimizer step, as read at the log lines, its validation loss after
    # training, and what the lab makes: the NLL table, generated tunes, the piano roll.
    writer = SummaryWriter(out_dir / "tensorboard")  # closed in the finally, even after an error
    try:
        print("\n== Part 3: LSTM and GRU on note events (TBPTT)")
        stream = torch.tensor([t for s in sequences["train"] for t in s], dtype=torch.long)
        results, histories, models, train_time, steps_total = {}, {}, {}, 0.0, 0
        for kind in ("lstm", "gru"):
            torch.manual_seed(args.seed)
            config = SeqConfig(kind=kind, vocab_size=MELODY_VOCAB, hidden_size=args.hidden_size, dropout=args.dropout)
            model = SequenceModel(config).to(device)
            steps = args.steps if kind == "lstm" else args.gru_steps
            plan = TrainPlan(f"melody {kind.upper()}", steps, args.epochs, args.batch_size, args.bptt, args.lr, args.log_every)
            histories[kind], steps, seconds = train_tbptt(model, stream, plan, device, dtype, writer,
                                                          show_progress=show_progress)
            train_time += seconds
            steps_total += steps
            val_nll, _ = evaluate_sequences(model, sequences["val"], device, dtype)
            writer.add_scalar(f"{plan.tag}/loss_val", val_nll, steps)
            test_nll, test_acc = evaluate_sequences(model, sequences["test"], device, dtype)
            results[kind] = {"val_nll": val_nll, "test_nll": test_nll, "test_next_event_accuracy": test_acc,
                             "steps": steps, "train_seconds": seconds}
            models[kind] = model
            checkpoint = out_dir / f"melody_{kind}.pt"
            out_dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(model, config, {"task": "melody"}, torch.tensor([sequences["val"][0][:16]]), checkpoint)
        nll_table = {f"{k}-gram": ngram_test[k] for k in ngram_test}
        nll_table.update({"LSTM": results["lstm"]["test_nll"], "GRU": results["gru"]["test_nll"]})
        print("  held-out test NLL per event (the same tokens, the same tunes):")
        for name, value in nll_table.items():
            print(f"    {name:7s} {value:.3f}")
        writer.add_text("note_events/test_nll", "| model | test NLL (nats/event) |\n|---|---|\n"
                        + "\n".join(f"| {name} | {value:.3f} |" for name, value in nll_table.items()))
        margin = ngram_test[best_order] - results["lstm"]["test_nll"]
        print(f"  LSTM {results['lstm']['test_nll']:.3f} vs best n-gram ({best_order}-gram) {ngram_test[best_order]:.3f}: "
              f"margin {margin:+.3f} nats/event " + ("(the LSTM is better)" if margin > 0 else "(the n-gram is better)"))

        print("\n== Part 4: an LSTM on ABC tokens (folk-rnn's representation), and which generated tunes are valid music")
        abc = music["abc"]
        abc_split = {name: [text for n, text in abc if split_of(n) == name] for name in ("train", "val", "test")}
        if args.smoke:
            texts = [text for _, text in abc]
            abc_split = {"train": texts[:-6], "val": texts[-6:-3], "test": texts[-3:]}
        printed = len(abc_split["train"])
        abc_split["train"] = [text for text in abc_split["train"] if bars_add_up(text)]
        print(f"  {printed - len(abc_split['train'])} of {printed} training tunes left out: a bar does not add up "
              "(bars_add_up); the held-out tunes stay as printed")
        counts = Counter(token for text in abc_split["train"] for token in abc_tokens(text))
        abc_vocabulary = ["<s>", "<unk>"] + sorted(counts)
        abc_index = {token: i for i, token in enumerate(abc_vocabulary)}
        abc_train = [encode_abc(text, abc_index) for text in abc_split["train"]]
        abc_val = [encode_abc(text, abc_index) for text in abc_split["val"]]
        example = abc_tokens(abc_split["train"][0])[:18]
        shown = " ".join(token.replace("\n", "\\n") for token in example)
        print(f"  {len(abc_split['train'])} training tunes, {sum(len(ids) - 1 for ids, _ in abc_train):,} tokens "
              f"({sum(map(len, abc_split['train'])):,} characters), {len(abc_vocabulary)} distinct tokens; "
              f"a tune starts: {shown} ...")
        print("  what is left of the bar after each of them (BarClock's bucket: 1 = the bar is full, 1 + 4 per eighth left): "
              f"{' '.join(map(str, bar_positions(example)))} ...")
        abc_config = SeqConfig(kind="lstm", vocab_size=len(abc_vocabulary), hidden_size=args.abc_hidden_size,
                               dropout=args.abc_dropout,
                               position_buckets=POSITION_BUCKETS if args.abc_bar_clock == "on" else 0)
        torch.manual_seed(args.seed)
        abc_model = SequenceModel(abc_config).to(device)
        plan = TrainPlan("ABC LSTM", args.abc_steps, args.epochs, args.abc_batch_size, 0, args.abc_lr, args.log_every)
        histories["abc"], abc_steps, abc_seconds = train_whole_tunes(abc_model, abc_train, plan, device, dtype,
                                                                     torch.Generator().manual_seed(args.seed),
                                                                     writer, show_progress=show_progress)
        train_time += abc_seconds
        steps_total += abc_steps
        abc_val_nll = evaluate_tunes(abc_model, abc_val, device, dtype)
        writer.add_scalar(f"{plan.tag}/loss_val", abc_val_nll, abc_steps)
        ids, where = abc_val[0]
        save_checkpoint(abc_model, abc_config, {"task": "abc", "tokens": abc_vocabulary},
                        {"tokens": torch.tensor([ids[:32]]), "positions": torch.tensor([where[:32]])}, out_dir / "abc_lstm.pt")
        # Each tune starts from the header (metre, unit, key) of a held-out tune, as folk-rnn conditions
        # on metre and key; the notes, the bar lines and the end of the tune are all the model's, drawn
        # from the whole softmax at temperature 1.0.
        headers = ["\n".join(tune.splitlines()[:3]) + "\n" for tune in abc_split["test"]]
        headers = [headers[i % len(headers)] for i in range(args.abc_samples)]
        sampling_start = time.perf_counter()
        generated_abc = sample_tunes(abc_model, abc_vocabulary, headers, 120 if args.smoke else ABC_MAX_TOKENS, device,
                                     torch.Generator().manual_seed(args.seed))
        sampling_seconds = time.perf_counter() - sampling_start
        held_out_real = abc_split["test"][:100]
        checking_start = time.perf_counter()
        real_share, real_reasons = validity_share(held_out_real, music21, "checking real tunes", show_progress)
        generated_share, generated_reasons = validity_share(generated_abc, music21, "checking generated tunes",
                                                            show_progress)
        checking_seconds = time.perf_counter() - checking_start
        (out_dir / "generated_abc.txt").write_text("\n".join(f"X:{i + 1}\n{t}" for i, t in enumerate(generated_abc)),
                                                   encoding="utf-8")
        ratio = generated_share / real_share if real_share else 0.0
        writer.add_scalar(f"{plan.tag}/valid_share_generated", generated_share, abc_steps)
        first_tunes = "\n".join(f"X:{i + 1}\n{tune.strip()}" for i, tune in enumerate(generated_abc[:3]))
        # indented 4 spaces, markdown shows the tunes as written, line by line
        writer.add_text(f"{plan.tag}/generated_tunes", "    " + first_tunes.replace("\n", "\n    "), abc_steps)
        print(f"  ABC LSTM: {abc_steps} steps ({abc_seconds:.0f} s), validation {abc_val_nll:.3f} nats/token; "
              f"{len(generated_abc)} tunes drawn in {sampling_seconds:.0f} s, checked with music21 in {checking_seconds:.0f} s")
        print(f"  valid music: {generated_share:.0%} of {len(generated_abc)} generated tunes (temperature 1.0) vs "
              f"{real_share:.0%} of {len(held_out_real)} held-out real tunes: ratio {ratio:.2f} (target >= 0.8)")
        print(f"  why generated tunes failed: {dict(generated_reasons.most_common(4))}; real: {dict(real_reasons.most_common(3))}")
        print("  a generated tune:\n    " + generated_abc[0].strip().replace("\n", "\n    "))

        print("\n== Part 5: chord progressions from the chorales, one Roman numeral per beat")
        chorales = {name: [r["chords"] for r in rs if r["source"] == "chorale" and r.get("chords")]
                    for name, rs in split.items()}
        vocabulary = chord_vocabulary(chorales["train"])
        index = {label: i for i, label in enumerate(vocabulary)}
        chord_sequences = {name: [encode_chords(c, index) for c in cs] for name, cs in chorales.items()}
        bigram = NGramModel(2, len(vocabulary)).fit(chord_sequences["train"])
        bigram_acc = bigram_accuracy(bigram, chord_sequences["test"])
        chord_config = SeqConfig(kind="lstm", vocab_size=len(vocabulary), embed_dim=32, hidden_size=min(args.hidden_size, 128),
                                 dropout=args.dropout)
        torch.manual_seed(args.seed)
        chord_model = SequenceModel(chord_config).to(device)
        chord_stream = torch.tensor([t for s in chord_sequences["train"] for t in s], dtype=torch.long)
        plan = TrainPlan("chord LSTM", args.chord_steps, args.epochs, min(args.batch_size, 16), min(args.bptt, 32),
                         args.lr, args.log_every)
        histories["chords"], chord_steps, chord_seconds = train_tbptt(chord_model, chord_stream, plan, device, dtype,
                                                                      writer, show_progress=show_progress)
        train_time += chord_seconds
        steps_total += chord_steps
        chord_val_nll, _ = evaluate_sequences(chord_model, chord_sequences["val"], device, dtype)
        writer.add_scalar(f"{plan.tag}/loss_val", chord_val_nll, chord_steps)
        _, chord_acc = evaluate_sequences(chord_model, chord_sequences["test"], device, dtype)
        writer.add_scalar(f"{plan.tag}/accuracy_test", chord_acc, chord_steps)
        save_checkpoint(chord_model, chord_config, {"task": "chords", "chords": " ".join(vocabulary)},
                        torch.tensor([chord_sequences["test"][0][:16]]), out_dir / "chord_lstm.pt")
        print(f"  {sum(map(len, chorales['train'])):,} training beats, {len(vocabulary)} chord labels; "
              f"e.g. {' '.join(chorales['train'][0][:12])}")
        print(f"  next-chord accuracy on held-out chorales: LSTM {chord_acc:.1%} vs bigram {bigram_acc:.1%}")

        print("\n== Part 6: generation, and musical statistics against held-out melodies")
        held_out = split["test"]
        reference = {"pitch_classes": tonic_relative_histogram([(r["events"], r["tonic"]) for r in held_out]),
                     "durations": duration_histogram([(r["events"], r["tonic"]) for r in held_out])}
        generator = torch.Generator().manual_seed(args.seed)
        prime_records = [held_out[i % len(held_out)] for i in range(args.melodies)]
        prime_events = [r["events"][:8] for r in prime_records]
        primes = [encode_melody(p, r["tonic"], r["mode"])[:-1] for p, r in zip(prime_events, prime_records)]
        drawn = sample_batch(models["lstm"], primes, 16 if args.smoke else 64,
                             args.temperature,
                             args.top_k, device, generator, stop_token=EOS, banned=(BOS, *KEY_TOKENS))
        generated = [[token_event(t) for t in tokens if t >= 2] for tokens in drawn]
        modes = [r["mode"] for r in prime_records]
        tonics = [r["tonic"] for r in prime_records]
        all_pitches = [p for r in held_out for p, _ in r["events"] if p]
        durations = torch.tensor(duration_histogram([(m, 0) for m in melodies["train"]])) + 1e-9
        random_melodies = [random_melody(max(len(g), 8), min(all_pitches), max(all_pitches), durations, generator)
                           for g in generated]
        stats = {"held_out": music_statistics([(r["events"], r["tonic"]) for r in held_out], reference,
                                              [r["mode"] for r in held_out]),
                 "lstm": music_statistics(list(zip(generated, tonics)), reference, modes),
                 "random": music_statistics(list(zip(random_melodies, tonics)), reference, modes)}
        # The same primes drawn from the whole softmax: hundreds of unlikely events share a few percent of
        # the probability, and one melody of 64 events draws several of them (out-of-key notes, mostly).
        # Top-k cuts that tail; the cost shows in the duration histogram, which gets less varied.
        untruncated = sample_batch(models["lstm"], primes, 16 if args.smoke else 64, args.temperature, 0, device,
                                   torch.Generator().manual_seed(args.seed), stop_token=EOS, banned=(BOS, *KEY_TOKENS))
        stats["lstm_top_k_off"] = music_statistics([([token_event(t) for t in tokens if t >= 2], tonic)
                                                    for tokens, tonic in zip(untruncated, tonics)], reference, modes)
        for name, s in stats.items():
            print(f"  {name:14s} pitch-class intersection {s['pitch_class_intersection']:.3f}  durations "
                  f"{s['duration_intersection']:.3f}  range {s['mean_range_semitones']:.1f} semitones  in key "
                  f"{s['in_key_ratio']:.1%}")
        gap = stats["lstm"]["pitch_class_intersection"] - stats["random"]["pitch_class_intersection"]
        print(f"  generated (temperature {args.temperature}, top-k {args.top_k or 'off'}) vs held-out "
              f"{stats['lstm']['pitch_class_intersection']:.3f} (target >= 0.9), random notes "
              f"{stats['random']['pitch_class_intersection']:.3f} ({gap:.3f} lower; target >= 0.1)")

        print("\n== Part 7: listening: MIDI, WAV and a piano roll")
        pieces = [(f"{prime_records[i]['name']}: 8 events of the held-out tune, then the LSTM (T={args.temperature})",
                   prime_events[i], generated[i]) for i in range(min(3, len(generated)))]
        if prime is not None:
            own = sample_batch(models["lstm"], [encode_melody(*prime)[:-1]], 64, args.temperature, args.top_k, device,
                               generator, stop_token=EOS, banned=(BOS, *KEY_TOKENS))[0]
            pieces.append(("your --prime, continued by the LSTM", prime[0], [token_event(t) for t in own if t >= 2]))
        else:
            pieces.append(("random-note baseline (no prime)", [], random_melodies[0]))
        plot_piano_roll(pieces, out_dir / "piano_roll.png")
        plot_statistics({"held-out": reference["pitch_classes"], "LSTM": stats["lstm"]["pitch_class_histogram"],
                         "random notes": stats["random"]["pitch_class_histogram"]}, nll_table,
                        out_dir / "statistics.png")
        for name in ("piano_roll", "statistics"):
            log_picture(writer, f"melody_lstm/{name}", out_dir / f"{name}.png", results["lstm"]["steps"])
        written = write_listening(pieces, out_dir, music21)
    finally:
        writer.close()

    metrics = {
        "lab": LAB_NAME, "smoke": args.smoke, "bug": args.bug, "test_tunes_also_in_training": shared_tunes,
        "device": str(device), "torch_version": torch.__version__,
        "music21_version": music21.__version__, "wall_time_s": time.perf_counter() - wall_start,
        "train_time_s": train_time, "steps": steps_total, "corpus_parse_seconds": music["parse_seconds"],
        "val_loss": results["lstm"]["val_nll"],
        "melodies": {k: len(v) for k, v in melodies.items()}, "duplicate_chorale_melodies": music["duplicates"],
        "skipped_entries": len(music["skipped"]), "abc_tunes": {k: len(v) for k, v in abc_split.items()},
        "ngram_test_nll": {str(k): v for k, v in ngram_test.items()},
        "ngram_val_nll": {str(k): v for k, v in ngram_val.items()}, "best_ngram_order": best_order,
        "best_ngram_test_nll": ngram_test[best_order], "lstm_test_nll": results["lstm"]["test_nll"],
        "gru_test_nll": results["gru"]["test_nll"], "lstm_margin_nats": margin, "models": results,
        "abc_val_loss": abc_val_nll, "abc_valid_share_generated": generated_share,
        "abc_valid_share_real": real_share, "abc_valid_ratio": ratio, "abc_steps": abc_steps,
        "abc_seconds": {"training": abc_seconds, "sampling": sampling_seconds, "checking": checking_seconds},
        "abc_valid_reasons_generated": dict(generated_reasons),
        "chord_accuracy_lstm": chord_acc, "chord_accuracy_bigram": bigram_acc, "chord_vocabulary": len(vocabulary),
        "pitch_class_intersection_lstm": stats["lstm"]["pitch_class_intersection"],
        "pitch_class_intersection_random": stats["random"]["pitch_class_intersection"],
        "pitch_class_intersection_lstm_top_k_off": stats["lstm_top_k_off"]["pitch_class_intersection"],
        "statistics": stats, "temperature": args.temperature, "top_k": args.top_k,
        "precision": "fp32" if dtype is None else str(dtype).removeprefix("torch."),
    }
    write_json_atomically(metrics, out_dir / "metrics.json")
    print(f"\nSummary: on {len(records)} melodies, the note-event LSTM scores {results['lstm']['test_nll']:.3f} "
          f"nats/event against the best n-gram's {ngram_test[best_order]:.3f} (margin {margin:+.3f}); ABC validity "
          f"{generated_share:.0%} generated vs {real_share:.0%} real; next chord {chord_acc:.1%} (LSTM) vs "
          f"{bigram_acc:.1%} (bigram); pitch classes {stats['lstm']['pitch_class_intersection']:.3f} vs random "
          f"{stats['random']['pitch_class_intersection']:.3f}. Whole run {metrics['wall_time_s']:.0f} s.\n"
          f"  Outputs in {out_dir}: metrics.json, melody_lstm.pt, melody_gru.pt, abc_lstm.pt, chord_lstm.pt, "
          f"generated_abc.txt, piano_roll.png, statistics.png, {', '.join(written)}, tensorboard/.\n"
          f"  Listen: open the .wav files; continue your own tune: --generate-only {out_dir / 'melody_lstm.pt'} "
          f"--prime my_tune.abc --temperature 0.9 --top-k 8")


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

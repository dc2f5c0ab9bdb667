"""Lab 07: attention, teacher forcing, greedy vs beam search (against exhaustive search), the pairs
file, mixed precision and the simulated T4, bad input, and the real run."""
import argparse
import datetime as dt
import itertools
import json
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_clean_failure, failure_of, load_lab, run_lab, run_on_simulated_cuda

LAB = "week3_rnn/07_seq2seq.py"


@pytest.fixture(scope="module")
def lab():
    return load_lab(LAB)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: on a busy 2-core machine one thread is many times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(lab, attention, seed=0, target_vocab=9):
    torch.manual_seed(seed)
    config = lab.Seq2SeqConfig(source_vocab=12, target_vocab=target_vocab, embed_dim=8, encoder_size=8,
                               decoder_size=16, attention_size=8, attention=attention)
    return lab.Seq2Seq(config).eval()


def padded_batch(lab, seed=0):
    """Four sources of lengths 7, 4, 2, 5 (padding after), and targets of length 5."""
    generator = torch.Generator().manual_seed(seed)
    source = torch.randint(4, 12, (4, 7), generator=generator)
    for row, length in enumerate((7, 4, 2, 5)):
        source[row, length:] = lab.PAD
    target = torch.randint(4, 9, (4, 5), generator=generator)
    return source, target


@pytest.mark.exercise("additive_scores")
def test_additive_scores_equal_bahdanaus_formula_one_position_at_a_time(lab):
    torch.manual_seed(0)
    attention = lab.AdditiveAttention(query_size=6, key_size=5, attention_size=4)
    query, keys = torch.randn(3, 6), torch.randn(3, 7, 5)
    scores = attention.scores(query, attention.prepare(keys))
    assert scores.shape == (3, 7)
    with torch.no_grad():  # v . tanh(W q + U k_s), written out for each source position s
        expected = torch.stack([attention.v(torch.tanh(attention.query_proj(query) + attention.key_proj(keys[:, s])))
                                .squeeze(1) for s in range(7)], dim=1)
    torch.testing.assert_close(scores.detach(), expected)


@pytest.mark.exercise("attend")
def test_attend_equals_scaled_dot_product_attention_with_a_padding_mask(lab):
    """Dot-product scores with W = I and scale 1 are plain q . k: attend's context is then what
    PyTorch's fused attention computes with the same mask (True where a position may be attended)."""
    torch.manual_seed(0)
    attention = lab.DotProductAttention(query_size=6, key_size=6)
    with torch.no_grad():
        attention.key_proj.weight.copy_(torch.eye(6))
    query, keys, values = torch.randn(3, 6), torch.randn(3, 7, 6), torch.randn(3, 7, 5)
    source_mask = torch.arange(7)[None, :] < torch.tensor([7, 4, 1])[:, None]  # (3, 7) lengths 7, 4, 1
    with torch.no_grad():
        context, weights = lab.attend(attention, query, attention.prepare(keys), values, source_mask)
        expected = F.scaled_dot_product_attention(query[:, None], keys, values, attn_mask=source_mask[:, None],
                                                  scale=1.0).squeeze(1)
    assert context.shape == (3, 5) and weights.shape == (3, 7)
    torch.testing.assert_close(context, expected)
    torch.testing.assert_close(weights.sum(1), torch.ones(3))
    assert torch.equal(weights[~source_mask], torch.zeros(int((~source_mask).sum())))  # exactly zero
    torch.testing.assert_close(context[2], values[2, 0])  # one real word: its value is the context


@pytest.mark.exercise("attend")
@pytest.mark.parametrize("attention", ["additive", "dot"])
def test_attention_weights_sum_to_one_and_padding_gets_zero(lab, attention):
    model = small_model(lab, attention)
    source, target = padded_batch(lab)
    with torch.no_grad():
        _, weights, _ = model.decode_teacher_forced(source, target)  # (B, T, S)
    torch.testing.assert_close(weights.sum(dim=2), torch.ones(4, 5))
    padding = (source == lab.PAD).unsqueeze(1).expand_as(weights)
    assert torch.equal(weights[padding], torch.zeros(int(padding.sum())))  # exactly zero
    assert (weights[~padding] > 0).all()


@pytest.mark.exercise("attend")
@pytest.mark.parametrize("attention", ["additive", "dot"])
def test_padding_does_not_change_the_output(lab, attention):
    model = small_model(lab, attention)
    source, target = padded_batch(lab)
    with torch.no_grad():
        batch_logits = model(source, target)
        alone = model(source[1:2, :4], target[1:2])  # the length-4 sentence without its padding
    torch.testing.assert_close(batch_logits[1:2], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["additive", "dot"])
def test_the_no_padding_mask_drill_puts_attention_on_padding(lab, attention):
    """--bug no-padding-mask (the drill): the bugged model gives padding some attention; the clean
    one exactly none. The flag goes through the lab's own parser into Seq2Seq, as lesson() passes it."""
    source, target = padded_batch(lab)
    on_padding = {}
    for bug in (None, "no-padding-mask"):
        args, _ = lab.build_parser().parse_known_args([*(["--bug", bug] if bug else [])])
        torch.manual_seed(0)
        config = lab.Seq2SeqConfig(source_vocab=12, target_vocab=9, embed_dim=8, encoder_size=8,
                                   decoder_size=16, attention_size=8, attention=attention)
        on_padding[bug] = lab.attention_on_padding(lab.Seq2Seq(config, bug=args.bug).eval(), source, target)
    assert on_padding[None] == 0.0 and on_padding["no-padding-mask"] > 0.05, on_padding  # measured: 0.70-0.72


def test_teacher_forcing_ratio_one_feeds_the_target_tokens(lab):
    model = small_model(lab, "additive")
    source, target = padded_batch(lab)
    _, _, fed = model.decode_teacher_forced(source, target, ratio=1.0)
    assert (fed[:, 0] == lab.SOS).all()
    assert torch.equal(fed[:, 1:], target[:, :-1])


def test_teacher_forcing_ratio_zero_feeds_the_models_own_predictions(lab):
    model = small_model(lab, "dot")
    source, target = padded_batch(lab)
    logits, _, fed = model.decode_teacher_forced(source, target, ratio=0.0)
    assert torch.equal(fed[:, 1:], logits[:, :-1].argmax(-1))


def test_teacher_forcing_schedules(lab):
    assert lab.teacher_forcing_ratio(1.0, 0.5, "constant", 0.7) == 1.0
    assert lab.teacher_forcing_ratio(1.0, 0.5, "linear", 0.5) == pytest.approx(0.75)
    sigmoid = [lab.teacher_forcing_ratio(1.0, 0.5, "inverse-sigmoid", p) for p in (0.0, 0.5, 1.0)]
    assert sigmoid[0] > 0.99 and sigmoid[1] == pytest.approx(0.75) and sigmoid[2] < 0.51


def until_eos(rows, eos):
    """Cut each token list after its first <eos>, the point where decoding is over."""
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


@pytest.mark.exercise("beam_search")
@pytest.mark.parametrize("attention", ["additive", "dot"])
def test_beam_width_one_equals_greedy(lab, attention):
    for seed in range(3):
        model = small_model(lab, attention, seed)
        source, _ = padded_batch(lab, seed)
        beam = lab.beam_search(model, source, max_len=9, beam_width=1)
        greedy, _ = lab.greedy_decode(model, source, max_len=9)
        assert until_eos(beam.tolist(), lab.EOS) == until_eos(greedy.tolist(), lab.EOS)


def scores_by_hand(lab, model, source, tokens, alpha):
    """log p(tokens | source) / length**alpha per row, from the model's teacher-forced logits; a
    sequence ends at its first <eos> (counted). Written here, apart from the lab's own scoring."""
    with torch.no_grad():
        log_probs = model(source, tokens).log_softmax(-1).gather(2, tokens.unsqueeze(2)).squeeze(2)
    scores = []
    for row, row_log_probs in zip(tokens.tolist(), log_probs):
        length = row.index(lab.EOS) + 1 if lab.EOS in row else len(row)
        scores.append(row_log_probs[:length].sum().item() / length ** alpha)
    return scores


@pytest.mark.exercise("beam_search")
@pytest.mark.parametrize("attention", ["additive", "dot"])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_a_beam_that_holds_every_hypothesis_finds_the_exhaustive_best(lab, attention, alpha):
    vocab, max_len = 5, 4  # 5**4 = 625 token sequences: every hypothesis fits in the beam
    model = small_model(lab, attention, seed=3, target_vocab=vocab)
    source, _ = padded_batch(lab, seed=3)
    beam = lab.beam_search(model, source, max_len, beam_width=vocab ** max_len, length_penalty=alpha)
    every = torch.tensor(list(itertools.product(range(vocab), repeat=max_len)))  # (625, 4)
    for row in range(source.shape[0]):
        scores = scores_by_hand(lab, model, source[row:row + 1].expand(len(every), -1), every, alpha)
        best = max(range(len(every)), key=scores.__getitem__)
        assert until_eos([beam[row].tolist()], lab.EOS) == until_eos([every[best].tolist()], lab.EOS)


# With these random models a plain beam search of width 2 or 3 ends below greedy on some sentence
# (the beam's early favourites all collapse later); the lab keeps greedy's answer where it is better.
@pytest.mark.exercise("beam_search")
@pytest.mark.parametrize("attention, seeds", [("additive", (15, 16)), ("dot", (6, 7))])
def test_beam_search_never_scores_below_greedy(lab, attention, seeds):
    for seed, width, alpha in itertools.product(seeds, (2, 3), (0.0, 1.0)):
        model = small_model(lab, attention, seed)
        source, _ = padded_batch(lab, seed)
        beam = lab.beam_search(model, source, max_len=9, beam_width=width, length_penalty=alpha)
        greedy, _ = lab.greedy_decode(model, source, max_len=9)
        for ours, baseline in zip(scores_by_hand(lab, model, source, beam, alpha),
                                  scores_by_hand(lab, model, source, greedy, alpha)):
            assert ours >= baseline - 1e-5, (seed, width, alpha)


def test_the_lab_scores_sequences_as_the_model_does(lab):
    model = small_model(lab, "additive")
    source, target = padded_batch(lab)
    target[0, 2] = lab.EOS  # the first sentence ends early; what follows must not count
    for alpha in (0.0, 1.0):
        torch.testing.assert_close(lab.sequence_scores(model, source, target, alpha),
                                   torch.tensor(scores_by_hand(lab, model, source, target, alpha)))


def test_generated_test_days_are_held_out(lab):
    train, test = lab.generate_dates(2000, 300, seed=0)
    train_days, test_days = {iso for _, iso in train}, {iso for _, iso in test}
    assert not train_days & test_days
    for _, iso in train[:50] + test[:50]:
        assert dt.date.fromisoformat(iso).isoformat() == iso


def test_every_spelling_determines_its_date(lab):
    """No spelling, in any format, may stand for two different days: the task must be solvable."""
    written = {}
    for offset in range((lab.LAST_DAY - lab.FIRST_DAY).days + 1):
        day = lab.FIRST_DAY + dt.timedelta(days=offset)
        for fmt in lab.DATE_FORMATS:
            assert written.setdefault(fmt(day), day) == day, f"{fmt(day)!r} is ambiguous"


def test_pairs_file_problems_name_the_line(lab, tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("\n\n")
    with pytest.raises(lab.LabError, match="empty"):
        lab.read_pairs_file(empty)
    no_tab = tmp_path / "no_tab.tsv"
    no_tab.write_text("Go.\tVa !\nHi.\tSalut !\nRun! Cours !\n")
    with pytest.raises(lab.LabError, match="line 3: no tab"):
        lab.read_pairs_file(no_tab)
    with pytest.raises(SystemExit) as err:
        lab.main(["--pairs-file", str(no_tab), "--out-dir", str(tmp_path / "out")])
    assert "line 3" in str(err.value.code)
    assert not (tmp_path / "out").exists()


def test_missing_pairs_file_fails_cleanly(lab, tmp_path):
    result = failure_of(lab.main, ["--pairs-file", tmp_path / "missing.tsv", "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, "missing.tsv", "does not exist")
    assert not (tmp_path / "out").exists()


def test_pairs_file_runs_through_the_same_code(lab, tmp_path):
    lines = [f"{w} {i}\t{w.upper()} {i}\tCC-BY attribution" for i in range(40) for w in ("go", "run", "hi")]
    corpus = tmp_path / "pairs.tsv"
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    lab.main(["--pairs-file", str(corpus), "--tokenize", "word", "--smoke", "--out-dir", str(out),
              "--device", "cpu", "--translate", "go 7"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_pairs"] == 12 and 0.0 <= metrics["test_exact_match"] <= 1.0
    assert (out / "attention_0.png").exists() and (out / "seq2seq.pt").exists()


# --- bad input: one line, nothing written ---------------------------------------------------------

@pytest.mark.parametrize("flags, fragment", [
    (["--lr", "0"], "--lr: must be a finite number above 0"), (["--epochs", "0"], "--epochs: must be a whole number at least 1"),
    (["--beam-width", "-2"], "--beam-width"),
    (["--teacher-forcing", "1.5"], "--teacher-forcing: must be a finite number at least 0 and at most 1"),
    (["--teacher-forcing-end", "nan"], "--teacher-forcing-end"), (["--length-penalty", "-1"], "--length-penalty"),
    (["--batch-size", "many"], "--batch-size: expected a whole number, got 'many'"), (["--precision", "fp8"], "invalid choice"),
    (["--bug", "no-such-bug"], "--bug: invalid choice"),
    (["--precision", "bf16", "--device", "cpu"], "--precision bf16 is for CUDA GPUs"),
])
def test_bad_flags_get_one_line_before_anything_runs(lab, tmp_path, flags, fragment):
    result = failure_of(lab.main, [*flags, "--smoke", "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, fragment)
    assert result.returncode == 1 and not (tmp_path / "out").exists()


def test_a_bad_flag_in_a_notebook_prints_one_line_without_raising(lab, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    lab.main(["--beam-width", "0", "--out-dir", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--beam-width" in lines[0]


def tiny_checkpoint(lab, path):
    model = small_model(lab, "dot")
    source, target = padded_batch(lab)
    lab.save_checkpoint(model, lab.Vocabulary("abcdefgh"), lab.Vocabulary("12345"), (source, target), path, "char")


@pytest.mark.parametrize("kind, fragment", [
    ("missing", "does not exist"),
    ("truncated", "truncated or corrupt"),
    ("not a checkpoint", "truncated or corrupt"),
    ("lab 06", "from lab 06_rnn_lstm"),
    ("lab 02", "from another lab or program"),
    ("other weights", "does not fit"),
])
def test_bad_checkpoints_say_what_is_wrong_and_stay_untouched(lab, tmp_path, kind, fragment):
    path = tmp_path / "seq2seq.pt"
    if kind == "truncated":
        tiny_checkpoint(lab, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "not a checkpoint":
        path.write_bytes(b"not a checkpoint")
    elif kind == "lab 06":  # another recurrent lab's checkpoint, as that lab writes it
        lab06 = load_lab("week3_rnn/06_rnn_lstm.py")
        config = lab06.CharConfig(vocab_size=4, embed_dim=8, hidden_size=16)
        lab06.save_checkpoint(lab06.CharLSTM(config), config, "ab:\n", torch.zeros(1, 4, dtype=torch.long), path)
    elif kind == "lab 02":  # an older checkpoint of another lab: no "lab" key, a config of its own
        torch.save({"model": nn.Linear(784, 10).state_dict(), "config": {"hidden_sizes": [512]}}, path)
    elif kind == "other weights":
        tiny_checkpoint(lab, path)
        saved = torch.load(path, weights_only=True)
        saved["config"]["decoder_size"] = 32  # a config that does not match its weights
        torch.save(saved, path)
    before = path.read_bytes() if path.exists() else None
    with pytest.raises(lab.LabError, match=fragment) as error:
        lab.load_checkpoint(path, torch.device("cpu"))
    assert "\n" not in str(error.value)  # one line on stderr
    assert (path.read_bytes() if path.exists() else None) == before


# --- mixed precision, the NaN guard, and the simulated T4 ----------------------------------------

@pytest.mark.parametrize("gpu, precision, expected", [
    ("T4", "auto", torch.float16), ("A100", "auto", torch.bfloat16), ("T4", "bf16", torch.bfloat16),
    ("A100", "fp16", torch.float16), ("T4", "fp32", None),
])
def test_precision_policy_follows_native_bf16(lab, monkeypatch, gpu, precision, expected):
    native = gpu == "A100"  # a T4 says True only when emulation counts
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native)
    assert lab.pick_precision(precision, torch.device("cuda")) == expected


def test_precision_on_the_cpu_is_fp32_and_the_scaler_only_serves_fp16(lab):
    cpu = torch.device("cpu")
    assert lab.pick_precision("auto", cpu) is None and lab.pick_precision("fp32", cpu) is None
    with pytest.raises(lab.LabError, match="--precision fp16 is for CUDA"):
        lab.pick_precision("fp16", cpu)
    assert lab.grad_scaler(cpu, torch.float16).is_enabled() and not lab.grad_scaler(cpu, torch.bfloat16).is_enabled()


def test_under_bf16_autocast_the_encoder_gru_runs_in_fp32(lab):
    """The rule for recurrent layers: bf16 autocast must not reach nn.GRU (cuDNN would make it fp16)."""
    model = small_model(lab, "additive")
    source, target = padded_batch(lab)
    seen = []
    model.encoder.rnn.register_forward_hook(lambda module, inputs, outputs: seen.append(outputs[1].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(source, target)
    assert seen == [torch.float32] and logits.dtype == torch.bfloat16  # the rest still autocasts
    logits.float().sum().backward()


def training_args(**overrides):
    return argparse.Namespace(**{"lr": 3e-3, "batch_size": 32, "epochs": 1, "seed": 0, "teacher_forcing": 1.0,
                                 "teacher_forcing_end": 0.5, "tf_schedule": "linear", "tokenize": "char",
                                 "length_penalty": 1.0, **overrides})


def test_a_non_finite_loss_stops_training_naming_its_step(lab):
    model = small_model(lab, "dot").train()
    source, target = padded_batch(lab)
    with torch.no_grad():
        model.out.bias[0] = float("nan")  # every loss is NaN from the first step on
    with pytest.raises(lab.LabError, match="NaN or infinite at step 1 "):
        lab.train(model, source, target, source, ["x"] * 4, lab.Vocabulary("12345"), training_args(batch_size=2),
                  torch.device("cpu"), max_len=6)


def test_checkpoint_reload_check_runs_on_a_simulated_t4():
    """Issue 12 A: the reload check compared the CPU outputs with saved outputs loaded onto CUDA."""
    result = run_on_simulated_cuda("""
import pathlib, tempfile, torch
torch.set_num_threads(1)
lab = load_lab("week3_rnn/07_seq2seq.py")
device = torch.device("cuda")
model = lab.Seq2Seq(lab.Seq2SeqConfig(source_vocab=12, target_vocab=9, embed_dim=8, encoder_size=8,
                                      decoder_size=16, attention_size=8)).to(device)
source = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]], device=device)
target = torch.tensor([[4, 5, 2], [6, 2, 0]], device=device)
path = pathlib.Path(tempfile.mkdtemp()) / "seq2seq.pt"
lab.save_checkpoint(model, lab.Vocabulary("abcdefgh"), lab.Vocabulary("12345"), (source, target), path, "char")
assert lab.checkpoint_reproduces(path, device)
""")
    assert result.returncode == 0, result.stderr[-3000:]


def test_training_on_a_simulated_t4_reads_once_per_epoch_in_both_precisions():
    """fp16 (a T4's auto) runs the encoder GRU in fp16 with the GradScaler on; bf16 keeps it in fp32.
    No lab line reads from the GPU on more than the epochs' reads (batch lengths come from the CPU,
    batches are packed longest first, teacher-forcing coins are copied once per batch)."""
    result = run_on_simulated_cuda("""
import argparse, simulated_cuda, torch
torch.set_num_threads(1)
lab = load_lab("week3_rnn/07_seq2seq.py")
device = torch.device("cuda")
pairs, held_out = lab.generate_dates(256, 8, 0)  # 8 batches of 32
source_vocab = lab.Vocabulary(t for s, _ in pairs for t in s)
target_vocab = lab.Vocabulary(t for _, r in pairs for t in r)
source = lab.to_tensor([source_vocab.encode(list(s)) for s, _ in pairs], False)
target = lab.to_tensor([target_vocab.encode(list(r)) for _, r in pairs], True)
val = lab.to_tensor([source_vocab.encode(list(s)) for s, _ in held_out], False)
args = argparse.Namespace(lr=3e-3, batch_size=32, epochs=1, seed=0, teacher_forcing=1.0, teacher_forcing_end=0.5,
                          tf_schedule="linear", tokenize="char", length_penalty=1.0)
for name, gru_dtype in (("auto", torch.float16), ("bf16", torch.float32)):
    model = lab.Seq2Seq(lab.Seq2SeqConfig(source_vocab=len(source_vocab), target_vocab=len(target_vocab), embed_dim=8,
                                          encoder_size=8, decoder_size=16, attention_size=8)).to(device)
    seen = set()
    model.encoder.rnn.register_forward_hook(lambda module, inputs, outputs: seen.add(outputs[1].dtype))
    history, _ = lab.train(model, source, target, val, [r for _, r in held_out], target_vocab, args, device,
                           target.shape[1] + 5, lab.pick_precision(name, device))
    assert gru_dtype in seen and all(h["train_loss"] == h["train_loss"] for h in history), (name, seen, history)
report = simulated_cuda.REPORT.as_dict()
reads = {line: n for line, n in report["intervals_with_read_by_line"].items() if "GradScaler" not in line}
assert report["optimizer_steps"] == 16 and all(n <= 2 for n in reads.values()), reads  # 2 runs of 1 epoch
""")
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.full
def test_default_run_reaches_target_exact_match(lab_data_dir, tmp_path):
    result = run_lab(LAB, "--data-dir", lab_data_dir, "--out-dir", tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_exact_match"] >= 0.99, metrics["test_exact_match"]
    assert metrics["test_exact_match_beam"] >= metrics["test_exact_match_greedy"]

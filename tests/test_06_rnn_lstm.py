"""Lab 06: the hand-written cells against PyTorch's, the TBPTT pieces, mixed precision and the
simulated T4, bad input, and the real run."""
import argparse
import json
import math
import sys
import types

import pytest
import torch
import torch.nn as nn

from conftest import assert_clean_failure, failure_of, load_lab, run_lab, run_on_simulated_cuda

LAB = "week3_rnn/06_rnn_lstm.py"


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


@pytest.mark.exercise("rnn_cell")
def test_scratch_rnn_cell_equals_nn_rnncell_forward_and_backward(lab):
    torch.manual_seed(0)
    ours, theirs = lab.ScratchRNNCell(5, 7), nn.RNNCell(5, 7)
    inputs = torch.randn(3, 12, 5)
    assert lab.compare_cells(ours, theirs, inputs) < 1e-6
    lab.unroll(ours, inputs).square().sum().backward()
    lab.unroll(theirs, inputs).square().sum().backward()
    for name, param in theirs.named_parameters():
        torch.testing.assert_close(getattr(ours, name).grad, param.grad)


@pytest.mark.exercise("lstm_cell")
def test_scratch_lstm_cell_equals_nn_lstmcell_forward_and_backward(lab):
    torch.manual_seed(1)
    ours, theirs = lab.ScratchLSTMCell(5, 7), nn.LSTMCell(5, 7)
    inputs = torch.randn(3, 12, 5)
    assert lab.compare_cells(ours, theirs, inputs) < 1e-6
    h, c = ours(inputs[:, 0])
    h_ref, c_ref = theirs(inputs[:, 0])
    torch.testing.assert_close(c, c_ref)  # the cell state too, not only h
    (lab.unroll(ours, inputs).sum() + c.sum()).backward()
    (lab.unroll(theirs, inputs).sum() + c_ref.sum()).backward()
    for name, param in theirs.named_parameters():
        torch.testing.assert_close(getattr(ours, name).grad, param.grad)


@pytest.mark.exercise("gradient_vs_distance")
def test_rnn_gradient_vanishes_faster_than_the_lstms(lab):
    torch.manual_seed(0)
    inputs = torch.randn(8, 60, 8)
    rnn = lab.gradient_vs_distance(nn.RNN(8, 32, batch_first=True), inputs)
    lstm = lab.gradient_vs_distance(lab.open_forget_gate(nn.LSTM(8, 32, batch_first=True)), inputs)
    assert rnn.shape == (60,)
    assert rnn[50] < 1e-3 * rnn[0]  # geometric decay through tanh and W_hh
    assert lstm[50] > 100 * rnn[50]


def test_open_forget_gate_sets_only_the_forget_quarter(lab):
    lstm = lab.open_forget_gate(nn.LSTM(3, 4, batch_first=True), bias=1.0)
    assert torch.equal(lstm.bias_ih_l0[4:8], torch.ones(4)) and torch.equal(lstm.bias_hh_l0[4:8], torch.zeros(4))


def test_bidirectional_output_layout(lab):
    assert lab.bidirectional_shapes()


def test_greater_next_labels_look_ahead(lab):
    tokens, labels = lab.greater_next_batch(4, 6, torch.Generator().manual_seed(0))
    assert torch.equal(labels[:, :-1], (tokens[:, 1:] > tokens[:, :-1]).long())
    assert (labels[:, -1] == -100).all()


def test_streams_are_contiguous_text(lab):
    data = torch.arange(103)
    rows = lab.as_streams(data, 4)
    assert rows.shape == (4, 25)
    assert torch.equal(rows[1], torch.arange(25, 50))  # row s is one stretch, so state can carry over


def test_learning_rate_schedule(lab):
    assert lab.learning_rate(1.0, 0.0) == 0.0
    assert lab.learning_rate(1.0, 0.05) == pytest.approx(1.0)
    assert lab.learning_rate(1.0, 1.0) == pytest.approx(0.05)


def test_prompt_with_unknown_characters_is_filtered_and_said(lab):
    _, stoi = lab.build_vocabulary("ROMEO: hi\n")
    ids, note = lab.encode_prompt("RÖMEO€:", stoi)
    assert [c for c in "RMEO:"] == [list(stoi)[i] for i in ids]
    assert "Ö" in note and "€" in note and "dropped" in note
    assert lab.encode_prompt("ROMEO", stoi)[1] is None
    with pytest.raises(lab.LabError, match="vocabulary"):
        lab.encode_prompt("€€", stoi)


def test_sample_from_checkpoint_notes_unknown_prompt_characters(lab, tmp_path, capsys):
    chars, _ = lab.build_vocabulary("ROMEO: a b c\n")
    config = lab.CharConfig(vocab_size=len(chars), embed_dim=8, hidden_size=16)
    model = lab.CharLSTM(config)
    path = tmp_path / "char_lstm.pt"
    lab.save_checkpoint(model, config, chars, torch.zeros(1, 4, dtype=torch.long), path)
    lab.main(["--sample-from", str(path), "--prompt", "RÖMEO:", "--sample-chars", "20", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "dropped" in out and "Ö" in out
    assert "\nRMEO:" in out  # the sample starts from what is left of the prompt


def tiny_checkpoint(lab, path, chars="ab:\n"):
    config = lab.CharConfig(vocab_size=len(chars), embed_dim=8, hidden_size=16)
    lab.save_checkpoint(lab.CharLSTM(config), config, chars, torch.zeros(1, 4, dtype=torch.long), path)


@pytest.mark.parametrize("kind, fragment", [
    ("missing", "does not exist"),
    ("truncated", "truncated or corrupt"),
    ("not a checkpoint", "truncated or corrupt"),
    ("capstone 2", "from lab 02_text_generator"),
    ("lab 02", "from another lab or program"),
    ("other weights", "does not fit"),
])
def test_bad_checkpoints_say_what_is_wrong_and_stay_untouched(lab, tmp_path, kind, fragment):
    path = tmp_path / "char_lstm.pt"
    if kind == "truncated":
        tiny_checkpoint(lab, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "not a checkpoint":
        path.write_bytes(b"not a checkpoint")
    elif kind == "capstone 2":  # the same CharLSTM class name, written by another lab
        torch.save({"lab": "02_text_generator", "model": {}, "config": {"vocab_size": 4}}, path)
    elif kind == "lab 02":  # an older checkpoint of another lab: no "lab" key, a config of its own
        torch.save({"model": nn.Linear(784, 10).state_dict(), "config": {"hidden_sizes": [512]},
                    "sample_inputs": torch.zeros(1, 784), "sample_outputs": torch.zeros(1, 10)}, path)
    elif kind == "other weights":
        tiny_checkpoint(lab, path)
        saved = torch.load(path, weights_only=True)
        saved["config"]["hidden_size"] = 32  # a config that does not match its weights
        torch.save(saved, path)
    before = path.read_bytes() if path.exists() else None
    result = failure_of(lab.main, ["--sample-from", path, "--device", "cpu", "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, fragment)
    assert (path.read_bytes() if path.exists() else None) == before
    assert not (tmp_path / "out").exists()


def test_truncated_corpus_is_refused(lab, tmp_path):
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("First Citizen:\n")
    with pytest.raises(lab.LabError, match="truncated"):
        lab.load_shakespeare(tmp_path)


@pytest.mark.parametrize("flags, fragment", [
    (["--lr", "-1"], "--lr: must be a finite number above 0"), (["--lr", "nan"], "--lr: must be a finite number above 0"),
    (["--batch-size", "0"], "--batch-size: must be a whole number at least 1"),
    (["--epochs", "-1"], "--epochs: must be a whole number at least 0"),
    (["--dropout", "1"], "--dropout: must be a finite number at least 0 and below 1"), (["--log-every", "0"], "--log-every"),
    (["--temperature", "warm"], "--temperature: expected a number, got 'warm'"), (["--precision", "fp8"], "invalid choice"),
    (["--bug", "no-such-bug"], "--bug: invalid choice"),
    (["--precision", "fp16", "--device", "cpu"], "--precision fp16 is for CUDA GPUs"),
])
def test_bad_flags_get_one_line_before_anything_runs(lab, tmp_path, flags, fragment):
    result = failure_of(lab.main, [*flags, "--smoke", "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, fragment)
    assert result.returncode == 1 and not (tmp_path / "out").exists()


def test_a_bad_flag_in_a_notebook_prints_one_line_without_raising(lab, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    lab.main(["--lr", "0", "--out-dir", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--lr" in lines[0]


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
    for name in ("bf16", "fp16"):
        with pytest.raises(lab.LabError, match=f"--precision {name} is for CUDA"):
            lab.pick_precision(name, cpu)
    assert lab.grad_scaler(cpu, torch.float16).is_enabled()
    assert not lab.grad_scaler(cpu, torch.bfloat16).is_enabled() and not lab.grad_scaler(cpu, None).is_enabled()


def test_under_bf16_autocast_the_lstm_runs_in_fp32(lab):
    """The rule for recurrent layers: bf16 autocast must not reach nn.LSTM (cuDNN would make it fp16)."""
    model = lab.CharLSTM(lab.CharConfig(vocab_size=5, embed_dim=8, hidden_size=16))
    seen = []
    model.lstm.register_forward_hook(lambda module, inputs, outputs: seen.append(outputs[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, state = model(torch.randint(0, 5, (2, 7)))
        model(torch.randint(0, 5, (2, 3)), state)  # a carried state goes back in as well
    assert seen == [torch.float32, torch.float32] and logits.dtype == torch.bfloat16  # the head still autocasts
    logits.float().sum().backward()


def tbptt_args(**overrides):
    return argparse.Namespace(**{"lr": 1e-2, "weight_decay": 0.0, "batch_size": 4, "bptt": 16, "epochs": 1,
                                 "time_budget": 600.0, "clip": 1.0, "eval_every": 1e9, "log_every": 10,
                                 "bug": None, **overrides})


def test_a_non_finite_loss_stops_training_naming_its_step(lab):
    data = torch.randint(0, 5, (2000,))
    model = lab.CharLSTM(lab.CharConfig(vocab_size=5, embed_dim=8, hidden_size=16))
    with torch.no_grad():
        model.head.bias[0] = float("nan")  # every loss is NaN from the first step on
    with pytest.raises(lab.LabError, match="NaN or infinite at step 1;"):
        lab.train_char_lstm(model, data, data[:300], tbptt_args(), torch.device("cpu"), None)


def test_the_no_zero_grad_drill_clips_nearly_every_step(lab):
    """--bug no-zero-grad (the drill): gradients pile up, so the norm before clipping is over --clip
    on nearly every step; a clean run on the same text and seed clips none. The flag goes through
    the lab's own parser into train_char_lstm, as run() passes it."""
    text = lab.generated_play(4200, 0)
    chars, stoi = lab.build_vocabulary(text)
    data = torch.tensor([stoi[c] for c in text])
    shares = {}
    for bug in (None, "no-zero-grad"):
        args, _ = lab.build_parser().parse_known_args(
            ["--lr", "1e-2", "--batch-size", "4", "--bptt", "16", "--epochs", "1", "--log-every", "10",
             "--eval-every", "1e9", *(["--bug", bug] if bug else [])])
        assert args.bug == bug
        torch.manual_seed(0)
        model = lab.CharLSTM(lab.CharConfig(vocab_size=len(chars), embed_dim=8, hidden_size=16))
        history, steps, _, _ = lab.train_char_lstm(model, data, data[:300], args, torch.device("cpu"), None)
        assert steps == 66 and sum(history["interval_steps"]) == steps
        shares[bug] = lab.clipped_share(history)
    assert shares[None] < 0.1 and shares["no-zero-grad"] > 0.8, shares  # measured: 0.0 and 0.92


def test_checkpoint_reload_check_runs_on_a_simulated_t4():
    """Issue 12 A: the reload check compared the CPU outputs with saved outputs loaded onto CUDA."""
    result = run_on_simulated_cuda("""
import pathlib, tempfile, torch
torch.set_num_threads(1)
lab = load_lab("week3_rnn/06_rnn_lstm.py")
device = torch.device("cuda")
config = lab.CharConfig(vocab_size=4, embed_dim=8, hidden_size=16)
model = lab.CharLSTM(config).to(device)
path = pathlib.Path(tempfile.mkdtemp()) / "char_lstm.pt"
lab.save_checkpoint(model, config, "ab:\\n", torch.tensor([[0, 1, 2, 3, 1]], device=device), path)
assert lab.checkpoint_reproduces(path, device)
""")
    assert result.returncode == 0, result.stderr[-3000:]


def test_tbptt_on_a_simulated_t4_reads_once_per_log_interval_in_both_precisions():
    """fp16 (a T4's auto) runs the LSTM in fp16 with the GradScaler on; bf16 keeps it in fp32. No
    lab line reads from the GPU more often than once per --log-every steps."""
    result = run_on_simulated_cuda("""
import argparse, simulated_cuda, torch
torch.set_num_threads(1)  # tiny models: one thread is faster, and much faster on a busy machine
lab = load_lab("week3_rnn/06_rnn_lstm.py")
device = torch.device("cuda")
data = torch.randint(0, 5, (800,))  # 4 streams of 200: 12 steps of 16 characters
steps = 0
for name, lstm_dtype in (("auto", torch.float16), ("bf16", torch.float32)):
    dtype = lab.pick_precision(name, device)
    model = lab.CharLSTM(lab.CharConfig(vocab_size=5, embed_dim=8, hidden_size=16)).to(device)
    seen = set()
    model.lstm.register_forward_hook(lambda module, inputs, outputs: seen.add(outputs[0].dtype))
    args = argparse.Namespace(lr=1e-2, weight_decay=0.0, batch_size=4, bptt=16, epochs=1, time_budget=600.0,
                              clip=1.0, eval_every=1e9, log_every=5, bug=None)
    history, done, _, _ = lab.train_char_lstm(model, data, data[:200], args, device, dtype)
    assert seen == {lstm_dtype}, (name, seen)
    assert all(loss == loss for loss in history["train_loss"]), history
    steps += done
reads = {line: n for line, n in simulated_cuda.REPORT.as_dict()["intervals_with_read_by_line"].items() if "GradScaler" not in line}
assert steps == 24 and all(n <= 2 * 3 for n in reads.values()), reads  # after steps 5, 10 and 12 of each run
""")
    assert result.returncode == 0, result.stderr[-3000:]


def test_shakespeare_absent_without_network_fails_cleanly(lab, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise lab.urllib.error.URLError("no network")

    monkeypatch.setattr(lab.urllib.request, "urlopen", no_network)
    result = failure_of(lab.main, ["--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out", "--device", "cpu"])
    assert_clean_failure(result, "raw.githubusercontent.com/karpathy/char-rnn", "tinyshakespeare/input.txt", "--smoke")
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "data").rglob("*.part"))


@pytest.mark.full
def test_default_run_reaches_target_val_loss(lab_data_dir, tmp_path):
    result = run_lab(LAB, "--data-dir", lab_data_dir, "--out-dir", tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert math.isfinite(metrics["val_loss"])
    assert metrics["val_loss"] <= 1.88, metrics["val_loss"]

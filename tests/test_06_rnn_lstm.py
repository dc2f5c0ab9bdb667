"""Lab 06: the hand-written cells against PyTorch's, the TBPTT pieces, bad input, and the real run."""
import json
import math

import pytest
import torch
import torch.nn as nn

from conftest import assert_clean_failure, load_lab, run_lab

LAB = "week3_rnn/06_rnn_lstm.py"


@pytest.fixture(scope="module")
def lab():
    return load_lab(LAB)


def test_scratch_rnn_cell_equals_nn_rnncell_forward_and_backward(lab):
    torch.manual_seed(0)
    ours, theirs = lab.ScratchRNNCell(5, 7), nn.RNNCell(5, 7)
    inputs = torch.randn(3, 12, 5)
    assert lab.compare_cells(ours, theirs, inputs) < 1e-6
    lab.unroll(ours, inputs).square().sum().backward()
    lab.unroll(theirs, inputs).square().sum().backward()
    for name, param in theirs.named_parameters():
        torch.testing.assert_close(getattr(ours, name).grad, param.grad)


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


def test_missing_and_corrupt_checkpoints_fail_cleanly(lab, tmp_path, capsys):
    with pytest.raises(SystemExit) as missing:
        lab.main(["--sample-from", str(tmp_path / "nope.pt"), "--device", "cpu"])
    assert "does not exist" in str(missing.value.code)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as corrupt:
        lab.main(["--sample-from", str(broken), "--device", "cpu"])
    assert "cannot be loaded" in str(corrupt.value.code)


def test_truncated_corpus_is_refused(lab, tmp_path):
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("First Citizen:\n")
    with pytest.raises(lab.LabError, match="truncated"):
        lab.load_shakespeare(tmp_path)


def test_out_of_range_flags_are_refused(lab):
    with pytest.raises(SystemExit) as err:
        lab.main(["--lr", "-1"])
    assert err.value.code == 2


def test_shakespeare_absent_without_network_fails_cleanly(tmp_path):
    unreachable = "http://127.0.0.1:9"  # nothing listens there: the download fails at once
    result = run_lab(LAB, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out", "--device", "cpu",
                     env_extra={"https_proxy": unreachable, "HTTPS_PROXY": unreachable}, timeout=120)
    assert_clean_failure(result, "raw.githubusercontent.com/karpathy/char-rnn",
                         "tinyshakespeare/input.txt", "--smoke")
    assert not (tmp_path / "out" / "metrics.json").exists()
    assert not list((tmp_path / "data").rglob("*.part"))


@pytest.mark.full
def test_default_run_reaches_target_val_loss(lab_data_dir, tmp_path):
    result = run_lab(LAB, "--data-dir", lab_data_dir, "--out-dir", tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert math.isfinite(metrics["val_loss"])
    assert metrics["val_loss"] <= 1.88, metrics["val_loss"]

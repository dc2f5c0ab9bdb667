"""Lab 07: attention, teacher forcing, greedy vs beam search, the pairs file, and the real run."""
import datetime as dt
import json

import pytest
import torch

from conftest import assert_clean_failure, load_lab, run_lab

LAB = "week3_rnn/07_seq2seq.py"


@pytest.fixture(scope="module")
def lab():
    return load_lab(LAB)


def small_model(lab, attention, seed=0):
    torch.manual_seed(seed)
    config = lab.Seq2SeqConfig(source_vocab=12, target_vocab=9, embed_dim=8, encoder_size=8,
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


@pytest.mark.parametrize("attention", ["additive", "dot"])
def test_padding_does_not_change_the_output(lab, attention):
    model = small_model(lab, attention)
    source, target = padded_batch(lab)
    with torch.no_grad():
        batch_logits = model(source, target)
        alone = model(source[1:2, :4], target[1:2])  # the length-4 sentence without its padding
    torch.testing.assert_close(batch_logits[1:2], alone, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("attention", ["additive", "dot"])
def test_beam_width_one_equals_greedy(lab, attention):
    for seed in range(3):
        model = small_model(lab, attention, seed)
        source, _ = padded_batch(lab, seed)
        greedy, _ = lab.greedy_decode(model, source, max_len=9)
        beam = lab.beam_search(model, source, max_len=9, beam_width=1)
        assert until_eos(beam.tolist(), lab.EOS) == until_eos(greedy.tolist(), lab.EOS)


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


def test_missing_pairs_file_fails_cleanly(tmp_path):
    result = run_lab(LAB, "--pairs-file", tmp_path / "missing.tsv", "--out-dir", tmp_path / "out", timeout=120)
    assert_clean_failure(result, "missing.tsv", "does not exist")


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


@pytest.mark.full
def test_default_run_reaches_target_exact_match(lab_data_dir, tmp_path):
    result = run_lab(LAB, "--data-dir", lab_data_dir, "--out-dir", tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_exact_match"] >= 0.99, metrics["test_exact_match"]
    assert metrics["test_exact_match_beam"] >= metrics["test_exact_match_greedy"]

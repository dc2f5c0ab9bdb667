"""Capstone 2 (projects/02_text_generator.py): the hand-written sampling filters against exact
properties, the stateful pieces (streams, carried LSTM state, stateful validation), weight tying,
the checkpoint round trip with --generate-only, mixed precision and the simulated T4, and every bad
input of the issue."""
import argparse
import json
import math
import sys
import types
import urllib.error

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_clean_failure, failure_of, load_lab, run_lab, run_on_simulated_cuda

LAB = "projects/02_text_generator.py"


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


def tiny_model(lab, vocab_size=12, **overrides):
    config = {"vocab_size": vocab_size, "embed_dim": 8, "hidden_size": 16, "num_layers": 2,
              "dropout": 0.1, "tie_weights": False, **overrides}
    torch.manual_seed(0)
    return lab.build_model(config).eval(), config


# --- sampling: temperature, top-k, top-p ---------------------------------------------------------

@pytest.mark.exercise("top_k_filter")
@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k_keeps_exactly_the_k_most_likely(lab, k):
    logits = torch.randn(5, 20)
    probs = lab.next_char_probs(logits, top_k=k)
    assert ((probs > 0).sum(dim=-1) == k).all()
    kept = probs > 0
    expected = torch.zeros_like(kept).scatter(-1, logits.topk(k, dim=-1).indices, True)
    assert torch.equal(kept, expected)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(5))
    # among the survivors the odds are unchanged: renormalised softmax
    torch.testing.assert_close(probs[kept], (logits.softmax(-1) * kept / (logits.softmax(-1) * kept).sum(-1, keepdim=True))[kept])


@pytest.mark.exercise("top_k_filter")
def test_top_k_keeps_exactly_k_even_with_ties(lab):
    logits = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0])
    assert (lab.next_char_probs(logits, top_k=2) > 0).sum().item() == 2


@pytest.mark.exercise("top_p_filter")
@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_prefix_with_enough_mass(lab, p):
    torch.manual_seed(1)
    logits = torch.randn(8, 30) * 2
    probs = logits.softmax(-1)
    filtered = lab.top_p_filter(logits, p).softmax(-1)  # what next_char_probs draws from at T = 1, no top-k
    for row in range(8):
        sorted_probs, order = probs[row].sort(descending=True)
        n_kept = int((filtered[row] > 0).sum())
        assert set(order[:n_kept].tolist()) == set((filtered[row] > 0).nonzero().flatten().tolist()), \
            "the kept characters are the most likely ones"
        assert sorted_probs[:n_kept].sum() >= p - 1e-6, "the kept mass reaches p"
        assert n_kept == 1 or sorted_probs[:n_kept - 1].sum() < p, "one fewer would not reach p: smallest prefix"


def test_top_p_of_one_and_top_k_of_zero_change_nothing(lab):
    logits = torch.randn(3, 10)
    torch.testing.assert_close(lab.next_char_probs(logits, temperature=1.0, top_k=0, top_p=1.0), logits.softmax(-1))


def test_temperature_scales_the_logits(lab):
    logits = torch.randn(4, 10)
    torch.testing.assert_close(lab.next_char_probs(logits, temperature=0.5), (logits * 2).softmax(-1))


def test_temperature_towards_zero_is_argmax(lab):
    logits = torch.randn(6, 15)
    greedy = lab.next_char_probs(logits, temperature=0)
    assert torch.equal(greedy, F.one_hot(logits.argmax(-1), 15).float())
    nearly = lab.next_char_probs(logits, temperature=1e-3)
    assert torch.equal(nearly.argmax(-1), logits.argmax(-1)) and (nearly.max(-1).values > 0.999).all()


def test_draws_come_only_from_allowed_characters(lab):
    torch.manual_seed(2)
    logits = torch.randn(40)
    probs = lab.next_char_probs(logits, temperature=1.3, top_k=6, top_p=0.8)
    allowed = set(logits.topk(6).indices.tolist())
    draws = torch.multinomial(probs, 2000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) <= allowed and set(draws.tolist()) == set((probs > 0).nonzero().flatten().tolist())


def test_generate_with_top_k_1_is_greedy_decoding(lab):
    model, _ = tiny_model(lab)
    prompt = [1, 2, 3]
    greedy = lab.generate(model, prompt, 20, "cpu", torch.Generator().manual_seed(0), temperature=0)
    top1 = lab.generate(model, prompt, 20, "cpu", torch.Generator().manual_seed(5), temperature=1.0, top_k=1)
    assert greedy == top1 and len(greedy) == 20
    # and each greedy choice is the argmax given everything before it
    logits, _ = model(torch.tensor([prompt + greedy[:-1]]))
    assert logits[0, len(prompt) - 1:].argmax(-1).tolist() == greedy


# --- the stateful pieces ---------------------------------------------------------------------------

def test_streams_are_contiguous_stretches_of_the_text(lab):
    data = torch.arange(103)
    streams = lab.as_streams(data, 4)  # (4, 25): the ragged 3 characters are dropped
    assert streams.shape == (4, 25)
    assert torch.equal(streams.flatten(), data[:100])
    first, second = streams[:, 0:5], streams[:, 5:10]
    assert torch.equal(second[:, 0], first[:, -1] + 1), "each window continues where the last one stopped"


def test_carrying_the_state_equals_reading_the_whole_text_at_once(lab):
    model, _ = tiny_model(lab)
    tokens = torch.randint(0, 12, (3, 40))
    with torch.no_grad():
        whole, _ = model(tokens)
        first, state = model(tokens[:, :17])
        second, _ = model(tokens[:, 17:], lab.detach_state(state))
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=1e-5, atol=1e-6)


def test_detached_state_stops_the_gradient_at_the_window(lab):
    model, _ = tiny_model(lab)
    model.train()
    _, state = model(torch.randint(0, 12, (2, 5)))
    detached = lab.detach_state(state)
    assert all(s.grad_fn is None and not s.requires_grad for s in detached)
    assert torch.equal(detached[0], state[0]) and lab.detach_state(None) is None


def test_stateful_evaluation_equals_one_pass_over_the_text(lab):
    model, _ = tiny_model(lab)
    data = torch.randint(0, 12, (200,))
    with torch.no_grad():
        logits, _ = model(data[:-1].unsqueeze(0))
        expected = F.cross_entropy(logits[0], data[1:]).item()
    got = lab.evaluate(model, data, torch.device("cpu"), None, streams=1, window=23)
    assert got == pytest.approx(expected, rel=1e-5)


def test_weight_tying_shares_one_matrix(lab):
    tied, _ = tiny_model(lab, tie_weights=True)
    untied, _ = tiny_model(lab, tie_weights=False, embed_dim=16)
    assert tied.head.weight is tied.embed.weight
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(untied) - n(tied) == 12 * 16, "parameters() counts the shared matrix once"
    tied.train()
    loss = tied(torch.randint(0, 12, (2, 6)))[0].sum()
    loss.backward()
    assert tied.embed.weight.grad is not None


def test_forget_gate_starts_open(lab):
    model, _ = tiny_model(lab)
    bias = model.lstm.bias_ih_l0.detach()
    assert torch.equal(bias[16:32], torch.ones(16))


# --- checkpoints and --generate-only ---------------------------------------------------------------

def write_checkpoint(lab, path, chars="\n !:EMORabc"):
    model, config = tiny_model(lab, vocab_size=len(chars))
    lab.save_checkpoint(path, model, lab.CharConfig(**config), list(chars),
                        torch.randint(0, len(chars), (2, 8)), {"step": 3, "epoch": 0.5, "val_loss": 2.0})
    return model


def test_checkpoint_reloads_and_generate_only_writes_from_the_prompt(lab, tmp_path):
    path = tmp_path / "best.pt"
    model = write_checkpoint(lab, path)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert {"model", "config", "sample_inputs", "sample_outputs", "chars"} <= saved.keys()
    rebuilt = lab.build_model(saved["config"]).eval()
    rebuilt.load_state_dict(saved["model"])
    torch.testing.assert_close(rebuilt(saved["sample_inputs"]), saved["sample_outputs"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"from": "training"}')
    lab.main(["--generate-only", "--checkpoint", str(path), "--out-dir", str(out),
              "--prompt", "ROMEO:", "--sample-chars", "30", "--temperature", "0"])
    text = (out / "generated.txt").read_text().rstrip("\n")
    assert text.startswith("ROMEO:") and len(text) == 36
    greedy = lab.generate(model, [saved["chars"].index(c) for c in "ROMEO:"], 30, "cpu", torch.Generator(), temperature=0)
    assert text[6:] == "".join(saved["chars"][i] for i in greedy)
    assert json.loads((out / "metrics.json").read_text()) == {"from": "training"}, "generate-only keeps metrics.json"


# --- bad input -------------------------------------------------------------------------------------

def test_prompt_with_unseen_characters_names_them(lab, tmp_path):
    path = tmp_path / "best.pt"
    write_checkpoint(lab, path)
    with pytest.raises(SystemExit) as exit_info:
        lab.main(["--generate-only", "--checkpoint", str(path), "--out-dir", str(tmp_path / "out"),
                  "--prompt", "ROMEO: Zoë?"])
    message = str(exit_info.value.code)
    assert message.startswith("error:") and "'Z'" in message and "'ë'" in message and "'?'" in message
    assert not (tmp_path / "out").exists()


def test_training_run_checks_the_prompt_before_training_and_keeps_old_outputs(lab, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"from": "an earlier run"}')
    (out / "best.pt").write_bytes(b"an earlier checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        lab.main(["--smoke", "--out-dir", str(out), "--prompt", "ROMEO: 7"])
    assert "'7'" in str(exit_info.value.code)
    assert json.loads((out / "metrics.json").read_text()) == {"from": "an earlier run"}
    assert (out / "best.pt").read_bytes() == b"an earlier checkpoint"


@pytest.mark.parametrize("content, fragment", [
    (None, "does not exist"),
    ("folder", "is a folder"),
    (b"", "is empty"),
    (b" \n\n", "is empty"),
    (b"X:1\nT:Caf\xe9\n", "is not UTF-8"),  # Latin-1, as O'Neill's files are
])
def test_bad_text_file_is_one_line_and_writes_nothing(lab, tmp_path, content, fragment):
    path = tmp_path / "corpus.txt"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    out = tmp_path / "out"
    result = failure_of(lab.main, ["--text-file", path, "--out-dir", out, "--epochs", "1"])
    assert_clean_failure(result, "--text-file", str(path), fragment)
    assert not out.exists(), "nothing is written when the text cannot be read"


def test_text_file_trains_on_any_utf8_text_and_prompts_with_its_first_line(lab, tmp_path):
    tune = "M:6/8\nL:1/8\nK:G\nGAB cBA|B2G G2D|GAB cBA|B2G G3|]\n\n"
    path = tmp_path / "tunes.txt"
    path.write_text(tune * 60 + "Zoë: ünïcode too\n", encoding="utf-8")
    out = tmp_path / "out"
    lab.main(["--text-file", str(path), "--out-dir", str(out), "--epochs", "1", "--batch-size", "4",
              "--bptt", "16", "--hidden-size", "16", "--layers", "1", "--embed-dim", "8", "--sample-chars", "20"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["corpus"] == str(path) and metrics["vocabulary_size"] == len(set(path.read_text(encoding="utf-8")))
    assert all(row["text"].startswith("M:6/8\n") for row in metrics["samples"]), "the prompt is the first line"
    saved = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert saved["prompt"] == "M:6/8\n" and "ë" in saved["chars"]
    lab.main(["--generate-only", "--checkpoint", str(out / "best.pt"), "--out-dir", str(out), "--sample-chars", "10"])
    assert (out / "generated.txt").read_text(encoding="utf-8").startswith("M:6/8\n"), "generate-only reuses it"


def test_training_logs_to_tensorboard_what_it_reads(lab, tmp_path):
    """The losses read at the log lines and evaluations and the learning rate go to TensorBoard
    against the step, and the samples table as text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = tmp_path / "tunes.txt"
    path.write_text("GAB cBA|B2G G2D|GAB cBA|B2G G3|]\n" * 100, encoding="utf-8")
    out = tmp_path / "out"
    lab.main(["--text-file", str(path), "--out-dir", str(out), "--device", "cpu", "--epochs", "1", "--batch-size", "4",
              "--bptt", "16", "--hidden-size", "16", "--layers", "1", "--embed-dim", "8", "--sample-chars", "20",
              "--log-every", "5"])
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/learning_rate", "val/loss"}
    assert events.Tags()["tensors"] == ["samples/text_summary"]
    evals = json.loads((out / "metrics.json").read_text())["evals"]
    assert [(e.step, e.value) for e in events.Scalars("val/loss")] == [
        (e["step"], pytest.approx(e["val_loss"])) for e in evals]
    assert [e.step for e in events.Scalars("train/loss")][:2] == [5, 10]


def test_generate_only_without_checkpoint_fails_cleanly(lab, tmp_path):
    result = failure_of(lab.main, ["--generate-only", "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, "--generate-only needs --checkpoint")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind, fragment", [
    ("missing", "does not exist"),
    ("truncated", "truncated or corrupt"),
    ("not a checkpoint", "truncated or corrupt"),
    ("lab 06", "from lab 06_rnn_lstm"),
    ("lab 02", "from another lab or program"),
    ("other weights", "does not fit"),
])
def test_missing_or_broken_checkpoint_is_a_message_and_the_file_is_kept(lab, tmp_path, kind, fragment):
    path = tmp_path / "best.pt"
    if kind == "truncated":
        write_checkpoint(lab, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "not a checkpoint":
        path.write_bytes(b"not a checkpoint")
    elif kind == "lab 06":  # week 3's character LSTM: the same idea, another lab's file
        lab06 = load_lab("week3_rnn/06_rnn_lstm.py")
        config = lab06.CharConfig(vocab_size=4, embed_dim=8, hidden_size=16)
        lab06.save_checkpoint(lab06.CharLSTM(config), config, "ab:\n", torch.zeros(1, 4, dtype=torch.long), path)
    elif kind == "lab 02":  # an older checkpoint of another lab: no "lab" key, a config of its own
        torch.save({"model": torch.nn.Linear(784, 10).state_dict(), "config": {"hidden_sizes": [512]}}, path)
    elif kind == "other weights":
        write_checkpoint(lab, path)
        saved = torch.load(path, weights_only=True)
        saved["config"]["hidden_size"] = 32  # a config that does not match its weights
        torch.save(saved, path)
    before = path.read_bytes() if path.exists() else None
    result = failure_of(lab.main, ["--generate-only", "--checkpoint", path, "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, str(path), fragment)
    assert (path.read_bytes() if path.exists() else None) == before
    assert not (tmp_path / "out").exists()


def test_data_missing_without_network_names_url_layout_and_smoke(lab, monkeypatch, tmp_path):
    data_dir, out = tmp_path / "data", tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"from": "an earlier run"}')

    def no_network(url):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(lab, "fetch_url", no_network)
    with pytest.raises(SystemExit) as exit_info:
        lab.main(["--data-dir", str(data_dir), "--out-dir", str(out)])
    message = str(exit_info.value.code)
    assert message.startswith("error:") and lab.SHAKESPEARE_URL in message
    assert "tinyshakespeare/input.txt" in message and "--smoke" in message
    assert not list(data_dir.rglob("*.part")), "no half-downloaded file is left"
    assert json.loads((out / "metrics.json").read_text()) == {"from": "an earlier run"}


def test_truncated_corpus_is_a_message(lab, tmp_path):
    corpus = tmp_path / "tinyshakespeare" / "input.txt"
    corpus.parent.mkdir()
    corpus.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    with pytest.raises(SystemExit) as exit_info:
        lab.main(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")])
    assert "truncated" in str(exit_info.value.code) and corpus.exists()


@pytest.mark.parametrize("flags", [
    ["--epochs", "0"], ["--batch-size", "0"], ["--bptt", "1"], ["--lr", "0"], ["--hidden-size", "0"],
    ["--layers", "0"], ["--dropout", "1"], ["--clip", "-1"], ["--time-budget", "0"], ["--temperature", "-0.5"],
    ["--top-k", "-1"], ["--top-p", "0"], ["--top-p", "1.5"], ["--sample-chars", "0"], ["--warmup", "1"],
])
def test_out_of_range_flags_are_refused_by_the_parser(lab, tmp_path, flags):
    result = failure_of(lab.main, ["--smoke", "--out-dir", tmp_path / "out", *flags])
    assert_clean_failure(result, flags[0])
    assert result.returncode == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--data-dir", "--out-dir"])
def test_a_file_where_a_folder_belongs_is_refused_and_left_alone(lab, tmp_path, flag):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    other = {"--data-dir": ["--out-dir", tmp_path / "out"], "--out-dir": ["--data-dir", tmp_path / "data"]}[flag]
    result = failure_of(lab.main, [flag, a_file, *other, "--device", "cpu"])  # not --smoke: no download either
    assert_clean_failure(result, flag, "is a file, not a folder")
    assert a_file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_bad_flag_in_a_notebook_prints_one_line_without_raising(lab, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    lab.main(["--top-p", "2", "--out-dir", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--top-p" in lines[0]


def test_the_smoke_run_gives_the_thread_count_back(lab, tmp_path):
    """--smoke trains on one thread; a notebook kernel must get its own count back, even on failure."""
    torch.set_num_threads(2)  # (the autouse fixture restores the test run's own count afterwards)
    result = failure_of(lab.main, ["--smoke", "--out-dir", tmp_path / "out", "--prompt", "ROMEO: 7"])
    assert_clean_failure(result, "'7'")
    assert torch.get_num_threads() == 2


# --- mixed precision, the NaN guard, and the simulated T4 ------------------------------------------

@pytest.mark.parametrize("gpu, precision, expected", [
    ("T4", "auto", torch.float16), ("A100", "auto", torch.bfloat16), ("T4", "bf16", torch.bfloat16),
    ("A100", "fp16", torch.float16), ("T4", "fp32", None),
])
def test_precision_policy_follows_native_bf16(lab, monkeypatch, gpu, precision, expected):
    native = gpu == "A100"  # a T4 says True only when emulation counts
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native)
    assert lab.pick_precision(precision, torch.device("cuda")) == expected


def test_precision_on_the_cpu_is_fp32_and_the_scaler_only_serves_fp16(lab, tmp_path):
    cpu = torch.device("cpu")
    assert lab.pick_precision("auto", cpu) is None and lab.pick_precision("fp32", cpu) is None
    result = failure_of(lab.main, ["--smoke", "--device", "cpu", "--precision", "fp16", "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, "--precision fp16 is for CUDA GPUs")
    assert lab.grad_scaler(cpu, torch.float16).is_enabled() and not lab.grad_scaler(cpu, torch.bfloat16).is_enabled()


def test_under_bf16_autocast_the_lstm_runs_in_fp32(lab):
    """The rule for recurrent layers: bf16 autocast must not reach nn.LSTM (cuDNN would make it fp16)."""
    model, _ = tiny_model(lab)
    seen = []
    model.lstm.register_forward_hook(lambda module, inputs, outputs: seen.append(outputs[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, state = model(torch.randint(0, 12, (2, 7)))
        model(torch.randint(0, 12, (2, 3)), state)  # a carried state goes back in as well
    assert seen == [torch.float32, torch.float32] and logits.dtype == torch.bfloat16  # the head still autocasts


def training_args(**overrides):
    return argparse.Namespace(**{"batch_size": 4, "bptt": 16, "epochs": 1, "evals_per_epoch": 1, "lr": 1e-2,
                                 "weight_decay": 0.0, "warmup": 0.1, "clip": 1.0, "time_budget": 600.0,
                                 "log_every": 5, "prompt": "ab", "bug": None, **overrides})


def test_drill_no_shift_trains_on_targets_equal_to_the_inputs(lab, tmp_path):
    """--bug no-shift: the targets are read from the inputs' own columns. Every target then equals
    its input: 1.0, against about 1/12 on random text of 12 characters when they are shifted."""
    torch.manual_seed(0)
    data = torch.randint(0, 12, (400,))  # 4 streams of 100: 6 steps of 16 characters
    shares = {}
    for bug in (None, "no-shift"):
        args = training_args(bug=lab.build_parser().parse_known_args(["--bug", bug] if bug else [])[0].bug)
        model, config = tiny_model(lab)
        (tmp_path / str(bug)).mkdir()
        history, *_ = lab.train(args, model.train(), lab.CharConfig(**config), list("abcdefghijkl"), data,
                                data[:200], torch.device("cpu"), None, tmp_path / str(bug))
        shares[bug] = history["target_equals_input_share"]
    assert shares["no-shift"] == 1.0 and shares[None] < 0.2, shares


def test_a_non_finite_loss_stops_training_naming_its_step(lab, tmp_path):
    model, config = tiny_model(lab)
    with torch.no_grad():
        model.head.bias[0] = float("nan")  # every loss is NaN from the first step on
    data = torch.randint(0, 12, (1000,))
    with pytest.raises(lab.LabError, match="NaN or infinite at step 1;"):
        lab.train(training_args(), model.train(), lab.CharConfig(**config), list("abcdefghijkl"), data, data[:200],
                  torch.device("cpu"), None, tmp_path)
    assert not (tmp_path / "best.pt").exists(), "nothing is saved from a run that went wrong"


def test_training_on_a_simulated_t4_reads_once_per_log_interval_in_both_precisions(tmp_path):
    """fp16 (a T4's auto) runs the LSTM in fp16 with the GradScaler on; bf16 keeps it in fp32. No
    lab line reads from the GPU more often than once per --log-every steps (or per evaluation)."""
    result = run_on_simulated_cuda(f"""
import argparse, pathlib, simulated_cuda, torch
torch.set_num_threads(1)
lab = load_lab("projects/02_text_generator.py")
device = torch.device("cuda")
data = torch.randint(0, 12, (1000,))  # 4 streams of 250: 15 steps of 16 characters
config = lab.CharConfig(vocab_size=12, embed_dim=8, hidden_size=16, num_layers=2)
args = argparse.Namespace(batch_size=4, bptt=16, epochs=1, evals_per_epoch=1, lr=1e-2, weight_decay=0.0, warmup=0.1,
                          clip=1.0, time_budget=600.0, log_every=5, prompt="ab", bug=None)
for name, lstm_dtype in (("auto", torch.float16), ("bf16", torch.float32)):
    model = lab.CharLSTM(config).to(device)
    seen = set()
    model.lstm.register_forward_hook(lambda module, inputs, outputs: seen.add(outputs[0].dtype))
    out = pathlib.Path({str(tmp_path)!r}) / name
    out.mkdir()
    history, _, _, steps, _, _ = lab.train(args, model, config, list("abcdefghijkl"), data, data[:200], device,
                                           lab.pick_precision(name, device), out)
    assert lstm_dtype in seen and steps == 15 and (out / "best.pt").exists(), (name, seen, steps)
reads = {{line: n for line, n in simulated_cuda.REPORT.as_dict()["intervals_with_read_by_line"].items()
         if "GradScaler" not in line}}
assert all(n <= 2 * 3 for n in reads.values()), reads  # after steps 5, 10 and 15 of each run
""")
    assert result.returncode == 0, result.stderr[-3000:]


# --- the real run ----------------------------------------------------------------------------------

@pytest.mark.full
def test_default_run_reaches_1_60_nats_per_character(lab_data_dir, tmp_path):
    result = run_lab(LAB, "--data-dir", lab_data_dir, "--out-dir", tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["val_loss"] <= 1.60
    assert metrics["val_bits_per_char"] == pytest.approx(metrics["val_loss"] / math.log(2))
    assert metrics["seconds_to_target"] is not None
    assert (tmp_path / "samples.md").is_file() and (tmp_path / "loss_curve.png").is_file()

"""Lab 03: the data pipeline's pieces, early stopping, the precision policy, checkpoints and exact
resume, torchrun (DDP) against one process, and bad input."""
import json
import os
import shutil
import subprocess
import sys
import time
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, assert_clean_failure, failure_of, lab_path, load_lab, run_lab

LAB = "week1_pytorch/03_training_loop.py"
lab = load_lab(LAB)

SMOKE_RUN = ["--smoke", "--epochs", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted 3-epoch smoke run, shared by the tests below (read-only)."""
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    lab.main([*SMOKE_RUN, "--out-dir", str(out_dir)])
    return out_dir


def files_in(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def assert_same_checkpoint(resumed, expected, where="checkpoint"):
    """Every tensor bitwise equal, every number exactly equal, in the whole checkpoint: model,
    optimizer, scheduler, scaler, early stopping, RNG states, config, history (but wall-clock seconds)."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(resumed, expected), f"{where} differs"
    elif isinstance(expected, dict):
        assert resumed.keys() == expected.keys(), f"{where}: keys {sorted(resumed)} != {sorted(expected)}"
        for key in expected:
            if key != "seconds":
                assert_same_checkpoint(resumed[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(resumed) is type(expected) and len(resumed) == len(expected), f"{where} differs in length"
        for index, (a, b) in enumerate(zip(resumed, expected)):
            assert_same_checkpoint(a, b, f"{where}[{index}]")
    else:
        assert resumed == expected, f"{where}: {resumed!r} != {expected!r}"


# The pieces.
@pytest.mark.exercise("random_shift")
def test_random_shift_moves_each_image_by_at_most_max_shift_with_black_fill():
    images = torch.rand(16, 28, 28) + 0.1          # no zero pixels, so the black fill is visible
    torch.manual_seed(0)
    shifted = lab.random_shift(images, max_shift=2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    offsets_seen = set()
    for original_padded, result in zip(padded, shifted):
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(original_padded[dy:dy + 28, dx:dx + 28], result)]
        assert len(matches) == 1, "each output is one crop of the zero-padded image"
        offsets_seen.add(matches[0])
    assert len(offsets_seen) > 1, "every image draws its own offset"
    assert torch.equal(lab.random_shift(images, max_shift=0), images)


def test_to_model_input_scales_and_normalises():
    images = torch.stack([torch.full((28, 28), 255, dtype=torch.uint8), torch.zeros(28, 28, dtype=torch.uint8)])
    inputs = lab.to_model_input(images)
    assert inputs.shape == (2, 1, 28, 28) and inputs.dtype == torch.float32
    torch.testing.assert_close(inputs[0].unique(), torch.tensor([(1 - lab.MNIST_MEAN) / lab.MNIST_STD]))
    torch.testing.assert_close(inputs[1].unique(), torch.tensor([-lab.MNIST_MEAN / lab.MNIST_STD]))


def test_dataset_answers_a_list_of_indices_with_one_batch():
    raw = lab.make_smoke_digits(train_count=20, test_count=4)
    dataset = lab.MNISTDataset(raw["train_images"], raw["train_labels"])
    images, labels = dataset[[3, 0, 7]]
    assert images.shape == (3, 28, 28) and labels.tolist() == raw["train_labels"][[3, 0, 7]].tolist()
    image, label = dataset[3]
    assert torch.equal(image, images[0]) and label == labels[0]


def first_epoch(raw, config, epoch=1, rank=0, world_size=1):
    loaders = lab.make_loaders(raw, config, torch.device("cpu"), 0, rank, world_size)
    loaders["train_order"].set_epoch(epoch)
    return loaders, [labels for _images, labels in loaders["train"]]


def test_seeded_split_and_shuffle_are_repeatable():
    raw = lab.make_smoke_digits(train_count=300, test_count=10)
    config = lab.Config(val_size=50, batch_size=32, smoke=True)
    loaders_a, order_a = first_epoch(raw, config)
    loaders_b, order_b = first_epoch(raw, config)
    assert loaders_a["val"].dataset.indices == loaders_b["val"].dataset.indices
    assert torch.equal(torch.cat(order_a), torch.cat(order_b))
    assert not torch.equal(torch.cat(order_a), torch.cat(first_epoch(raw, config, epoch=2)[1]))
    assert not torch.equal(torch.cat(order_a), torch.cat(first_epoch(raw, lab.Config(val_size=50, batch_size=32, seed=1))[1]))


def test_two_processes_at_batch_b_share_out_each_batch_of_one_process_at_2b():
    """Why DDP with N processes at batch B takes the steps of one process at N*B: at every step the
    N processes together see exactly the images of the big batch (in another order)."""
    raw = lab.make_smoke_digits(train_count=300, test_count=10)
    one = first_epoch(raw, lab.Config(val_size=44, batch_size=32, smoke=True))[1]
    ranks = [first_epoch(raw, lab.Config(val_size=44, batch_size=16, smoke=True), rank=r, world_size=2)[1]
             for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 8
    for big, *small in zip(one, *ranks):
        assert sorted(big.tolist()) == sorted(torch.cat(small).tolist())
    # Evaluation: each process takes every 2nd image, so the two shares are the whole split, once.
    val_shares = [lab.make_loaders(raw, lab.Config(val_size=44, smoke=True), torch.device("cpu"), 0, r, 2)["val"]
                  for r in range(2)]
    assert sum(len(loader.dataset) for loader in val_shares) == 44


@pytest.mark.exercise("early_stopping_step")
def test_early_stopping_counts_epochs_without_progress_and_round_trips():
    stopper = lab.EarlyStopping(patience=2)
    assert stopper.step(1.0) and stopper.step(0.9)
    assert not stopper.step(0.95) and not stopper.should_stop
    copy = lab.EarlyStopping(patience=99)
    copy.load_state_dict(stopper.state_dict())
    assert not copy.step(0.9) and copy.should_stop     # 0.9 is not *better* than 0.9


def tiny_training(lr=1e-2):
    torch.manual_seed(0)
    model = lab.MLP(hidden_sizes=(16,), dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=4)
    return model, optimizer, scheduler


def train_tiny_epoch(model, optimizer, scheduler, batches, lr_history, first_step=0):
    cpu = torch.device("cpu")
    return lab.train_one_epoch(model, batches, optimizer, scheduler, lab.grad_scaler(cpu, None), cpu, None,
                               label_smoothing=0.1, max_shift=0, epoch=1, epochs=1, first_step=first_step,
                               lr_history=lr_history, show_progress=False)


@pytest.mark.exercise("train_one_epoch")
def test_train_one_epoch_takes_the_steps_of_a_plain_training_loop():
    raw = lab.make_smoke_digits(train_count=64, test_count=4)
    batches = [(raw["train_images"][i:i + 16], raw["train_labels"][i:i + 16]) for i in range(0, 64, 16)]
    model, optimizer, scheduler = tiny_training()
    model.eval()
    lr_history = []
    loss, accuracy = train_tiny_epoch(model, optimizer, scheduler, batches, lr_history)
    assert model.training, "train_one_epoch puts the model in training mode"

    reference, reference_optimizer, reference_scheduler = tiny_training()
    reference_lrs, losses, correct = [], [], 0
    for images, labels in batches:
        logits = reference(lab.to_model_input(images))
        batch_loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
        reference_optimizer.zero_grad()
        batch_loss.backward()
        reference_optimizer.step()
        reference_lrs.append(reference_scheduler.get_last_lr()[0])
        reference_scheduler.step()
        losses.append(batch_loss.item())
        correct += (logits.argmax(dim=1) == labels).sum().item()
    assert lr_history == reference_lrs, "one LR per step: the one the step used, before scheduler.step()"
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs)
    assert isinstance(loss, float) and isinstance(accuracy, float)
    assert loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert accuracy == pytest.approx(correct / 64)

    broken, optimizer, scheduler = tiny_training()
    with torch.no_grad():
        broken.head.bias[0] = float("nan")                     # every loss from the first step on is NaN
    with pytest.raises(lab.LabError, match="step 11"):
        train_tiny_epoch(broken, optimizer, scheduler, batches, [], first_step=10)


# The debugging drill (--bug no-eval-mode): in-process, on tiny generated digits.
def repeat_difference_of_evaluate(bug, dropout=0.2):
    """Two evaluations of the same weights, right after training left the model in training mode."""
    cpu = torch.device("cpu")
    raw = lab.make_smoke_digits(train_count=8, test_count=128)
    batches = [(raw["test_images"][i:i + 64], raw["test_labels"][i:i + 64]) for i in (0, 64)]
    torch.manual_seed(0)
    model = lab.MLP(hidden_sizes=(64,), dropout=dropout)
    model.train()
    losses = [lab.evaluate(model, batches, cpu, None, label_smoothing=0.1, bug=bug)[0] for _ in range(2)]
    return abs(losses[1] - losses[0]), model.training


def test_drill_no_eval_mode_makes_two_evaluations_of_the_same_weights_disagree():
    clean, clean_training = repeat_difference_of_evaluate(None)
    assert clean == 0.0 and not clean_training, "a clean evaluation is in eval mode and repeatable exactly"
    bugged, bugged_training = repeat_difference_of_evaluate("no-eval-mode")
    assert bugged_training and bugged > 1e-4, f"--bug no-eval-mode: two evaluations differ by only {bugged:.1e}"
    assert repeat_difference_of_evaluate("no-eval-mode", dropout=0.0)[0] == 0.0, "no dropout: nothing to see"


def test_the_bug_flag_reaches_the_evaluation(tmp_path, monkeypatch):
    """run() hands --bug to evaluate, the function that plants it (training skipped, stopped at the
    first evaluation)."""
    received = []

    class Stop(Exception):
        pass

    def first_evaluation(*args, **kwargs):
        received.append(kwargs.get("bug"))
        raise Stop

    monkeypatch.setattr(lab, "train_one_epoch", lambda *args, **kwargs: (1.0, 0.5))
    monkeypatch.setattr(lab, "evaluate", first_evaluation)
    for argv, expected in ((["--bug", "no-eval-mode"], "no-eval-mode"), ([], None)):
        with pytest.raises(Stop):
            lab.main([*argv, *SMOKE_RUN, "--out-dir", str(tmp_path / "out")])
        assert received[-1] == expected


def test_nan_guard_keeps_the_first_bad_step_and_names_it():
    first_bad = torch.full((), lab.NO_BAD_STEP)
    for step, loss in zip(range(40, 44), [0.3, float("inf"), float("nan"), 0.2]):
        first_bad = lab.note_non_finite(torch.tensor(loss), step, first_bad)
    with pytest.raises(lab.LabError, match="step 41"):
        lab.raise_if_diverged(first_bad)
    lab.raise_if_diverged(torch.full((), lab.NO_BAD_STEP))


# Mixed precision: the policy of CONTRIBUTING.md, with the GPU's answers faked.
def answers_like(monkeypatch, native_bf16: bool):
    """torch.cuda.is_bf16_supported as a GPU answers it: a T4 says True only counting emulation."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)


@pytest.mark.parametrize("native_bf16, expected", [(False, torch.float16), (True, torch.bfloat16)],
                         ids=["T4: fp16", "A100/H200: bf16"])
def test_auto_precision_follows_native_bf16(monkeypatch, native_bf16, expected):
    answers_like(monkeypatch, native_bf16)
    assert lab.pick_precision("auto", torch.device("cuda")) is expected
    assert lab.pick_precision("fp32", torch.device("cuda")) is None
    assert lab.pick_precision("fp16", torch.device("cuda")) is torch.float16


def test_cpu_trains_in_fp32_and_refuses_low_precision():
    assert lab.pick_precision("auto", torch.device("cpu")) is None
    assert not lab.grad_scaler(torch.device("cpu"), None).is_enabled()
    for name in ("fp16", "bf16"):
        with pytest.raises(lab.LabError, match=f"--precision {name} is for CUDA"):
            lab.pick_precision(name, torch.device("cpu"))


def test_tf32_matmuls_on_cuda_only_and_the_old_setting_comes_back():
    before = torch.backends.cuda.matmul.fp32_precision
    with lab.tf32_matmuls(torch.device("cuda")):
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cuda.matmul.fp32_precision == before


# Checkpoints and resume.
def test_checkpoints_hold_everything_needed_to_resume(finished_run):
    for name in ("last.pt", "best.pt"):
        saved = torch.load(finished_run / name, map_location="cpu", weights_only=True)
        assert lab.TRAINING_CHECKPOINT_KEYS <= saved.keys() and saved["lab"] == lab.LAB_NAME
        assert len(saved["rng"]) == 1 and set(saved["rng"][0]) == {"torch", "python", "cuda"}
        assert isinstance(saved["rng"][0]["python"], tuple) and saved["rng"][0]["torch"].dtype == torch.uint8
        assert {"patience", "best_loss", "bad_epochs"} == saved["early_stopping"].keys()
        assert saved["config"]["world_size"] == 1
    last = torch.load(finished_run / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 3 and len(last["history"]) == 3
    assert (finished_run / "tensorboard").is_dir() and list((finished_run / "tensorboard").glob("events.*"))


@pytest.mark.parametrize("stop_after, workers", [(1, 0), (2, 2)],
                         ids=["stopped after epoch 1", "stopped after epoch 2, 2 loader workers"])
def test_stopped_and_resumed_run_ends_with_bitwise_the_same_whole_checkpoint(stop_after, workers,
                                                                              finished_run, tmp_path):
    """On CPU the resumed run must match the uninterrupted one exactly (torch.equal, not a tolerance),
    in everything the checkpoint holds. Workers do no random work, so they cannot change the result."""
    loader = ["--num-workers", str(workers)]
    interrupted = tmp_path / "interrupted"
    lab.main([*SMOKE_RUN, *loader, "--stop-after", str(stop_after), "--out-dir", str(interrupted)])
    stopped = json.loads((interrupted / "metrics.json").read_text())
    assert stopped["epochs"] == stop_after and stopped["stopped_by"] == "--stop-after"

    torch.manual_seed(12345)                # scramble the RNG: the checkpoint must restore it
    lab.main(["--resume", str(interrupted / "last.pt"), "--device", "cpu", *loader])  # into the same folder

    for name in ("last.pt", "best.pt"):
        expected = torch.load(finished_run / name, map_location="cpu", weights_only=True)
        resumed = torch.load(interrupted / name, map_location="cpu", weights_only=True)
        assert_same_checkpoint(resumed, expected, name)
    assert torch.load(interrupted / "last.pt", weights_only=True)["epoch"] == 3
    final = json.loads((interrupted / "metrics.json").read_text())
    reference = json.loads((finished_run / "metrics.json").read_text())
    assert final["test_accuracy"] == reference["test_accuracy"]
    assert [r["val_loss"] for r in final["history"]] == [r["val_loss"] for r in reference["history"]]


def test_resuming_a_finished_run_trains_nothing_and_reports_again(finished_run, tmp_path):
    out_dir = tmp_path / "again"
    shutil.copytree(finished_run, out_dir)
    weights_before = torch.load(out_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    lab.main(["--resume", str(out_dir / "last.pt"), "--device", "cpu"])
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["stopped_by"] == "finished all epochs"
    weights_after = torch.load(out_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(weights_after[name], tensor) for name, tensor in weights_before.items())


# Scale-out: torchrun with 2 CPU processes (gloo) against one process.
def torchrun(*args, processes=2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", str(lab_path(LAB)), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, MPLBACKEND="Agg"))


def test_two_processes_at_batch_b_train_like_one_at_2b_and_resume_under_torchrun(tmp_path):
    """With the randomness that differs switched off (dropout, augmentation; fp32; the MLP has no
    batch norm), DDP on 2 processes at batch 32 ends with the weights of 1 process at batch 64,
    also when the DDP run is stopped after epoch 1 and resumed under torchrun."""
    same_steps = ["--smoke", "--device", "cpu", "--epochs", "2", "--dropout", "0", "--max-shift", "0",
                  "--precision", "fp32"]
    one, two = tmp_path / "one_process", tmp_path / "two_processes"
    lab.main([*same_steps, "--batch-size", "64", "--out-dir", str(one)])
    stopped = torchrun(*same_steps, "--batch-size", "32", "--stop-after", "1", "--out-dir", two)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    resumed = torchrun("--resume", two / "last.pt", "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = torch.load(one / "last.pt", map_location="cpu", weights_only=True)
    saved = torch.load(two / "last.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == expected["epoch"] == 2 and saved["config"]["world_size"] == 2
    for name, tensor in expected["model"].items():
        torch.testing.assert_close(saved["model"][name], tensor, rtol=0, atol=1e-5, msg=name)
    assert len(saved["rng"]) == 2 and not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])

    # Rank 0 alone prints and writes: one header per launch, one TensorBoard file per launch.
    for run in (stopped, resumed):
        assert run.stdout.count(f"Lab {lab.LAB_NAME}:") == 1 and "2 processes (torchrun)" in run.stdout
    assert len(list((two / "tensorboard").glob("events.*"))) == 2
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs"] == 2

    # A 2-process checkpoint cannot be resumed by one process: the batch order depends on it.
    before = files_in(two)
    refused = failure_of(lab.main, ["--resume", two / "last.pt", "--device", "cpu"])
    assert_clean_failure(refused, "2 process(es)", "torchrun --nproc_per_node=2")
    assert files_in(two) == before


# Bad input: one line on stderr, a non-zero exit, nothing written or overwritten.
MISSING_DEVICES = [name for name, present in (("cuda", torch.cuda.is_available()),
                                              ("mps", torch.backends.mps.is_available())) if not present]


@pytest.mark.parametrize("device", MISSING_DEVICES)
def test_a_missing_device_is_a_clean_error(tmp_path, device):
    result = failure_of(lab.main, ["--device", device, "--smoke", "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, f"--device {device}", "--device cpu")
    assert not (tmp_path / "out").exists()


def test_missing_mnist_offline_names_url_layout_and_smoke(tmp_path, no_network):
    started = time.perf_counter()
    result = failure_of(lab.main, ["--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out"])
    assert time.perf_counter() - started < 60, "the download attempt should fail fast offline"
    assert_clean_failure(result, "https://ossci-datasets.s3.amazonaws.com/mnist/", "MNIST/raw",
                         "t10k-labels-idx1-ubyte", "--smoke")
    assert not (tmp_path / "out").exists()


def test_resume_from_a_missing_file_is_a_clean_error(finished_run, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(finished_run, out_dir)
    before = files_in(out_dir)
    result = failure_of(lab.main, ["--resume", out_dir / "no_such.pt", "--out-dir", out_dir])
    assert_clean_failure(result, "no such file", "last.pt")
    assert files_in(out_dir) == before


def test_resume_from_a_truncated_file_is_a_clean_error_and_keeps_the_checkpoints(finished_run, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(finished_run, out_dir)
    whole = (out_dir / "last.pt").read_bytes()
    (out_dir / "cut_short.pt").write_bytes(whole[: len(whole) // 2])
    before = files_in(out_dir)
    result = failure_of(lab.main, ["--resume", out_dir / "cut_short.pt"])  # --out-dir: the file's folder
    assert_clean_failure(result, "cut_short.pt", "truncated")
    assert "another lab" not in result.stderr
    assert files_in(out_dir) == before


@pytest.mark.parametrize("contents, named", [
    ({"model": {}, "config": {"hidden_sizes": [512, 256], "dropout": 0.2}, "sample_inputs": torch.zeros(1),
      "sample_outputs": torch.zeros(1)}, "another lab or program"),           # what lab 02 writes
    ({"lab": "07_seq2seq", "model": {}, "config": {}}, "lab 07_seq2seq"),
    ([1, 2, 3], "another lab or program"),
])
def test_resume_from_another_labs_checkpoint_says_so(finished_run, tmp_path, contents, named):
    out_dir = tmp_path / "out"
    shutil.copytree(finished_run, out_dir)
    torch.save(contents, out_dir / "other.pt")
    before = files_in(out_dir)
    result = failure_of(lab.main, ["--resume", out_dir / "other.pt", "--device", "cpu"])
    assert_clean_failure(result, "other.pt", "not a training checkpoint of 03_training_loop", named)
    assert "truncated" not in result.stderr
    assert files_in(out_dir) == before


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--epochs", "-1"), ("--batch-size", "0"),
                                         ("--batch-size", "-8"), ("--lr", "0"), ("--lr", "-0.01"),
                                         ("--dropout", "1"), ("--dropout", "-0.1"), ("--max-shift", "-1"),
                                         ("--num-workers", "two"), ("--precision", "fp8"), ("--bug", "typo")])
def test_out_of_range_flags_are_refused_before_anything_runs(flag, value, tmp_path):
    result = failure_of(lab.main, [f"{flag}={value}", "--smoke", "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, flag)
    assert not (tmp_path / "out").exists()


def test_fp16_without_cuda_is_refused_before_anything_runs(tmp_path):
    result = failure_of(lab.main, ["--precision", "fp16", "--device", "cpu", "--smoke", "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, "--precision fp16 is for CUDA GPUs")
    assert not (tmp_path / "out").exists()


def test_a_bad_flag_in_a_notebook_prints_one_line_without_raising(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    lab.main(["--epochs", "0", "--smoke", "--out-dir", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--epochs" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.full
def test_default_run_reaches_98_5_percent(lab_data_dir, tmp_path):
    result = run_lab(LAB, "--data-dir", lab_data_dir, "--out-dir", tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["smoke"] is False
    assert metrics["test_accuracy"] >= 0.985

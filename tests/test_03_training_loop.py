"""Lab 03: the data pipeline's pieces, early stopping, checkpoints and exact resume, and bad input."""
import json
import random
import shutil
import time

import pytest
import torch

from conftest import assert_clean_failure, load_lab, run_lab

LAB = "week1_pytorch/03_training_loop.py"
lab = load_lab(LAB)

# Offline on any machine: every download goes to a proxy port where nothing listens.
NO_NETWORK = {name: "http://127.0.0.1:9" for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
NO_NETWORK |= {"no_proxy": "", "NO_PROXY": ""}
SMOKE_RUN = ["--smoke", "--epochs", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted 3-epoch smoke run, shared by the tests below (read-only)."""
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    lab.main([*SMOKE_RUN, "--out-dir", str(out_dir)])
    return out_dir


def files_in(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# The pieces.
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


def test_collate_stacks_scales_and_normalises():
    samples = [(torch.full((28, 28), 255, dtype=torch.uint8), torch.tensor(3)),
               (torch.zeros(28, 28, dtype=torch.uint8), torch.tensor(7))]
    images, labels = lab.Collate(max_shift=0)(samples)
    assert images.shape == (2, 1, 28, 28) and images.dtype == torch.float32
    assert labels.tolist() == [3, 7]
    torch.testing.assert_close(images[0].unique(), torch.tensor([(1 - lab.MNIST_MEAN) / lab.MNIST_STD]))
    torch.testing.assert_close(images[1].unique(), torch.tensor([-lab.MNIST_MEAN / lab.MNIST_STD]))


def test_seeded_split_and_shuffle_are_repeatable():
    raw = lab.make_smoke_digits(train_count=300, test_count=10)
    config = lab.Config(val_size=50, batch_size=32, smoke=True)

    def first_epoch(seed_of_generator):
        loaders = lab.make_loaders(raw, config, torch.device("cpu"), 0, torch.Generator().manual_seed(seed_of_generator))
        return loaders["val"].dataset.indices, torch.cat([labels for _images, labels in loaders["train"]])

    val_a, order_a = first_epoch(0)
    val_b, order_b = first_epoch(0)
    assert val_a == val_b and torch.equal(order_a, order_b)
    assert not torch.equal(order_a, first_epoch(1)[1])


def test_early_stopping_counts_epochs_without_progress_and_round_trips():
    stopper = lab.EarlyStopping(patience=2)
    assert stopper.step(1.0) and stopper.step(0.9)
    assert not stopper.step(0.95) and not stopper.should_stop
    copy = lab.EarlyStopping(patience=99)
    copy.load_state_dict(stopper.state_dict())
    assert not copy.step(0.9) and copy.should_stop     # 0.9 is not *better* than 0.9


def test_non_finite_loss_names_the_step():
    with pytest.raises(lab.LabError, match="step 41"):
        lab.raise_if_not_finite(torch.tensor([0.3, float("inf")]), first_step=40)


# Checkpoints and resume.
def test_checkpoints_hold_everything_needed_to_resume(finished_run):
    for name in ("last.pt", "best.pt"):
        saved = torch.load(finished_run / name, map_location="cpu", weights_only=True)
        assert lab.TRAINING_CHECKPOINT_KEYS <= saved.keys()
        assert set(saved["rng"]) == {"torch", "python", "loader", "cuda"}
        assert isinstance(saved["rng"]["python"], tuple) and saved["rng"]["torch"].dtype == torch.uint8
        assert {"patience", "best_loss", "bad_epochs"} == saved["early_stopping"].keys()
    last = torch.load(finished_run / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 3 and len(last["history"]) == 3
    assert (finished_run / "tensorboard").is_dir() and list((finished_run / "tensorboard").glob("events.*"))


@pytest.mark.parametrize("workers", [0, 2])
def test_stopped_and_resumed_run_ends_with_bitwise_the_same_weights(workers, finished_run, tmp_path):
    """On CPU the resumed run must match the uninterrupted one exactly (torch.equal, not a tolerance).
    With 2 workers the random shifts happen in worker processes, seeded from the saved loader generator."""
    loader = ["--num-workers", str(workers)]
    if workers:
        finished_run = tmp_path / "uninterrupted"
        lab.main([*SMOKE_RUN, *loader, "--out-dir", str(finished_run)])
    interrupted = tmp_path / "interrupted"
    lab.main([*SMOKE_RUN, *loader, "--stop-after", "1", "--out-dir", str(interrupted)])
    stopped = json.loads((interrupted / "metrics.json").read_text())
    assert stopped["epochs"] == 1 and stopped["stopped_by"] == "--stop-after"

    random.seed(12345)                      # scramble every RNG: the checkpoint must restore them
    torch.manual_seed(12345)
    lab.main(["--resume", str(interrupted / "last.pt"), "--device", "cpu", *loader])  # into the same folder

    expected = torch.load(finished_run / "last.pt", map_location="cpu", weights_only=True)
    resumed = torch.load(interrupted / "last.pt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == expected["epoch"] == 3
    for name, tensor in expected["model"].items():
        assert torch.equal(resumed["model"][name], tensor), f"{name} differs after resuming"
    for key in ("exp_avg", "exp_avg_sq"):
        for index, state in expected["optimizer"]["state"].items():
            assert torch.equal(resumed["optimizer"]["state"][index][key], state[key])
    assert resumed["scheduler"]["last_epoch"] == expected["scheduler"]["last_epoch"]
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


# Bad input: a message, a non-zero exit, no traceback, nothing already saved lost.
def test_cuda_without_cuda_is_a_clean_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit_info:  # in-process: SystemExit with a message, nothing else
        lab.main(["--device", "cuda", "--smoke", "--out-dir", str(tmp_path / "out")])
    assert "--device cuda" in str(exit_info.value.code) and "no CUDA GPU" in str(exit_info.value.code)
    assert not (tmp_path / "out").exists()


def test_missing_mnist_offline_names_url_layout_and_smoke(tmp_path):
    started = time.perf_counter()
    result = run_lab(LAB, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out", env_extra=NO_NETWORK)
    assert time.perf_counter() - started < 60, "the download attempt should fail fast offline"
    assert_clean_failure(result, "https://ossci-datasets.s3.amazonaws.com/mnist/", "MNIST/raw",
                         "t10k-labels-idx1-ubyte", "--smoke")
    assert not (tmp_path / "out").exists()


def test_resume_from_a_missing_file_is_a_clean_error(finished_run, tmp_path, capsys):
    out_dir = tmp_path / "out"
    shutil.copytree(finished_run, out_dir)
    before = files_in(out_dir)
    with pytest.raises(SystemExit) as exit_info:
        lab.main(["--resume", str(out_dir / "no_such.pt"), "--out-dir", str(out_dir)])
    assert "no such file" in str(exit_info.value.code) and "last.pt" in str(exit_info.value.code)
    assert files_in(out_dir) == before


def test_resume_from_a_truncated_file_is_a_clean_error_and_keeps_the_checkpoints(finished_run, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(finished_run, out_dir)
    whole = (out_dir / "last.pt").read_bytes()
    (out_dir / "cut_short.pt").write_bytes(whole[: len(whole) // 2])
    before = files_in(out_dir)
    result = run_lab(LAB, "--resume", out_dir / "cut_short.pt")  # --out-dir defaults to the file's folder
    assert_clean_failure(result, "cut_short.pt", "truncated")
    assert files_in(out_dir) == before


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--epochs", "-1"), ("--batch-size", "0"),
                                         ("--batch-size", "-8"), ("--lr", "0"), ("--lr", "-0.01")])
def test_non_positive_hyper_parameters_are_refused(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lab.main([f"{flag}={value}", "--smoke", "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert flag in message and "positive" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.full
def test_default_run_reaches_98_5_percent(lab_data_dir, tmp_path):
    result = run_lab(LAB, "--data-dir", lab_data_dir, "--out-dir", tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["smoke"] is False
    assert metrics["test_accuracy"] >= 0.985

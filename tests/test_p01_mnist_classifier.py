"""Capstone 1 (projects/01_mnist_classifier.py): the torch-only MNIST loader, the batched
augmentation checked against exact pixel operations (rotation direction, where the scale and the
shift apply), the mixed-precision policy, torchrun against one process, the checkpoint round trip,
and bad input."""
import gzip
import hashlib
import json
import math
import os
import subprocess
import sys
import urllib.error

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, assert_clean_failure, failure_of, lab_path, load_lab, run_lab

LAB = "projects/01_mnist_classifier.py"


@pytest.fixture(scope="module")
def lab():
    return load_lab(LAB)


def idx_bytes(tensor: torch.Tensor) -> bytes:
    """Encode a uint8 tensor in the IDX format (magic 0x0000 08 ndim, big-endian dims, raw bytes)."""
    header = bytes([0, 0, 0x08, tensor.dim()]) + b"".join(d.to_bytes(4, "big") for d in tensor.shape)
    return header + bytes(tensor.flatten().tolist())


# --- data -----------------------------------------------------------------------------------------

@pytest.mark.exercise("read_idx")
def test_read_idx_round_trips_and_rejects_broken_files(lab):
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    assert torch.equal(lab.read_idx(idx_bytes(images)), images)
    labels = torch.tensor([3, 1, 4], dtype=torch.uint8)
    assert torch.equal(lab.read_idx(idx_bytes(labels)), labels)
    with pytest.raises(ValueError, match="promises"):
        lab.read_idx(idx_bytes(images)[:-1])  # truncated
    with pytest.raises(ValueError, match="IDX"):
        lab.read_idx(b"\x1f\x8b\x08\x00")  # a gzip header, not IDX


def fake_mnist_file(monkeypatch, lab, name, tensor):
    """Register tensor's IDX bytes as the expected content of `name` (its MD5 in the lab's table)."""
    data = idx_bytes(tensor)
    monkeypatch.setitem(lab.MNIST_FILES, name, hashlib.md5(data).hexdigest())
    return data


@pytest.mark.parametrize("gzipped", [False, True])
def test_reads_the_torchvision_cache_layout_plain_or_gzipped(lab, monkeypatch, tmp_path, gzipped):
    labels = torch.tensor([7, 2, 1], dtype=torch.uint8)
    data = fake_mnist_file(monkeypatch, lab, "t10k-labels-idx1-ubyte", labels)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / ("t10k-labels-idx1-ubyte" + (".gz" if gzipped else ""))).write_bytes(gzip.compress(data) if gzipped else data)
    monkeypatch.setattr(lab, "fetch_url", lambda url: pytest.fail("must not download when the cache is valid"))
    assert torch.equal(lab.read_idx(lab.mnist_file(tmp_path, "t10k-labels-idx1-ubyte")), labels)


def test_second_mirror_is_used_when_the_first_fails(lab, monkeypatch, tmp_path):
    data = fake_mnist_file(monkeypatch, lab, "t10k-labels-idx1-ubyte", torch.tensor([5, 0], dtype=torch.uint8))
    tried = []

    def fetch(url):
        tried.append(url)
        if url.startswith(lab.MNIST_MIRRORS[0]):
            raise urllib.error.URLError("first mirror down")
        return gzip.compress(data)

    monkeypatch.setattr(lab, "fetch_url", fetch)
    assert lab.mnist_file(tmp_path, "t10k-labels-idx1-ubyte") == data
    assert [u.split("/mnist/")[0] for u in tried] == [m.split("/mnist/")[0] for m in lab.MNIST_MIRRORS]
    assert sorted(p.name for p in (tmp_path / "MNIST" / "raw").iterdir()) == ["t10k-labels-idx1-ubyte.gz"]


def test_wrong_checksum_deletes_the_file_exits_with_a_message_and_keeps_the_rest(lab, monkeypatch, tmp_path, capsys):
    data_dir, out_dir = tmp_path / "data", tmp_path / "out"
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True)
    corrupt = raw / "train-images-idx3-ubyte.gz"
    corrupt.write_bytes(gzip.compress(b"\x00\x00\x08\x03 these are not the MNIST bytes"))
    keep = raw / "notes.txt"
    keep.write_text("mine")
    out_dir.mkdir()
    (out_dir / "metrics.json").write_text('{"from": "an earlier run"}')
    # every mirror serves a file with the wrong checksum too
    monkeypatch.setattr(lab, "fetch_url", lambda url: gzip.compress(b"\x00\x00\x08\x01 tampered"))
    result = failure_of(lab.main, ["--data-dir", data_dir, "--out-dir", out_dir])
    assert_clean_failure(result, "checksum mismatch", "deleted", "--smoke")
    assert result.stderr.startswith("error:")
    assert not corrupt.exists(), "the file that failed its checksum is deleted"
    assert not list(raw.glob("*.part")), "no half-downloaded file is left behind"
    assert keep.read_text() == "mine"
    assert json.loads((out_dir / "metrics.json").read_text()) == {"from": "an earlier run"}


# --- augmentation: affine_grid + grid_sample checked against exact pixel operations ------------

def one_image_theta(lab, degrees=0.0, scale=1.0, shift=(0.0, 0.0)):
    return lab.affine_matrices(torch.tensor([math.radians(degrees)]), torch.tensor([scale]),
                               torch.tensor([list(shift)]))


@pytest.mark.exercise("warp")
def test_warp_with_hand_written_matrices_is_the_identity_and_a_zero_filled_roll(lab):
    """warp alone, with matrices written here (not by affine_matrices): the identity keeps the
    images; a translation by 4/28 to the right (x) and -2/28 (y) reads 2 pixels to the right and
    1 up, so the picture moves 2 pixels left and 1 down, with black coming in."""
    images = torch.rand(2, 1, 28, 28)
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(2, 2, 3)
    torch.testing.assert_close(lab.warp(images, identity), images, atol=1e-5, rtol=0)
    shift = torch.tensor([[1.0, 0.0, 4 / 28], [0.0, 1.0, -2 / 28]]).expand(2, 2, 3)
    expected = torch.zeros_like(images)
    expected[..., 1:, :26] = images[..., :27, 2:]
    torch.testing.assert_close(lab.warp(images, shift), expected, atol=1e-5, rtol=0)


@pytest.mark.exercise("affine_matrices")
def test_identity_matrix_leaves_images_unchanged(lab):
    images = torch.rand(3, 1, 28, 28)
    theta = one_image_theta(lab).expand(3, 2, 3)
    torch.testing.assert_close(lab.warp(images, theta), images, atol=1e-5, rtol=0)


@pytest.mark.exercise("affine_matrices")
def test_integer_shift_equals_a_zero_filled_roll(lab):
    image = torch.rand(1, 1, 28, 28)
    shifted = lab.warp(image, one_image_theta(lab, shift=(3.0, -2.0)))  # 3 px right, 2 px up
    expected = torch.zeros_like(image)
    expected[..., :26, 3:] = image[..., 2:, :25]
    torch.testing.assert_close(shifted, expected, atol=1e-5, rtol=0)


@pytest.mark.exercise("affine_matrices")
def test_a_positive_angle_turns_the_digit_counter_clockwise(lab):
    # torch.rot90(k=1) over (rows, columns) is a quarter turn counter-clockwise as the image is
    # drawn (row 0 at the top): a dot right of the centre ends up above it.
    image = torch.rand(1, 1, 28, 28)
    torch.testing.assert_close(lab.warp(image, one_image_theta(lab, degrees=90.0)),
                               torch.rot90(image, 1, dims=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(lab.warp(image, one_image_theta(lab, degrees=-90.0)),
                               torch.rot90(image, -1, dims=(2, 3)), atol=1e-5, rtol=0)
    dot = torch.zeros(1, 1, 28, 28)
    dot[..., 13:15, 20:22] = 1.0  # right of the centre (13.5, 13.5)
    turned = lab.warp(dot, one_image_theta(lab, degrees=90.0))[0, 0]
    rows, cols = (turned > 0.5).nonzero(as_tuple=True)
    assert rows.float().mean() == pytest.approx(13.5 - 7) and cols.float().mean() == pytest.approx(13.5)


def digit_in_the_middle():
    """A random 'digit' with a black border of 9 pixels: a scale of 2 keeps it inside the frame."""
    image = torch.zeros(1, 1, 28, 28)
    image[..., 9:19, 9:19] = torch.rand(10, 10)
    return image


@pytest.mark.exercise("affine_matrices")
def test_scale_two_is_the_centre_magnified_about_the_image_centre(lab):
    # Scale 2 about the centre shows the middle 14 x 14 pixels at twice the size: exactly bilinear
    # upsampling of that crop (the same sampling positions, align_corners=False in both).
    image = digit_in_the_middle()
    grown = lab.warp(image, one_image_theta(lab, scale=2.0))
    expected = F.interpolate(image[..., 7:21, 7:21], scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(grown, expected, atol=1e-5, rtol=0)


@pytest.mark.exercise("affine_matrices")
def test_the_shift_comes_before_the_scale(lab):
    # A digit is shifted, then scaled about the centre: at scale 2 a 2-pixel shift moves it 4 pixels.
    image = digit_in_the_middle()
    scaled = lab.warp(image, one_image_theta(lab, scale=2.0))
    shifted_then_scaled = lab.warp(image, one_image_theta(lab, scale=2.0, shift=(2.0, 0.0)))
    torch.testing.assert_close(shifted_then_scaled[..., 4:], scaled[..., :-4], atol=1e-5, rtol=0)
    assert shifted_then_scaled[..., :4].abs().max() < 1e-6


def test_random_augment_keeps_shapes_range_and_is_reproducible(lab):
    images = torch.rand(16, 1, 28, 28)
    a = lab.random_augment(images, torch.Generator().manual_seed(1))
    b = lab.random_augment(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 + 1e-6


def test_each_rank_warps_its_images_as_one_process_would(lab):
    # Under torchrun rank r trains on images r, r + N, r + 2N, ... of the global batch; it must give
    # each the warp one process gives it, and its generator must end where the others' do.
    images = torch.rand(12, 1, 28, 28)
    reference = torch.Generator().manual_seed(3)
    one_process = lab.random_augment(images, reference)
    for rank in range(3):
        generator = torch.Generator().manual_seed(3)
        mine = lab.random_augment(images[rank::3], generator, rank=rank, world_size=3)
        torch.testing.assert_close(mine, one_process[rank::3], atol=0, rtol=0)
        assert torch.equal(generator.get_state(), reference.get_state())


# --- model and checkpoints ----------------------------------------------------------------------

def test_model_outputs_logits_and_rebuilds_from_config(lab):
    model = lab.build_model({"widths": [4, 8, 8], "num_classes": 10}).eval()
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_eval_only_reproduces_the_trained_test_accuracy(lab, tmp_path):
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    lab.main(["--smoke", "--out-dir", str(out), "--data-dir", str(tmp_path / "none")])
    assert torch.get_num_threads() == threads, "the smoke run's single thread is given back"
    trained = json.loads((out / "metrics.json").read_text())
    lab.main(["--smoke", "--eval-only", "--checkpoint", str(out / "best.pt"),
              "--out-dir", str(out), "--data-dir", str(tmp_path / "none")])
    evaluated = json.loads((out / "eval_only_metrics.json").read_text())
    assert evaluated["test_accuracy"] == pytest.approx(trained["test_accuracy"])
    assert json.loads((out / "metrics.json").read_text()) == trained, "eval-only keeps metrics.json"
    # the drill's flag reaches evaluate(): the same checkpoint scored with --bug no-eval-mode
    lab.main(["--smoke", "--eval-only", "--bug", "no-eval-mode", "--checkpoint", str(out / "best.pt"),
              "--out-dir", str(out), "--data-dir", str(tmp_path / "none")])
    bugged = json.loads((out / "eval_only_metrics.json").read_text())
    assert trained["bug"] is None and evaluated["bug"] is None and bugged["bug"] == "no-eval-mode"
    assert trained["eval_batch_dependence"] < 1e-5 and evaluated["eval_batch_dependence"] < 1e-5
    assert bugged["eval_batch_dependence"] > 1e-3


def test_drill_no_eval_mode_makes_a_digit_s_loss_depend_on_its_batch(lab):
    """--bug no-eval-mode: evaluate() leaves batch norm in training mode (a model fresh from
    build_model, as a reloaded checkpoint is), so 32 digits scored in one batch and in batches of 8
    get different losses; in eval mode they differ only by rounding."""
    torch.manual_seed(0)
    images, labels = lab.synthetic_digits(32, 1)
    pixels = lab.as_pixels(images, torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is far cheaper in CPU time than two
    try:
        clean = lab.eval_batch_dependence(lab.build_model({"widths": [4, 8, 8], "num_classes": 10}), pixels, labels)
        bugged = lab.eval_batch_dependence(lab.build_model({"widths": [4, 8, 8], "num_classes": 10}), pixels,
                                           labels, bug="no-eval-mode")
    finally:
        torch.set_num_threads(threads)
    assert clean < 1e-5 and bugged > 1e-3, (clean, bugged)
    args, _ = lab.build_parser().parse_known_args(["--bug", "no-eval-mode"])
    assert args.bug == "no-eval-mode" and lab.build_parser().parse_known_args([])[0].bug is None


# --- mixed precision: one policy (CONTRIBUTING.md), checked by faking the GPU's answers --------------

def fake_gpu(monkeypatch, native_bf16: bool):
    """torch.cuda answers like a T4 (bf16 only by emulation) or like an A100/H200 (native bf16)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)


def test_precision_auto_is_fp16_on_a_t4_bf16_on_newer_gpus_and_fp32_on_cpu(lab, monkeypatch):
    cuda = torch.device("cuda")
    fake_gpu(monkeypatch, native_bf16=False)
    assert lab.pick_precision("auto", cuda) is torch.float16  # a T4 only emulates bf16
    fake_gpu(monkeypatch, native_bf16=True)
    assert lab.pick_precision("auto", cuda) is torch.bfloat16
    assert lab.pick_precision("fp16", cuda) is torch.float16 and lab.pick_precision("fp32", cuda) is None
    assert lab.pick_precision("auto", torch.device("cpu")) is None
    assert not lab.grad_scaler(torch.device("cpu"), None).is_enabled()
    with pytest.raises(lab.LabError, match="--precision fp16 is for CUDA"):
        lab.pick_precision("fp16", torch.device("cpu"))


# --- torchrun: 2 processes at batch B train exactly like 1 process at batch 2B -------------------------

def test_two_ranks_at_batch_b_end_with_the_weights_of_one_process_at_2b(lab, tmp_path):
    # What differs by design is switched off: augmentation (--no-augment), batch-norm statistics
    # (--freeze-batchnorm) and low precision (--precision fp32); the model has no dropout.
    same = ["--smoke", "--device", "cpu", "--epochs", "1", "--no-augment", "--freeze-batchnorm",
            "--precision", "fp32", "--data-dir", tmp_path / "data"]
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(lab_path(LAB)), *map(str, same), "--batch-size", "16", "--out-dir", str(tmp_path / "ranks")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lab.main(list(map(str, same)) + ["--batch-size", "32", "--out-dir", str(tmp_path / "one")])  # meanwhile
    stdout, stderr = torchrun.communicate(timeout=240)
    assert torchrun.returncode == 0, stderr[-3000:]

    ranks = torch.load(tmp_path / "ranks" / "best.pt", weights_only=True)["model"]
    one = torch.load(tmp_path / "one" / "best.pt", weights_only=True)["model"]
    torch.manual_seed(0)  # the lab's --seed: the weights both runs started from
    start = lab.build_model({"widths": [4, 8, 8], "num_classes": 10}).state_dict()
    moved = max((one[name] - start[name]).abs().max().item() for name in one)
    assert moved > 1e-2, "training barely changed the weights: the comparison would prove nothing"
    for name in one:
        torch.testing.assert_close(ranks[name], one[name], atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")

    metrics = json.loads((tmp_path / "ranks" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 32
    assert metrics["steps"] == json.loads((tmp_path / "one" / "metrics.json").read_text())["steps"]
    assert stdout.count("epoch  1/1") == 1, "only rank 0 prints"


# --- checkpoints: a broken file and another lab's checkpoint get different messages -----------------

@pytest.mark.parametrize("content, message", [(None, "does not exist"), (b"not a checkpoint", "truncated or not")],
                         ids=["missing", "corrupt"])
def test_missing_or_corrupt_checkpoint_is_one_line(lab, tmp_path, content, message):
    path = tmp_path / "best.pt"
    if content is not None:
        path.write_bytes(content)
    result = failure_of(lab.main, ["--smoke", "--eval-only", "--checkpoint", path, "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, str(path), message)
    assert "another lab" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_lab_says_so(lab, tmp_path):
    path = tmp_path / "cvae.pt"  # lab 09's conditional VAE: a valid checkpoint, not a classifier
    torch.save({"model": {}, "config": {"kind": "cvae", "latent_dim": 2, "hidden": 512, "num_classes": 10}}, path)
    result = failure_of(lab.main, ["--smoke", "--eval-only", "--checkpoint", path, "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, "another lab", "latent_dim")
    assert "truncated" not in result.stderr
    assert not (tmp_path / "out").exists()


# --- bad input: one line on stderr, exit status 1, nothing written --------------------------------

def test_eval_only_without_checkpoint_fails_cleanly(lab, tmp_path):
    result = failure_of(lab.main, ["--eval-only", "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, "--eval-only needs --checkpoint")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--epochs", "0", "at least 1"), ("--label-smoothing", "1", "at least 0 and below 1"), ("--lr", "nan", "above 0"),
    ("--target", "1.5", "above 0 and at most 1"), ("--precision", "bf16", "--precision bf16 is for CUDA"),
    ("--bug", "no-zero-grad", "invalid choice"),
])
def test_bad_flags_fail_with_one_line_before_anything_is_written(lab, tmp_path, flag, value, message):
    result = failure_of(lab.main, ["--smoke", "--device", "cpu", flag, value, "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, flag, message)
    assert not (tmp_path / "out").exists()


def test_an_absent_device_is_one_line(lab, tmp_path):
    device = "mps" if torch.cuda.is_available() else "cuda"      # the one this machine lacks
    result = failure_of(lab.main, ["--smoke", "--device", device, "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, f"--device {device}")
    assert not (tmp_path / "out").exists()


# --- the real run -------------------------------------------------------------------------------

@pytest.mark.full
def test_default_run_reaches_99_5_percent(lab_data_dir, tmp_path):
    result = run_lab(LAB, "--data-dir", lab_data_dir, "--out-dir", tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.995
    assert metrics["seconds_to_target"] is not None, "99.0% test accuracy was never reached"

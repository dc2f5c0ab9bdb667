"""Capstone 1 (projects/01_mnist_classifier.py): the torch-only MNIST loader, the batched
augmentation checked against exact pixel operations, the checkpoint round trip, and bad input."""
import gzip
import hashlib
import json
import math
import urllib.error

import pytest
import torch

from conftest import assert_clean_failure, load_lab, run_lab

LAB = "projects/01_mnist_classifier.py"


@pytest.fixture(scope="module")
def lab():
    return load_lab(LAB)


def idx_bytes(tensor: torch.Tensor) -> bytes:
    """Encode a uint8 tensor in the IDX format (magic 0x0000 08 ndim, big-endian dims, raw bytes)."""
    header = bytes([0, 0, 0x08, tensor.dim()]) + b"".join(d.to_bytes(4, "big") for d in tensor.shape)
    return header + bytes(tensor.flatten().tolist())


# --- data -----------------------------------------------------------------------------------------

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
    with pytest.raises(SystemExit) as exit_info:
        lab.main(["--data-dir", str(data_dir), "--out-dir", str(out_dir)])
    message = str(exit_info.value.code)
    assert message.startswith("error:") and "checksum mismatch" in message and "--smoke" in message
    assert "deleted" in message
    assert not corrupt.exists(), "the file that failed its checksum is deleted"
    assert not list(raw.glob("*.part")), "no half-downloaded file is left behind"
    assert keep.read_text() == "mine"
    assert json.loads((out_dir / "metrics.json").read_text()) == {"from": "an earlier run"}


# --- augmentation: affine_grid + grid_sample checked against exact pixel operations ------------

def one_image_theta(lab, degrees=0.0, scale=1.0, shift=(0.0, 0.0)):
    return lab.affine_matrices(torch.tensor([math.radians(degrees)]), torch.tensor([scale]),
                               torch.tensor([list(shift)]))


def test_identity_matrix_leaves_images_unchanged(lab):
    images = torch.rand(3, 1, 28, 28)
    theta = one_image_theta(lab).expand(3, 2, 3)
    torch.testing.assert_close(lab.warp(images, theta), images, atol=1e-5, rtol=0)


def test_integer_shift_equals_a_zero_filled_roll(lab):
    image = torch.rand(1, 1, 28, 28)
    shifted = lab.warp(image, one_image_theta(lab, shift=(3.0, -2.0)))  # 3 px right, 2 px up
    expected = torch.zeros_like(image)
    expected[..., :26, 3:] = image[..., 2:, :25]
    torch.testing.assert_close(shifted, expected, atol=1e-5, rtol=0)


def test_quarter_turn_equals_rot90(lab):
    image = torch.rand(1, 1, 28, 28)
    turned = lab.warp(image, one_image_theta(lab, degrees=90.0))
    candidates = [torch.rot90(image, k, dims=(2, 3)) for k in (1, 3)]
    assert any(torch.allclose(turned, c, atol=1e-5) for c in candidates)


def test_scale_two_magnifies_the_centre(lab):
    image = torch.zeros(1, 1, 28, 28)
    image[..., 13:15, 13:15] = 1.0  # a 2x2 dot in the centre becomes about 4x4
    grown = lab.warp(image, one_image_theta(lab, scale=2.0))
    assert grown.sum().item() == pytest.approx(4 * image.sum().item(), rel=0.05)


def test_random_augment_keeps_shapes_range_and_is_reproducible(lab):
    images = torch.rand(16, 1, 28, 28)
    a = lab.random_augment(images, torch.Generator().manual_seed(1))
    b = lab.random_augment(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 + 1e-6


# --- model and checkpoints ----------------------------------------------------------------------

def test_model_outputs_logits_and_rebuilds_from_config(lab):
    model = lab.build_model({"widths": [4, 8, 8], "num_classes": 10}).eval()
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_eval_only_reproduces_the_trained_test_accuracy(lab, tmp_path):
    out = tmp_path / "out"
    trained = lab.main(["--smoke", "--out-dir", str(out), "--data-dir", str(tmp_path / "none")])
    evaluated = lab.main(["--smoke", "--eval-only", "--checkpoint", str(out / "best.pt"),
                          "--out-dir", str(out), "--data-dir", str(tmp_path / "none")])
    assert evaluated["test_accuracy"] == pytest.approx(trained["test_accuracy"])
    assert (out / "eval_only_metrics.json").is_file()
    assert json.loads((out / "metrics.json").read_text())["train_time_s"] > 0, "eval-only keeps metrics.json"


# --- bad input ----------------------------------------------------------------------------------

def test_eval_only_without_checkpoint_fails_cleanly(tmp_path):
    result = run_lab(LAB, "--eval-only", "--out-dir", tmp_path / "out", timeout=60)
    assert_clean_failure(result, "--eval-only needs --checkpoint")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [None, b"not a checkpoint"], ids=["missing", "corrupt"])
def test_missing_or_corrupt_checkpoint_is_a_message(lab, tmp_path, content):
    path = tmp_path / "best.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        lab.main(["--smoke", "--eval-only", "--checkpoint", str(path), "--out-dir", str(tmp_path / "out")])
    assert str(path) in str(exit_info.value.code)


def test_unavailable_device_is_a_message(lab, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(SystemExit) as exit_info:
        lab.main(["--smoke", "--device", "cuda", "--out-dir", str(tmp_path)])
    assert "no CUDA GPU" in str(exit_info.value.code)


# --- the real run -------------------------------------------------------------------------------

@pytest.mark.full
def test_default_run_reaches_99_5_percent(lab_data_dir, tmp_path):
    result = run_lab(LAB, "--data-dir", lab_data_dir, "--out-dir", tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.995
    assert metrics["seconds_to_target"] is not None, "99.0% test accuracy was never reached"

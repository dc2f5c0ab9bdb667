"""Lab 02: the hand-written layer and loss against PyTorch's own, the model, and bad input."""
import json
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_clean_failure, load_lab, run_lab

LAB = "week1_pytorch/02_neural_network.py"
lab = load_lab(LAB)

# Offline on any machine: every download goes to a proxy port where nothing listens.
NO_NETWORK = {name: "http://127.0.0.1:9" for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
NO_NETWORK |= {"no_proxy": "", "NO_PROXY": ""}


def test_linear_relu_forward_and_backward_match_autograd():
    torch.manual_seed(0)
    layer = nn.Linear(20, 7).double()
    x = torch.randn(5, 20, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():  # row 0 meets zero bias: pre-activations exactly 0, at ReLU's kink
        x[0] = 0
        layer.bias[:3] = 0
    grad_output = torch.randn(5, 7, dtype=torch.float64)
    expected = F.relu(layer(x))
    expected.backward(grad_output)

    output, cache = lab.linear_relu_forward(x.detach(), layer.weight.detach(), layer.bias.detach())
    grad_x, grad_weight, grad_bias = lab.linear_relu_backward(grad_output, cache)
    torch.testing.assert_close(output, expected.detach())
    torch.testing.assert_close(grad_x, x.grad)
    torch.testing.assert_close(grad_weight, layer.weight.grad)
    torch.testing.assert_close(grad_bias, layer.bias.grad)
    assert lab.check_layer_against_autograd(seed=3) < 1e-12


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.35, 1.0])
def test_label_smoothed_cross_entropy_matches_pytorch(smoothing):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 10, dtype=torch.float64, generator=generator) * 4
    targets = torch.randint(0, 10, (32,), generator=generator)
    torch.testing.assert_close(lab.label_smoothed_cross_entropy(logits, targets, smoothing),
                               F.cross_entropy(logits, targets, label_smoothing=smoothing))


def test_label_smoothed_cross_entropy_gradient_matches_pytorch():
    logits = torch.randn(8, 10, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 10, (8,))
    ours, = torch.autograd.grad(lab.label_smoothed_cross_entropy(logits, targets, 0.2), logits)
    theirs, = torch.autograd.grad(F.cross_entropy(logits, targets, label_smoothing=0.2), logits)
    torch.testing.assert_close(ours, theirs)


def test_mlp_shapes_and_rebuild_from_config():
    model = lab.MLP(hidden_sizes=(32, 16), dropout=0.0)
    assert model(torch.zeros(4, 1, 28, 28)).shape == (4, 10)
    assert sum(p.numel() for p in model.parameters()) == 784 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    rebuilt = lab.build_model({"hidden_sizes": [32, 16], "dropout": 0.0})
    rebuilt.load_state_dict(model.state_dict())  # same architecture: every key and shape fits


def test_non_finite_loss_names_the_step():
    with pytest.raises(lab.LabError, match="step 12"):
        lab.raise_if_not_finite(torch.tensor([0.5, 0.4, float("nan"), float("inf")]), first_step=10)
    lab.raise_if_not_finite(torch.tensor([0.5, 0.4]), first_step=0)


def test_smoke_digits_have_mnist_shapes():
    data = lab.make_smoke_digits(train_count=64, test_count=16)
    assert data["train_images"].shape == (64, 28, 28) and data["train_images"].dtype == torch.uint8
    assert data["test_labels"].shape == (16,) and data["test_labels"].dtype == torch.int64


# Bad input: a message, a non-zero exit, no traceback, nothing already saved lost.
def test_cuda_without_cuda_is_a_clean_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "metrics.json").write_text('{"kept": true}')
    result = run_lab(LAB, "--device", "cuda", "--smoke", "--out-dir", out_dir)
    assert_clean_failure(result, "--device cuda", "no CUDA GPU")
    assert json.loads((out_dir / "metrics.json").read_text()) == {"kept": True}


def test_missing_mnist_offline_names_url_layout_and_smoke(tmp_path):
    started = time.perf_counter()
    result = run_lab(LAB, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out", env_extra=NO_NETWORK)
    assert time.perf_counter() - started < 60, "the download attempt should fail fast offline"
    assert_clean_failure(result, "https://ossci-datasets.s3.amazonaws.com/mnist/", "MNIST/raw",
                         "train-images-idx3-ubyte", "--smoke")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--epochs", "-3"), ("--batch-size", "0"),
                                         ("--lr", "0"), ("--lr", "-1e-3"), ("--lr", "nan")])
def test_non_positive_hyper_parameters_are_refused(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lab.main([f"{flag}={value}", "--smoke", "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert flag in message and "positive" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.full
def test_default_run_reaches_98_percent(lab_data_dir, tmp_path):
    result = run_lab(LAB, "--data-dir", lab_data_dir, "--out-dir", tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["smoke"] is False
    assert metrics["test_accuracy"] >= 0.98

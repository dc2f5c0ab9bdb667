"""Lab 02: the hand-written layer and loss against PyTorch's own, the model, and bad input."""
import json
import sys
import time
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_clean_failure, failure_of, load_lab, run_lab, run_on_simulated_cuda

LAB = "week1_pytorch/02_neural_network.py"
lab = load_lab(LAB)


def layer_at_relus_kink():
    """A float64 layer, an input, dL/dy, and autograd's answers; row 0 meets zero bias, so some
    pre-activations are exactly 0, at ReLU's kink."""
    torch.manual_seed(0)
    layer = nn.Linear(20, 7).double()
    x = torch.randn(5, 20, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        x[0] = 0
        layer.bias[:3] = 0
    grad_output = torch.randn(5, 7, dtype=torch.float64)
    expected = F.relu(layer(x))
    expected.backward(grad_output)
    return layer, x, grad_output, expected


@pytest.mark.exercise("linear_relu_forward")
def test_linear_relu_forward_matches_f_relu_of_the_layer_and_caches_its_inputs():
    layer, x, _grad_output, expected = layer_at_relus_kink()
    weight, bias = layer.weight.detach(), layer.bias.detach()
    output, cache = lab.linear_relu_forward(x.detach(), weight, bias)
    assert output.shape == (5, 7)
    torch.testing.assert_close(output, expected.detach())
    cached_x, cached_weight, pre_activation = cache
    assert torch.equal(cached_x, x.detach()) and torch.equal(cached_weight, weight)
    torch.testing.assert_close(pre_activation, F.linear(x.detach(), weight, bias))


@pytest.mark.exercise("linear_relu_backward")
def test_linear_relu_backward_matches_autograd():
    """The lab's backward alone, given the cache the forward would make."""
    layer, x, grad_output, _expected = layer_at_relus_kink()
    weight, bias = layer.weight.detach(), layer.bias.detach()
    cache = (x.detach(), weight, F.linear(x.detach(), weight, bias))
    grad_x, grad_weight, grad_bias = lab.linear_relu_backward(grad_output, cache)
    assert (grad_x.shape, grad_weight.shape, grad_bias.shape) == ((5, 20), (7, 20), (7,))
    torch.testing.assert_close(grad_x, x.grad)
    torch.testing.assert_close(grad_weight, layer.weight.grad)
    torch.testing.assert_close(grad_bias, layer.bias.grad)


def test_the_labs_own_layer_check_finds_only_rounding():
    assert lab.check_layer_against_autograd(seed=3) < 1e-12


@pytest.mark.exercise("label_smoothed_cross_entropy")
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.35, 1.0])
def test_label_smoothed_cross_entropy_matches_pytorch(smoothing):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 10, dtype=torch.float64, generator=generator) * 4
    targets = torch.randint(0, 10, (32,), generator=generator)
    torch.testing.assert_close(lab.label_smoothed_cross_entropy(logits, targets, smoothing),
                               F.cross_entropy(logits, targets, label_smoothing=smoothing))


@pytest.mark.exercise("label_smoothed_cross_entropy")
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


# The debugging drill (--bug no-zero-grad): in-process, on tiny generated digits.
def gradient_norm_growth_after_24_steps(bug):
    cpu = torch.device("cpu")
    data = lab.make_smoke_digits(train_count=256, test_count=8)
    images, labels = lab.normalize(data["train_images"], cpu), data["train_labels"]
    torch.manual_seed(0)
    model = lab.MLP(hidden_sizes=(32,), dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    norms = []
    for epoch in range(3):                                    # 3 epochs of 8 steps
        lab.train_one_epoch(model, optimizer, images, labels, batch_size=32, label_smoothing=0.1,
                            generator=torch.Generator().manual_seed(epoch), device=cpu, dtype=None,
                            scaler=lab.grad_scaler(cpu, None), grad_norms=norms, bug=bug)
    assert len(norms) == 24
    return lab.gradient_norm_growth(torch.stack(norms))["grad_norm_growth"]


def test_drill_no_zero_grad_makes_the_gradient_norm_grow():
    """Without zero_grad every backward() adds to the earlier gradients: over 24 steps the gradient
    norm of the last 6 steps against the first 6 grows (measured: x4.3) where the clean loop's
    shrinks (x0.62)."""
    clean, bugged = gradient_norm_growth_after_24_steps(None), gradient_norm_growth_after_24_steps("no-zero-grad")
    assert clean < 1, f"the clean loop's gradient norm grew x{clean:.2f}"
    assert bugged > 4 * clean, f"--bug no-zero-grad: x{bugged:.2f} against the clean x{clean:.2f}"


def test_the_bug_flag_reaches_the_training_step(tmp_path, monkeypatch):
    """run() hands --bug to train_one_epoch, the function that plants it (stopped at its first call)."""
    received = []

    class Stop(Exception):
        pass

    def first_step(*args, **kwargs):
        received.append(kwargs.get("bug"))
        raise Stop

    monkeypatch.setattr(lab, "train_one_epoch", first_step)
    for argv, expected in ((["--bug", "no-zero-grad"], "no-zero-grad"), ([], None)):
        with pytest.raises(Stop):
            lab.main([*argv, "--smoke", "--device", "cpu", "--out-dir", str(tmp_path / "out")])
        assert received[-1] == expected


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


def test_explicit_precisions_on_cuda_and_fp32_everywhere(monkeypatch):
    answers_like(monkeypatch, native_bf16=False)
    cuda = torch.device("cuda")
    assert lab.pick_precision("fp16", cuda) is torch.float16
    assert lab.pick_precision("bf16", cuda) is torch.bfloat16      # asked for: a T4 then emulates it
    assert lab.pick_precision("fp32", cuda) is None
    for device in ("cpu", "mps"):
        assert lab.pick_precision("auto", torch.device(device)) is None
        assert lab.pick_precision("fp32", torch.device(device)) is None


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_low_precision_off_cuda_is_refused(name):
    with pytest.raises(lab.LabError, match=f"--precision {name} is for CUDA"):
        lab.pick_precision(name, torch.device("cpu"))


def test_grad_scaler_only_scales_fp16():
    assert not lab.grad_scaler(torch.device("cpu"), None).is_enabled()
    assert not lab.grad_scaler(torch.device("cpu"), torch.bfloat16).is_enabled()


def test_tf32_matmuls_on_cuda_only_and_the_old_setting_comes_back():
    before = torch.backends.cuda.matmul.fp32_precision
    with lab.tf32_matmuls(torch.device("cpu")):
        assert torch.backends.cuda.matmul.fp32_precision == before
    with lab.tf32_matmuls(torch.device("cuda")):
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cuda.matmul.fp32_precision == before


# The GPU: device placement on the simulated T4 of tests/simulated_cuda.py.
def test_checkpoint_of_a_gpu_model_takes_the_sample_inputs_from_anywhere():
    """The crash on a T4: run() moved the sample images to the CPU, then save_checkpoint fed them
    to the model on the GPU. Now the samples go where the weights are, and the file holds CPU tensors."""
    result = run_on_simulated_cuda("""
import tempfile
from pathlib import Path
import torch
lab = load_lab("week1_pytorch/02_neural_network.py")
device = torch.device("cuda")
model = lab.MLP(hidden_sizes=(16,), dropout=0.0).to(device)
test_x = lab.normalize(lab.make_smoke_digits(train_count=8, test_count=8)["test_images"], device)
for sample_inputs in (test_x[:8].cpu(), test_x[:8]):     # what run() used to pass, and what it passes
    path = Path(tempfile.mkdtemp()) / "mlp_mnist.pt"
    lab.save_checkpoint(model, lab.Config(hidden_sizes=(16,), dropout=0.0), sample_inputs, path)
    assert lab.reload_and_check(path)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert not saved["sample_inputs"].is_cuda and not saved["sample_outputs"].is_cuda
""")
    assert result.returncode == 0, result.stderr[-3000:]


# Bad input: one line on stderr, a non-zero exit, nothing written or overwritten.
MISSING_DEVICES = [name for name, present in (("cuda", torch.cuda.is_available()),
                                              ("mps", torch.backends.mps.is_available())) if not present]


@pytest.mark.parametrize("device", MISSING_DEVICES)
def test_a_missing_device_is_a_clean_error(tmp_path, device):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "metrics.json").write_text('{"kept": true}')
    result = failure_of(lab.main, ["--device", device, "--smoke", "--out-dir", out_dir])
    assert_clean_failure(result, f"--device {device}", "--device cpu")
    assert json.loads((out_dir / "metrics.json").read_text()) == {"kept": True}
    assert [p.name for p in out_dir.iterdir()] == ["metrics.json"]


def test_missing_mnist_offline_names_url_layout_and_smoke(tmp_path, no_network):
    started = time.perf_counter()
    result = failure_of(lab.main, ["--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out"])
    assert time.perf_counter() - started < 60, "the download attempt should fail fast offline"
    assert_clean_failure(result, "https://ossci-datasets.s3.amazonaws.com/mnist/", "MNIST/raw",
                         "train-images-idx3-ubyte", "--smoke")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, fragment", [
    ("--epochs", "0", "must be a whole number at least 1"), ("--epochs", "-3", "must be a whole number at least 1"),
    ("--batch-size", "0", "must be a whole number at least 1"), ("--lr", "0", "must be a finite number above 0"),
    ("--lr", "-1e-3", "must be a finite number above 0"), ("--lr", "nan", "must be a finite number above 0"),
    ("--precision", "fp8", "invalid choice"), ("--bug", "no-such-bug", "invalid choice")])
def test_out_of_range_flags_are_refused_before_anything_runs(flag, value, fragment, tmp_path):
    result = failure_of(lab.main, [f"{flag}={value}", "--smoke", "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, flag, fragment)
    assert not (tmp_path / "out").exists()


def test_fp16_without_cuda_is_refused_before_anything_runs(tmp_path):
    result = failure_of(lab.main, ["--precision", "fp16", "--device", "cpu", "--smoke", "--out-dir", tmp_path / "out"])
    assert_clean_failure(result, "--precision fp16 is for CUDA GPUs", "fp32")
    assert not (tmp_path / "out").exists()


def test_a_bad_flag_in_a_notebook_prints_one_line_without_raising(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    lab.main(["--lr", "0", "--smoke", "--out-dir", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--lr" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.full
def test_default_run_reaches_98_percent(lab_data_dir, tmp_path):
    result = run_lab(LAB, "--data-dir", lab_data_dir, "--out-dir", tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["smoke"] is False
    assert metrics["test_accuracy"] >= 0.98

"""Lab 01 (tensors, autograd, devices): the hand-built pieces against PyTorch, and its bad inputs."""
import json
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_clean_failure, failure_of, load_lab, run_lab

LAB = "week1_pytorch/01_pytorch_basics.py"


@pytest.fixture(scope="module")
def lab():
    return load_lab(LAB)


@pytest.mark.exercise("logistic_gradients_by_hand")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hand_derived_logistic_gradient_equals_autograd(lab, seed):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(32, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 2, (32,), generator=generator).double()
    w = torch.randn(4, generator=generator, dtype=torch.float64)
    b = torch.randn((), generator=generator, dtype=torch.float64)
    by_hand = lab.logistic_gradients_by_hand(X, y, w, b)
    w_leaf, b_leaf = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    F.binary_cross_entropy_with_logits(X @ w_leaf + b_leaf, y).backward()
    torch.testing.assert_close(by_hand[0], w_leaf.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(by_hand[1], b_leaf.grad, rtol=0, atol=1e-12)
    assert lab.check_hand_gradient(seed) < 1e-12


@pytest.mark.exercise("silu_forward")
def test_silu_forward_matches_f_silu_and_saves_the_input_for_backward(lab):
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    y = lab.SiLUFunction.apply(x)
    assert y.shape == x.shape and y.requires_grad
    torch.testing.assert_close(y, F.silu(x))
    saved = y.grad_fn.saved_tensors                      # what ctx.save_for_backward kept
    assert len(saved) == 1 and torch.equal(saved[0], x), "save the input x for backward"


@pytest.mark.exercise("silu_backward")
def test_silu_backward_is_the_derivative_of_silu(lab):
    """The lab's backward alone: called with the input saved, and under gradcheck behind a reference forward."""
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    grad_output = torch.randn(3, 7, dtype=torch.float64)
    ours = lab.SiLUFunction.backward(types.SimpleNamespace(saved_tensors=(x.detach(),)), grad_output)
    (theirs,) = torch.autograd.grad(F.silu(x), x, grad_output)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, theirs)

    class ReferenceForward(lab.SiLUFunction):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return F.silu(x)

    assert torch.autograd.gradcheck(ReferenceForward.apply, (x,))


def test_custom_silu_function_passes_gradcheck_and_matches_pytorch(lab):
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lab.SiLUFunction.apply, (x,))
    torch.testing.assert_close(lab.silu(x), F.silu(x))
    (ours,) = torch.autograd.grad(lab.silu(x).sum(), x)
    (theirs,) = torch.autograd.grad(F.silu(x).sum(), x)
    torch.testing.assert_close(ours, theirs)
    passed, difference = lab.check_custom_function(seed=0)
    assert passed and difference < 1e-12


@pytest.mark.exercise("shares_storage")
def test_views_share_storage_and_contiguous_copies_do_not(lab):
    base = torch.arange(12.0).reshape(3, 4)
    transposed = base.t()
    for view in (base.view(4, 3), transposed, base[1:, ::2], base.reshape(12)):
        assert lab.shares_storage(base, view)
    assert not transposed.is_contiguous()
    packed = transposed.contiguous()
    assert packed.is_contiguous() and not lab.shares_storage(base, packed)
    assert not lab.shares_storage(base, base.clone())
    assert base.contiguous() is base                     # already contiguous: no copy at all
    transposed[0, 1] = -1.0                              # a write through a view reaches the base...
    assert base[1, 0] == -1.0
    packed[0, 2] = -2.0                                  # ...a write into a copy does not
    assert base[2, 0] == 8.0


def test_benchmark_rows_are_consistent(lab):
    rows = lab.benchmark_matmul([16, 32], torch.device("cpu"), seconds_per_size=0.01, seed=0)
    assert [r["size"] for r in rows] == [16, 32]
    for r in rows:
        assert r["median_ms"] > 0 and r["timed_calls"] >= 1
        assert math.isclose(r["gflops"], 2 * r["size"] ** 3 / (r["median_ms"] / 1e3) / 1e9, rel_tol=1e-9)


def test_two_device_table_and_plot(lab, tmp_path, capsys):
    """The CPU-vs-accelerator path, exercised with made-up rows so it is covered without a GPU."""
    cpu = [{"size": 64, "median_ms": 2.0, "gflops": 0.26}, {"size": 128, "median_ms": 8.0, "gflops": 0.52}]
    gpu = [{"size": 64, "median_ms": 0.5, "gflops": 1.05}, {"size": 128, "median_ms": 1.0, "gflops": 4.19}]
    lab.print_benchmark_table({"cpu": cpu, "cuda": gpu})
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "4.0x" in printed and "8.0x" in printed
    lab.plot_benchmark({"cpu": cpu, "cuda": gpu}, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 0


# Bad input: one line on stderr, a non-zero exit, nothing written or overwritten.
MISSING_DEVICES = [name for name, present in (("cuda", torch.cuda.is_available()),
                                              ("mps", torch.backends.mps.is_available())) if not present]


@pytest.mark.parametrize("device", MISSING_DEVICES)
def test_a_missing_device_fails_cleanly_and_keeps_earlier_outputs(lab, tmp_path, device):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    earlier = out_dir / "metrics.json"
    earlier.write_text('{"from": "an earlier run"}')
    result = failure_of(lab.main, ["--device", device, "--smoke", "--out-dir", out_dir])
    assert_clean_failure(result, f"--device {device}", "--device cpu")
    assert earlier.read_text() == '{"from": "an earlier run"}'
    assert sorted(p.name for p in out_dir.iterdir()) == ["metrics.json"]


def test_a_missing_device_fails_cleanly_in_a_terminal(tmp_path):
    """The same check through a real process: exit status 1, one line, no traceback (the device
    this machine lacks: cuda here, mps on a GPU machine)."""
    device = "mps" if torch.cuda.is_available() else "cuda"
    result = run_lab(LAB, "--device", device, "--smoke", "--out-dir", tmp_path / "out")
    assert_clean_failure(result, f"--device {device}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--bench-seconds", "0"], "--bench-seconds: must be a finite number above 0"),
    (["--bench-seconds", "-1"], "--bench-seconds: must be a finite number above 0"),
    (["--bench-seconds", "nan"], "--bench-seconds: must be a finite number above 0"),
    (["--bench-seconds", "soon"], "--bench-seconds: expected a number, got 'soon'"),
    (["--sizes", "128,0"], "positive whole number"),
    (["--sizes", "big"], "comma-separated whole numbers"),
    (["--device", "tpu"], "invalid choice"),
])
def test_out_of_range_flags_are_refused_before_anything_runs(lab, tmp_path, flags, fragment):
    out_dir = tmp_path / "out"
    result = failure_of(lab.main, [*flags, "--smoke", "--out-dir", out_dir])
    assert_clean_failure(result, fragment)
    assert result.returncode == 1
    assert not out_dir.exists()


def test_a_bad_flag_in_a_notebook_prints_one_line_without_raising(lab, tmp_path, monkeypatch, capsys):
    """In a notebook, SystemExit would show a traceback: main() prints the line and returns."""
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    lab.main(["--bench-seconds", "0", "--out-dir", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--bench-seconds" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.full
def test_default_run(lab_data_dir, tmp_path):
    result = run_lab(LAB, "--data-dir", lab_data_dir, "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["hand_vs_autograd_max_abs_diff"] < 1e-12
    assert metrics["custom_function_gradcheck_passed"] is True
    cpu_rows = metrics["benchmark"]["cpu"]
    assert [r["size"] for r in cpu_rows] == [64, 128, 256, 512, 1024, 2048, 4096]
    assert all(r["gflops"] > 0 for r in cpu_rows)
    assert (tmp_path / "matmul_benchmark.png").exists() and (tmp_path / "silu_gradient.png").exists()

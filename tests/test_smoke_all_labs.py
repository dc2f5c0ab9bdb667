"""Run every lab with --smoke, in a terminal on the CPU and as a notebook on a simulated T4, and
check what it wrote (LAB_CONTRACT sections 4, 6, 8 and 9).

A new lab is covered by adding its file (`all_labs()`) and its promised outputs to PROMISED.

The checkpoint convention (CONTRIBUTING.md): every `.pt` file a lab writes holds
  "model"          the state_dict
  "config"         a plain dict the lab's `build_model(config)` turns back into the same architecture
  "sample_inputs"  a few inputs, and
  "sample_outputs" what the trained model returned for them in eval mode,
so this test can rebuild the model from the file alone and confirm it predicts the same.
"""
import json
import math
import sys

import pytest
import torch

from conftest import REPO, all_labs, load_lab, terminal_smoke_run

STANDARD_KEYS = {"lab", "smoke", "device", "torch_version", "wall_time_s", "train_time_s"}

# What each lab's docstring promises in --out-dir: files, and headline keys of metrics.json.
PROMISED = {
    "01_pytorch_basics": (["matmul_benchmark.png", "silu_gradient.png"],
                          ["hand_vs_autograd_max_abs_diff", "silu_vs_pytorch_max_abs_diff",
                           "custom_function_gradcheck_passed"]),
    "02_neural_network": (["optimizer_comparison.png", "confusion_matrix.png", "misclassified.png", "mlp_mnist.pt"],
                          ["test_accuracy"]),
    "03_training_loop": (["best.pt", "last.pt", "lr_schedule.png", "training_curves.png", "tensorboard"],
                         ["test_accuracy", "best_val_loss"]),
    "04_cnn_basics": (["cifar_cnn.pt", "timbre_cnn.pt", "cifar_confusion.png", "cifar_feature_maps.png",
                       "cifar_first_layer_filters.png", "cifar_training_curves.png", "timbre_confusion.png",
                       "timbre_spectrograms.png"],
                      ["test_accuracy", "timbre_test_accuracy", "conv_max_error"]),
    "05_transfer_learning": (["best_feature_extraction.pt", "best_fine_tuning.pt", "best_gradual_unfreezing.pt",
                              "comparison.md", "strategy_comparison.png"],
                             ["val_accuracy", "best_strategy"]),
    "06_rnn_lstm": (["char_lstm.pt", "char_lstm_loss.png", "samples.txt", "sines_forecast.png",
                     "vanishing_gradient.png"],
                    ["val_loss", "rnn_cell_max_abs_diff", "lstm_cell_max_abs_diff"]),
    "music_melody_lstm": (["melody_lstm.pt", "melody_gru.pt", "abc_lstm.pt", "chord_lstm.pt", "generated_abc.txt",
                           "piano_roll.png", "statistics.png", "melody_01.mid", "melody_01.wav", "tensorboard"],
                          ["val_loss", "lstm_test_nll", "best_ngram_test_nll", "abc_valid_share_generated",
                           "abc_valid_share_real", "chord_accuracy_lstm", "chord_accuracy_bigram",
                           "pitch_class_intersection_lstm", "pitch_class_intersection_random"]),
    "music_vae": (["music_vae.pt", "music_vae_collapsed.pt", "interpolation.mid", "interpolation.wav",
                   "interpolation.png", "prior_samples.mid", "prior_samples.wav", "prior_samples.png",
                   "attribute.png", "training.png", "tensorboard"],
                  ["test_accuracy", "test_neg_elbo", "val_loss", "teacher_forced_accuracy", "free_running_accuracy",
                   "cross_z_accuracy", "cross_z_drop", "kl_per_sequence", "collapsed_kl_per_sequence",
                   "collapsed_cross_z_drop", "prior_pitch_class_intersection", "attribute_density_before",
                   "attribute_density_plus", "attribute_density_minus", "windows_per_source"]),
    "07_seq2seq": (["seq2seq.pt", "attention_0.png"], ["test_exact_match", "test_exact_match_beam"]),
    "08_transformer": (["model.pt", "attention_heads.png", "loss_curve.png", "positional_encodings.png",
                        "samples.txt"],
                       ["val_loss"]),
    "09_vae": (["vae.pt", "cvae.pt", "reconstructions.png", "prior_samples.png", "interpolation.png",
                "latent_map_2d.png", "cvae_all_digits.png", "loss_curve.png"],
               ["test_neg_elbo", "conditional_accuracy"]),
    "music_transformer": (["absolute.pt", "relative.pt", "piano_roll.png", "attention_maps.png", "nll_comparison.png",
                           "chorale_01.mid", "chorale_01.wav", "tensorboard"],
                          ["val_loss", "test_nll_absolute", "test_nll_relative", "test_nll_difference",
                           "test_nll_difference_ci95", "train_seconds", "train_steps"]),
    "01_mnist_classifier": (["best.pt", "augmentation.png", "curves.png", "tensorboard"],
                            ["test_accuracy", "seconds_to_target"]),
    "02_text_generator": (["best.pt", "generated.txt", "loss_curve.png", "samples.md", "tensorboard"], ["val_loss"]),
    "03_vae_generator": (["vae.pt", "judge.pt", "reconstructions.png", "sample_sheet.png", "interpolation.png",
                          "elbo.png"],
                         ["test_neg_elbo", "conditional_accuracy"]),
    "04_sentiment_transformer": (["best.pt", "attention.png", "curves.png"], ["test_accuracy", "hf_test_accuracy"]),
}

LABS = all_labs()
IDS = [f"{p.parent.name}/{p.name}" for p in LABS]
# The notebook test of a lab reuses its terminal run: with pytest-xdist both go to one worker.
LAB_PARAMS = [pytest.param(lab, id=name, marks=pytest.mark.xdist_group(lab.stem)) for lab, name in zip(LABS, IDS)]


def numbers_in(value, path="metrics"):
    """Yield (path, number) for every number in a JSON value."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from numbers_in(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from numbers_in(item, f"{path}[{i}]")


def call_model(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def outputs_of(out_dir):
    """Names under out_dir that a lab promises: top-level files and folders."""
    return {path.name for path in out_dir.iterdir()}


def check_metrics(metrics, lab_name):
    missing = STANDARD_KEYS - metrics.keys()
    assert not missing, f"metrics.json lacks {missing}"
    assert "epochs" in metrics or "steps" in metrics, "metrics.json needs `epochs` or `steps`"
    assert metrics["smoke"] is True
    for where, number in numbers_in(metrics):
        assert math.isfinite(number), f"{where} is {number}"
    headline = set(PROMISED[lab_name][1]) - metrics.keys()
    assert not headline, f"metrics.json lacks the headline results {headline}"


def test_every_lab_says_what_it_promises():
    assert {lab.stem for lab in LABS} == set(PROMISED), "add the new lab's outputs to PROMISED"


@pytest.mark.parametrize("lab", LAB_PARAMS)
def test_lab_smoke_run(lab, smoke_root, request):
    if getattr(request.config.option, "loadgroup", False):     # a pytest-xdist worker under --dist loadgroup
        # The lab's tests share one smoke run only if xdist keeps its group on one worker.
        assert request.node.nodeid.endswith(f"@{lab.stem}"), "--dist loadgroup did not group (requirements.txt)"
    out_dir = smoke_root / lab.stem / "out"
    out_dir.parent.mkdir(exist_ok=True)
    result = terminal_smoke_run(lab, out_dir)
    assert result.returncode == 0, f"smoke run failed\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    metrics = json.loads((out_dir / "metrics.json").read_text())
    check_metrics(metrics, lab.stem)
    missing = set(PROMISED[lab.stem][0]) - outputs_of(out_dir)
    assert not missing, f"the smoke run did not write {missing}"

    checkpoints = sorted(out_dir.rglob("*.pt"))
    if checkpoints:
        module = load_lab(str(lab.relative_to(REPO)))
        assert hasattr(module, "build_model"), "a lab that saves checkpoints provides build_model(config)"
    for path in checkpoints:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("model", "config", "sample_inputs", "sample_outputs"):
            assert key in saved, f"{path.name} lacks '{key}'"
        model = module.build_model(saved["config"])
        model.load_state_dict(saved["model"])
        model.eval()
        with torch.no_grad():
            outputs = call_model(model, saved["sample_inputs"])
        torch.testing.assert_close(outputs, saved["sample_outputs"], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{path.name} does not reproduce its predictions: {m}")


# %%
# The same lab as a notebook (jupytext + a Jupyter kernel), on the simulated T4 of
# tests/simulated_cuda.py: device placement, GPU stalls and notebook behaviour in one run.
SETUP_CELL = """\
import sys
sys.path.insert(0, {tests!r})
import simulated_cuda
simulated_cuda.install()
import matplotlib, torch
kernel_state_before = (torch.get_num_threads(), torch.get_default_dtype(), matplotlib.get_backend())
sys.argv = [{name!r}, "--device", "cuda", "--smoke", "--out-dir", {out!r}, "--data-dir", {data!r}]
"""
CHECK_CELL = """\
import json
kernel_state_after = (torch.get_num_threads(), torch.get_default_dtype(), matplotlib.get_backend())
assert kernel_state_after == kernel_state_before, f"the lab changed the kernel: {{kernel_state_before}} -> {{kernel_state_after}}"
open({report!r}, "w").write(json.dumps(simulated_cuda.REPORT.as_dict()))
sys.argv = [{name!r}, "--device", "tpu"]
main()                                   # a bad flag: one line on stderr, no SystemExit traceback
"""
# A line that reads from the GPU in more than this share of the intervals between optimizer steps
# reads on (nearly) every step: a stall on a real GPU (CONTRIBUTING, "No GPU stalls").
MAX_SHARE_OF_STEPS_WITH_A_READ = 0.6


def python_kernel(tmp_path):
    """A kernelspec that runs this interpreter (the venv's), whatever `python` is on PATH."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "lab-python"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lab python", "language": "python"}))
    return tmp_path / "jupyter"


def stream_text(cell, name):
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == name)


@pytest.mark.parametrize("lab", LAB_PARAMS)
def test_lab_runs_as_a_notebook_on_a_simulated_t4(lab, smoke_root, tmp_path, monkeypatch):
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    terminal_out = smoke_root / lab.stem / "out"
    terminal_out.parent.mkdir(exist_ok=True)
    terminal = terminal_smoke_run(lab, terminal_out)
    assert terminal.returncode == 0, "the terminal smoke run failed (see test_lab_smoke_run)"

    out_dir, report = tmp_path / "out", tmp_path / "device_reads.json"
    notebook = jupytext.read(lab)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(SETUP_CELL.format(
        tests=str(REPO / "tests"), name=lab.name, out=str(out_dir), data=str(tmp_path / "data"))))
    notebook.cells.append(nbformat.v4.new_code_cell(CHECK_CELL.format(report=str(report), name=lab.name)))
    monkeypatch.setenv("JUPYTER_PATH", str(python_kernel(tmp_path)))
    monkeypatch.delenv("MPLBACKEND", raising=False)          # a notebook keeps its inline backend
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    NotebookClient(notebook, kernel_name="lab-python", timeout=300,
                   resources={"metadata": {"path": str(REPO)}}).execute()

    # Same outputs as the terminal run, on the GPU, with figures shown inline.
    metrics = json.loads((out_dir / "metrics.json").read_text())
    check_metrics(metrics, lab.stem)
    assert metrics["device"].startswith("cuda"), metrics["device"]
    terminal_keys = json.loads((terminal_out / "metrics.json").read_text()).keys()
    assert not terminal_keys - metrics.keys(), "keys of the terminal run missing from the notebook run"
    assert outputs_of(out_dir) == outputs_of(terminal_out)
    if any(name.endswith(".png") for name in PROMISED[lab.stem][0]):
        images = [o for cell in notebook.cells for o in cell.get("outputs", [])
                  if "image/png" in o.get("data", {})]
        assert images, "no figure was shown inline in the notebook"
    run_cells = notebook.cells[:-1]
    errors = [stream_text(cell, "stderr") for cell in run_cells if "error:" in stream_text(cell, "stderr")]
    assert not errors, f"the smoke run printed an error: {errors}"

    # The bad flag of the last cell: one line, no traceback.
    last = notebook.cells[-1]
    assert not [o for o in last.outputs if o.get("output_type") == "error"]
    bad_flag = [line for line in stream_text(last, "stderr").splitlines() if line.strip()]
    assert len(bad_flag) == 1 and bad_flag[0].startswith("error:") and "--device" in bad_flag[0], bad_flag

    # No GPU stall: no line of the lab reads from the GPU on (nearly) every training step.
    reads = json.loads(report.read_text())
    steps = reads["optimizer_steps"]
    stalls = {line: count for line, count in reads["intervals_with_read_by_line"].items()
              if "(GradScaler)" not in line and steps >= 5 and count > MAX_SHARE_OF_STEPS_WITH_A_READ * steps}
    assert not stalls, f"device-to-host reads on most of {steps} optimizer steps: {stalls}"

"""Run every lab with --smoke and check what it wrote (LAB_CONTRACT sections 4, 6 and 9).

A new lab is covered by adding its file: the list comes from `all_labs()`.

The checkpoint convention (CONTRIBUTING.md): every `.pt` file a lab writes holds
  "model"          the state_dict
  "config"         a plain dict the lab's `build_model(config)` turns back into the same architecture
  "sample_inputs"  a few inputs, and
  "sample_outputs" what the trained model returned for them in eval mode,
so this test can rebuild the model from the file alone and confirm it predicts the same.
"""
import json
import math

import pytest
import torch

from conftest import REPO, all_labs, load_lab, run_lab

STANDARD_KEYS = {"lab", "smoke", "device", "torch_version", "wall_time_s", "train_time_s"}


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


@pytest.mark.parametrize("lab", all_labs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_lab_smoke_run(lab, tmp_path):
    relative = str(lab.relative_to(REPO))
    out_dir = tmp_path / "out"
    result = run_lab(relative, "--smoke", "--out-dir", out_dir, "--data-dir", tmp_path / "data")
    assert result.returncode == 0, f"smoke run failed\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    metrics = json.loads((out_dir / "metrics.json").read_text())
    missing = STANDARD_KEYS - metrics.keys()
    assert not missing, f"metrics.json lacks {missing}"
    assert "epochs" in metrics or "steps" in metrics, "metrics.json needs `epochs` or `steps`"
    assert metrics["smoke"] is True
    for where, number in numbers_in(metrics):
        assert math.isfinite(number), f"{where} is {number}"

    assert list(out_dir.rglob("*.png")), "the smoke run saved no figure"

    checkpoints = sorted(out_dir.rglob("*.pt"))
    if checkpoints:
        module = load_lab(relative)
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
